import Foundation
import XCTest
@testable import SMoECompress

/// One tensor of a hand-built Hugging Face model.
struct FakeTensor {
    var name: String
    var dtype: SafetensorsDType
    var shape: [Int]
    var bytes: [UInt8]
    var floats: [Float] { bytes.withUnsafeBytes { dtype.decode($0) } }
}

/// The families and layouts the tests build, in each family's exact naming.
enum FakeFamily: String, CaseIterable {
    /// `olmoe` is the layout of the published OLMoE checkpoints (one tensor per expert matrix,
    /// `norm_topk_prob` left to its default, false); `olmoeFused` the fused layout of newer
    /// transformers versions.
    /// `deepseekV3` (fused, 2 groups, selection bias, scaling), `glm4` (per-expert, scaled) and
    /// `minimaxM2` (fused, the block's selection bias) route by sigmoid scores (issue 24).
    /// `gptOss`: router bias, fused input-major interleaved experts with biases.
    /// `qwen35` (multimodal wrapper: `model.language_model.layers`, keys in `text_config`, fused),
    /// `ernie` (per-expert, `[1, E]` selection bias), `llama4` (multimodal wrapper, top-1
    /// input-scaled routing, fused input-major halves).
    case mixtral, mixtralFused, switchT, qwen2, qwen3Fused, olmoe, olmoeFused, deepseek, deepseekV3, glm4, minimaxM2, gptOss
    case qwen35, ernie, llama4

    var family: ModelFamily {
        switch self {
        case .mixtral, .mixtralFused: return .mixtral
        case .switchT: return .switchTransformers
        case .qwen2: return .qwen2MoE
        case .qwen3Fused: return .qwen3MoE
        case .olmoe, .olmoeFused: return .olmoe
        case .deepseek: return .deepseek
        case .deepseekV3: return .deepseekV3
        case .glm4: return .glm4MoE
        case .minimaxM2: return .minimaxM2
        case .gptOss: return .gptOss
        case .qwen35: return .qwen35MoE
        case .ernie: return .ernie45MoE
        case .llama4: return .llama4
        }
    }

    var moeLayers: [String] {
        switch self {
        case .mixtral, .mixtralFused: return ["model.layers.0.block_sparse_moe", "model.layers.1.block_sparse_moe"]
        case .switchT: return ["encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"]
        case .qwen2, .qwen3Fused: return ["model.layers.1.mlp", "model.layers.2.mlp"]
        case .olmoe, .olmoeFused: return ["model.layers.0.mlp", "model.layers.1.mlp"]
        case .deepseek, .glm4: return ["model.layers.1.mlp"]
        case .deepseekV3, .minimaxM2: return ["model.layers.1.mlp", "model.layers.2.mlp"]
        case .gptOss: return ["model.layers.0.mlp", "model.layers.1.mlp"]
        case .qwen35: return ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp"]
        case .ernie: return ["model.layers.1.mlp"]
        case .llama4: return ["language_model.model.layers.1.feed_forward"]
        }
    }

    var fused: Bool { [.mixtralFused, .qwen3Fused, .olmoeFused, .deepseekV3, .minimaxM2, .gptOss, .qwen35, .llama4].contains(self) }
    var fusedSuffix: String { [.qwen3Fused, .deepseekV3, .minimaxM2, .gptOss, .qwen35, .llama4].contains(self) ? "" : ".weight" }
    var topK: Int { self == .switchT || self == .llama4 ? 1 : 2 }
    var routerType: RouterType {
        switch self {
        case .deepseekV3, .minimaxM2: return .sigmoid_topk_norm
        case .glm4: return .sigmoid_topk
        case .gptOss: return .topk_softmax
        case .llama4: return .topk_sigmoid_input
        default: return [.mixtral, .mixtralFused, .qwen3Fused, .qwen35, .ernie].contains(self) ? .softmax_topk_norm : .softmax_topk
        }
    }
    /// Expert groups (n_group, topk_group) and the routed scaling factor of the fake configs.
    var groups: (Int, Int) { self == .deepseekV3 ? (2, 1) : (1, 1) }
    var scaling: Float { self == .deepseekV3 ? 2.5 : (self == .glm4 ? 1.5 : 1) }
    var activation: Activation { self == .switchT ? .relu : (self == .gptOss ? .swiglu_oai : .silu) }
}

let fakeE = 4, fakeH = 8, fakeI = 6

/// Builds the tensors and config.json of a small random model of `kind`.
func fakeModel(_ kind: FakeFamily, dtype: SafetensorsDType, seed: UInt64 = 1) -> (tensors: [FakeTensor], config: [(String, JSONValue)]) {
    var rng = SplitMix64(seed: seed)
    var out: [FakeTensor] = []
    func add(_ name: String, _ shape: [Int], _ dt: SafetensorsDType? = nil, scale: Float = 0.5) {
        let t = dt ?? dtype
        let n = shape.reduce(1, *)
        let v = (0..<n).map { _ in Float(rng.nextGaussian()) * scale }
        out.append(FakeTensor(name: name, dtype: t, shape: shape, bytes: t.encode(v)))
    }
    func raw(_ name: String, _ shape: [Int], _ dt: SafetensorsDType) {
        let n = shape.reduce(1, *) * dt.byteSize
        var b = (0..<n).map { _ in UInt8(rng.nextInt(below: 256)) }
        if dt == .BOOL { b = b.map { $0 & 1 } }
        out.append(FakeTensor(name: name, dtype: dt, shape: shape, bytes: b))
    }
    let E = fakeE, H = fakeH, I = fakeI, V = 11
    let f = kind.family
    func moe(_ p: String) {
        add("\(p).\(f.routerSuffix)", [E, H])
        // Selection biases are float32 in these models (transformers keeps them in float32).
        if let b = f.selectionBiasSuffix { add("\(p).\(b)", f.selectionBiasRowVector ? [1, E] : [E], .F32, scale: 0.3) }
        if let b = f.routerBiasSuffix { add("\(p).\(b)", [E]) }
        if f.fusedInputMajorHalves {
            add("\(p).experts.gate_up_proj", [E, H, 2 * I])
            add("\(p).experts.down_proj", [E, I, H])
        } else if f.fusedInputMajorInterleaved {
            add("\(p).experts.gate_up_proj", [E, H, 2 * I])
            add("\(p).experts.gate_up_proj_bias", [E, 2 * I])
            add("\(p).experts.down_proj", [E, I, H])
            add("\(p).experts.down_proj_bias", [E, H])
        } else if kind.fused {
            add("\(p).experts.gate_up_proj\(kind.fusedSuffix)", [E, 2 * I, H])
            add("\(p).experts.down_proj\(kind.fusedSuffix)", [E, H, I])
        } else {
            for e in 0..<E {
                for role in f.expertType == .glu ? ["gate", "up", "down"] : ["up", "down"] {
                    add(f.expertTensorName(layer: p, expert: e, matrix: role), role == "down" ? [H, I] : [I, H])
                }
            }
        }
    }
    func denseMLP(_ p: String) {
        add("\(p).gate_proj.weight", [I, H]); add("\(p).up_proj.weight", [I, H]); add("\(p).down_proj.weight", [H, I])
    }
    var config: [(String, JSONValue)] = []
    switch kind {
    case .mixtral, .mixtralFused:
        config = [("architectures", ["MixtralForCausalLM"]), ("model_type", "mixtral"), ("hidden_size", .int(H)),
                  ("intermediate_size", .int(I)), ("num_local_experts", .int(E)), ("num_experts_per_tok", 2), ("hidden_act", "silu")]
        add("model.embed_tokens.weight", [V, H])
        for l in 0..<2 {
            add("model.layers.\(l).input_layernorm.weight", [H])
            add("model.layers.\(l).self_attn.q_proj.weight", [H, H])
            moe("model.layers.\(l).block_sparse_moe")
        }
        add("model.norm.weight", [H])
        add("lm_head.weight", [V, H])
        raw("model.layers.0.self_attn.rotary_emb.inv_freq", [H / 2], .F32)
    case .switchT:
        config = [("architectures", ["SwitchTransformersForConditionalGeneration"]), ("model_type", "switch_transformers"),
                  ("d_model", .int(H)), ("d_ff", .int(I)), ("num_experts", .int(E)), ("dense_act_fn", "relu")]
        add("shared.weight", [V, H])
        for (stack, ff) in [("encoder", 1), ("decoder", 2)] {
            add("\(stack).block.0.layer.0.SelfAttention.q.weight", [H, H])
            add("\(stack).block.0.layer.\(ff).DenseReluDense.wi.weight", [I, H])
            add("\(stack).block.0.layer.\(ff).DenseReluDense.wo.weight", [H, I])
            add("\(stack).block.1.layer.\(ff).layer_norm.weight", [H])
            moe("\(stack).block.1.layer.\(ff).mlp")
        }
        raw("encoder.embed_scale", [], .F64)
    case .qwen2, .qwen3Fused:
        config = [("architectures", [kind == .qwen2 ? "Qwen2MoeForCausalLM" : "Qwen3MoeForCausalLM"]),
                  ("model_type", .string(kind == .qwen2 ? "qwen2_moe" : "qwen3_moe")), ("hidden_size", .int(H)),
                  ("moe_intermediate_size", .int(I)), ("num_experts", .int(E)), ("num_experts_per_tok", 2),
                  ("norm_topk_prob", .bool(kind == .qwen3Fused)), ("mlp_only_layers", [0]), ("hidden_act", "silu")]
        add("model.embed_tokens.weight", [V, H])
        denseMLP("model.layers.0.mlp")
        for l in 1...2 {
            add("model.layers.\(l).post_attention_layernorm.weight", [H])
            moe("model.layers.\(l).mlp")
            if kind == .qwen2 {
                denseMLP("model.layers.\(l).mlp.shared_expert")
                add("model.layers.\(l).mlp.shared_expert_gate.weight", [1, H])
            }
        }
        raw("model.attention_mask_cache", [2, 3], .BOOL)
    case .olmoe, .olmoeFused:
        config = [("architectures", ["OlmoeForCausalLM"]), ("model_type", "olmoe"), ("hidden_size", .int(H)),
                  ("intermediate_size", .int(I)), ("num_experts", .int(E)), ("num_experts_per_tok", 2), ("hidden_act", "silu")]
        if kind == .olmoeFused { config.append(("norm_topk_prob", false)) }
        add("model.embed_tokens.weight", [V, H], .BF16)
        for l in 0..<2 {
            add("model.layers.\(l).self_attn.q_norm.weight", [H], .F32)
            moe("model.layers.\(l).mlp")
        }
        raw("model.position_ids", [5], .I64)
    case .deepseek:
        config = [("architectures", ["DeepseekForCausalLM"]), ("model_type", "deepseek"), ("hidden_size", .int(H)),
                  ("moe_intermediate_size", .int(I)), ("n_routed_experts", .int(E)), ("n_shared_experts", 1),
                  ("num_experts_per_tok", 2), ("first_k_dense_replace", 1), ("norm_topk_prob", false),
                  ("scoring_func", "softmax"), ("hidden_act", "silu")]
        add("model.embed_tokens.weight", [V, H])
        denseMLP("model.layers.0.mlp")
        moe("model.layers.1.mlp")
        denseMLP("model.layers.1.mlp.shared_experts")
        raw("model.layers.1.counter", [3], .I16)
        raw("model.layers.1.flags", [2], .U8)
        raw("model.layers.1.small", [2], .I8)
        raw("model.layers.1.count32", [2], .I32)
    case .deepseekV3:
        config = [("architectures", ["DeepseekV3ForCausalLM"]), ("model_type", "deepseek_v3"), ("hidden_size", .int(H)),
                  ("moe_intermediate_size", .int(I)), ("n_routed_experts", .int(E)), ("n_shared_experts", 1),
                  ("num_experts_per_tok", 2), ("first_k_dense_replace", 1), ("norm_topk_prob", true), ("n_group", 2),
                  ("topk_group", 1), ("routed_scaling_factor", 2.5), ("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"),
                  ("hidden_act", "silu")]
        add("model.embed_tokens.weight", [V, H])
        denseMLP("model.layers.0.mlp")
        for l in 1...2 {
            add("model.layers.\(l).post_attention_layernorm.weight", [H])
            moe("model.layers.\(l).mlp")
            denseMLP("model.layers.\(l).mlp.shared_experts")
        }
    case .glm4:
        config = [("architectures", ["Glm4MoeForCausalLM"]), ("model_type", "glm4_moe"), ("hidden_size", .int(H)),
                  ("moe_intermediate_size", .int(I)), ("n_routed_experts", .int(E)), ("n_shared_experts", 1),
                  ("num_experts_per_tok", 2), ("first_k_dense_replace", 1), ("norm_topk_prob", false), ("n_group", 1),
                  ("topk_group", 1), ("routed_scaling_factor", 1.5), ("hidden_act", "silu")]
        add("model.embed_tokens.weight", [V, H])
        denseMLP("model.layers.0.mlp")
        moe("model.layers.1.mlp")
        denseMLP("model.layers.1.mlp.shared_experts")
    case .gptOss:
        config = [("architectures", ["GptOssForCausalLM"]), ("model_type", "gpt_oss"), ("hidden_size", .int(H)),
                  ("intermediate_size", .int(I)), ("num_local_experts", .int(E)), ("num_experts_per_tok", 2),
                  ("swiglu_limit", 7.0), ("hidden_act", "silu")]
        add("model.embed_tokens.weight", [V, H])
        for l in 0..<2 {
            add("model.layers.\(l).self_attn.sinks", [2], .F32)
            moe("model.layers.\(l).mlp")
        }
    case .qwen35:
        config = [("architectures", ["Qwen3_5MoeForConditionalGeneration"]), ("model_type", "qwen3_5_moe"),
                  ("text_config", .object([("model_type", "qwen3_5_moe_text"), ("hidden_size", .int(H)), ("moe_intermediate_size", .int(I)),
                                           ("num_experts", .int(E)), ("num_experts_per_tok", 2), ("hidden_act", "silu")])),
                  ("vision_config", .object([("hidden_size", 4)]))]
        add("model.language_model.embed_tokens.weight", [V, H])
        add("model.visual.blocks.0.mlp.linear_fc1.weight", [4, 4])
        add("lm_head.weight", [V, H])
        for l in 0..<2 {
            moe("model.language_model.layers.\(l).mlp")
            denseMLP("model.language_model.layers.\(l).mlp.shared_expert")
            add("model.language_model.layers.\(l).mlp.shared_expert_gate.weight", [1, H])
        }
        add("mtp.layers.0.mlp.gate.weight", [E, H])
    case .ernie:
        config = [("architectures", ["Ernie4_5_MoeForCausalLM"]), ("model_type", "ernie4_5_moe"), ("hidden_size", .int(H)),
                  ("moe_intermediate_size", .int(I)), ("moe_num_experts", .int(E)), ("moe_k", 2), ("moe_num_shared_experts", 1),
                  ("moe_layer_start_index", 1), ("moe_norm_min", 1e-12), ("hidden_act", "silu")]
        add("model.embed_tokens.weight", [V, H])
        denseMLP("model.layers.0.mlp")
        moe("model.layers.1.mlp")
        denseMLP("model.layers.1.mlp.shared_experts")
    case .llama4:
        config = [("architectures", ["Llama4ForConditionalGeneration"]), ("model_type", "llama4"),
                  ("text_config", .object([("model_type", "llama4_text"), ("hidden_size", .int(H)), ("intermediate_size", .int(I)),
                                           ("intermediate_size_mlp", .int(2 * I)), ("num_local_experts", .int(E)),
                                           ("num_experts_per_tok", 1), ("moe_layers", [1]), ("hidden_act", "silu")]))]
        add("language_model.model.embed_tokens.weight", [V, H])
        add("vision_model.patch_embedding.linear.weight", [4, 4])
        denseMLP("language_model.model.layers.0.feed_forward")
        moe("language_model.model.layers.1.feed_forward")
        denseMLP("language_model.model.layers.1.feed_forward.shared_expert")
        add("language_model.lm_head.weight", [V, H])
    case .minimaxM2:
        config = [("architectures", ["MiniMaxM2ForCausalLM"]), ("model_type", "minimax_m2"), ("hidden_size", .int(H)),
                  ("intermediate_size", .int(I)), ("num_local_experts", .int(E)), ("num_experts_per_tok", 2), ("hidden_act", "silu")]
        add("model.embed_tokens.weight", [V, H])
        for l in 1...2 {
            add("model.layers.\(l).input_layernorm.weight", [H])
            moe("model.layers.\(l).mlp")
        }
    }
    return (out, config)
}

/// Writes a model folder: one `model.safetensors`, or `shards` files (tensors dealt round robin,
/// so a layer's experts are split across shards) with an index.
func writeFakeModel(_ dir: String, _ tensors: [FakeTensor], config: [(String, JSONValue)]?, shards: Int = 1) throws {
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    if let c = config {
        _ = FileManager.default.createFile(atPath: dir + "/config.json", contents: Data(JSONValue.object(c).serialized(pretty: true).utf8))
    }
    if shards == 1 {
        let w = try SafetensorsWriter(destination: dir + "/model.safetensors", metadata: [("format", "pt")])
        for t in tensors { try w.add(t.name, dtype: t.dtype, shape: t.shape, bytes: t.bytes) }
        try w.commit()
        return
    }
    var map: [(String, JSONValue)] = []
    for s in 0..<shards {
        let name = String(format: "model-%05d-of-%05d.safetensors", s + 1, shards)
        let w = try SafetensorsWriter(destination: dir + "/" + name, metadata: [("format", "pt")])
        for (i, t) in tensors.enumerated() where i % shards == s {
            try w.add(t.name, dtype: t.dtype, shape: t.shape, bytes: t.bytes)
            map.append((t.name, .string(name)))
        }
        try w.commit()
    }
    let index: JSONValue = ["metadata": ["total_size": .int(tensors.reduce(0) { $0 + $1.bytes.count })], "weight_map": .object(map)]
    _ = FileManager.default.createFile(atPath: dir + "/model.safetensors.index.json", contents: Data(index.serialized().utf8))
}

/// Every tensor of a safetensors folder: name → (dtype, shape, bytes).
func readFolder(_ dir: String) throws -> [String: (SafetensorsDType, [Int], [UInt8])] {
    let m = try SafetensorsModel(dir)
    var out: [String: (SafetensorsDType, [Int], [UInt8])] = [:]
    for n in m.names {
        let (f, i) = try m.locate(n)
        out[n] = (i.dtype, i.shape, try f.bytes(n))
    }
    return out
}

final class ImportExportTests: XCTestCase {
    func testImportEachFamilyGivesExpectedLayers() throws {
        let dir = temporaryDirectory(self)
        for kind in FakeFamily.allCases {
            let (tensors, config) = fakeModel(kind, dtype: .F32)
            let src = dir + "/\(kind.rawValue)"
            try writeFakeModel(src, tensors, config: config)
            let out = dir + "/\(kind.rawValue).h5"
            let report = try HFImport.run(directory: src, output: out)
            XCTAssertEqual(report.plan.layout, kind.fused ? .fused : .perExpert, kind.rawValue)
            let r = try CheckpointReader(out)
            XCTAssertEqual(r.architecture, kind.family.rawValue)
            XCTAssertEqual(r.layers.map(\.name), kind.moeLayers, kind.rawValue)
            XCTAssertEqual(r.layers.map(\.index), Array(0..<kind.moeLayers.count))
            for c in r.layers {
                XCTAssertEqual(c.numExperts, fakeE)
                XCTAssertEqual(c.topK, kind.topK, kind.rawValue)
                XCTAssertEqual(c.dModel, fakeH)
                XCTAssertEqual(c.dFF, fakeI)
                XCTAssertEqual(c.expertType, kind.family.expertType)
                XCTAssertEqual(c.activation, kind.activation)
                XCTAssertEqual(c.routerType, kind.routerType, kind.rawValue)
                XCTAssertEqual(c.numGroups, kind.groups.0, kind.rawValue)
                XCTAssertEqual(c.topKGroups, kind.groups.1, kind.rawValue)
                XCTAssertEqual(c.routedScalingFactor, kind.scaling, kind.rawValue)
                XCTAssertEqual(try r.readLayer(c.name).selectionBias != nil, kind.family.selectionBiasSuffix != nil, kind.rawValue)
                XCTAssertEqual(try r.summary(c.name).numStored, fakeE)
            }
            // Everything that is not a router or routed expert is in /dense under its own name.
            let dense = Set(try r.file.root.openGroup("dense").datasetPaths())
            let moeNames = Set(tensors.map(\.name).filter { n in
                kind.moeLayers.contains { n.hasPrefix($0 + ".experts.") || n == $0 + "." + kind.family.routerSuffix
                                          || n == $0 + "." + (kind.family.selectionBiasSuffix ?? "-")
                                          || n == $0 + "." + (kind.family.routerBiasSuffix ?? "-") }
            })
            XCTAssertEqual(dense, Set(tensors.map(\.name)).subtracting(moeNames), kind.rawValue)
            if kind == .qwen2 {
                XCTAssertTrue(dense.contains("model.layers.1.mlp.shared_expert_gate.weight"))
                XCTAssertTrue(dense.contains("model.layers.0.mlp.gate_proj.weight"))
            }
            if kind == .deepseek { XCTAssertTrue(dense.contains("model.layers.1.mlp.shared_experts.up_proj.weight")) }
            XCTAssertEqual(r.sourceConfig, JSONValue.object(config).serialized(pretty: true))
            XCTAssertEqual(r.history.first?["stage"]?.stringValue, "import")
            XCTAssertEqual(r.history.first?["family"]?.stringValue, kind.family.rawValue)
            for c in r.layers { _ = try r.readLayer(c.name) }
        }
    }

    func testImportExportIsBitExactForEveryFamilyDTypeAndSharding() throws {
        let dir = temporaryDirectory(self)
        var cases: [(FakeFamily, SafetensorsDType, Int)] = FakeFamily.allCases.map { ($0, .BF16, 1) }
        cases += [(.mixtral, .F16, 2), (.mixtral, .F32, 1), (.switchT, .F16, 1), (.qwen3Fused, .F32, 2), (.deepseek, .F16, 3), (.olmoeFused, .F16, 1),
                  (.deepseekV3, .F16, 2), (.glm4, .F32, 1), (.minimaxM2, .F16, 1), (.gptOss, .F32, 2)]
        for (kind, dtype, shards) in cases {
            let label = "\(kind.rawValue)-\(dtype.rawValue)-\(shards)"
            let (tensors, config) = fakeModel(kind, dtype: dtype, seed: UInt64(label.utf8.count))
            let src = dir + "/" + label
            try writeFakeModel(src, tensors, config: config, shards: shards)
            let h5 = dir + "/\(label).h5"
            let report = try HFImport.run(directory: src, output: h5)
            XCTAssertEqual(report.stored, dtype == .F16 ? .f16 : (dtype == .BF16 ? .bf16 : .f32), label)
            let out = dir + "/\(label)-out"
            let ex = try HFExport.run(checkpoint: h5, outputDirectory: out, maxShardBytes: shards == 1 ? 1 << 30 : 500)
            XCTAssertEqual(ex.mergedLayers, [])
            XCTAssertEqual(ex.tensorCount, tensors.count)
            if shards > 1 {
                XCTAssertTrue(FileManager.default.fileExists(atPath: out + "/model.safetensors.index.json"), label)
            } else {
                XCTAssertEqual(ex.files, ["config.json", "model.safetensors"], label)
            }
            let got = try readFolder(out)
            XCTAssertEqual(Set(got.keys), Set(tensors.map(\.name)), label)
            for t in tensors {
                guard let g = got[t.name] else { continue }
                XCTAssertEqual(g.0, t.dtype, "\(label) \(t.name)")
                XCTAssertEqual(g.1, t.shape, "\(label) \(t.name)")
                XCTAssertTrue(g.2 == t.bytes, "\(label) \(t.name) bytes differ: \(g.2.prefix(8)) vs \(t.bytes.prefix(8))")
            }
            XCTAssertEqual(try String(contentsOfFile: out + "/config.json", encoding: .utf8),
                           try String(contentsOfFile: src + "/config.json", encoding: .utf8))
            XCTAssertEqual(try SafetensorsModel(out).metadata.first?.1, "pt")
            // No temporary folders left next to the output.
            XCTAssertFalse(try FileManager.default.contentsOfDirectory(atPath: dir).contains { $0.hasPrefix(".") }, label)
        }
    }

    /// The imported layer's forward pass equals a direct computation from the safetensors
    /// tensors: softmax over the router logits, top-k, optional renormalisation, expert math.
    func testForwardOfImportedLayerMatchesDirectComputation() throws {
        let dir = temporaryDirectory(self)
        for (kind, dtype) in [(FakeFamily.mixtral, SafetensorsDType.BF16), (.switchT, .F32), (.qwen2, .F16), (.olmoe, .BF16),
                              (.olmoeFused, .F32), (.qwen3Fused, .BF16), (.deepseek, .F16), (.deepseekV3, .BF16), (.glm4, .F32),
                              (.minimaxM2, .F16)] {
            let (tensors, config) = fakeModel(kind, dtype: dtype, seed: 99)
            let src = dir + "/\(kind.rawValue)"
            try writeFakeModel(src, tensors, config: config)
            let h5 = src + ".h5"
            try HFImport.run(directory: src, output: h5)
            let r = try CheckpointReader(h5)
            let byName = Dictionary(uniqueKeysWithValues: tensors.map { ($0.name, $0) })
            let prefix = kind.moeLayers.last!
            if kind == .deepseek {
                // The shared experts stay in /dense; the imported layer is the routed part only,
                // which is what the direct computation below reproduces.
                let dense = Set(try r.file.root.openGroup("dense").datasetPaths())
                for m in ["gate_proj", "up_proj", "down_proj"] {
                    XCTAssertTrue(dense.contains("\(prefix).shared_experts.\(m).weight"), "deepseek: shared \(m) not in /dense")
                }
            }
            let layer = try r.readLayer(prefix)
            var rng = SplitMix64(seed: 5)
            let n = 16
            let x = randomMatrix(n, fakeH, &rng)
            let y = layer.forward(x)
            let W = byName["\(prefix).\(kind.family.routerSuffix)"]!.floats.map(Double.init)
            let bias = kind.family.selectionBiasSuffix.map { byName["\(prefix).\($0)"]!.floats.map(Double.init) }
            func expert(_ e: Int) -> (gate: [Double]?, up: [Double], down: [Double]) {
                if kind.fused {
                    let gu = byName["\(prefix).experts.gate_up_proj\(kind.fusedSuffix)"]!.floats.map(Double.init)
                    let dn = byName["\(prefix).experts.down_proj\(kind.fusedSuffix)"]!.floats.map(Double.init)
                    let per = fakeI * fakeH
                    return (Array(gu[(2 * e * per)..<((2 * e + 1) * per)]), Array(gu[((2 * e + 1) * per)..<((2 * e + 2) * per)]),
                            Array(dn[(e * per)..<((e + 1) * per)]))
                }
                func m(_ role: String) -> [Double]? {
                    byName[kind.family.expertTensorName(layer: prefix, expert: e, matrix: role)]?.floats.map(Double.init)
                }
                return (m("gate"), m("up")!, m("down")!)
            }
            for t in 0..<n {
                let xt = (0..<fakeH).map { Double(x[t, $0]) }
                let z = (0..<fakeE).map { e in (0..<fakeH).reduce(0.0) { $0 + W[e * fakeH + $1] * xt[$1] } }
                let mx = z.max()!
                let p = z.map { exp($0 - mx) }
                let s = p.reduce(0, +)
                let sigmoid = [RouterType.sigmoid_topk, .sigmoid_topk_norm].contains(kind.routerType)
                // Scores (softmax or sigmoid), choice = score + selection bias, eligible groups.
                let score = sigmoid ? z.map { 1 / (1 + exp(-$0)) } : p.map { $0 / s }
                let choice = (0..<fakeE).map { score[$0] + (bias?[$0] ?? 0) }
                let size = fakeE / kind.groups.0
                let groupScore = (0..<kind.groups.0).map { g in choice[(g * size)..<((g + 1) * size)].sorted(by: >).prefix(2).reduce(0, +) }
                let keep = Set((0..<kind.groups.0).sorted { groupScore[$0] != groupScore[$1] ? groupScore[$0] > groupScore[$1] : $0 < $1 }
                    .prefix(kind.groups.1))
                let order = (0..<fakeE).filter { keep.contains($0 / size) }
                    .sorted { choice[$0] != choice[$1] ? choice[$0] > choice[$1] : $0 < $1 }
                let chosen = Array(order.prefix(kind.topK))
                var w = chosen.map { score[$0] }
                if kind.routerType == .softmax_topk_norm || kind.routerType == .sigmoid_topk_norm { let ws = w.reduce(0, +); w = w.map { $0 / ws } }
                w = w.map { $0 * Double(kind.scaling) }
                var ref = [Double](repeating: 0, count: fakeH)
                for (e, we) in zip(chosen, w) {
                    let ex = expert(e)
                    var h = [Double](repeating: 0, count: fakeI)
                    for i in 0..<fakeI {
                        let u = (0..<fakeH).reduce(0.0) { $0 + ex.up[i * fakeH + $1] * xt[$1] }
                        if let g = ex.gate {
                            let a = (0..<fakeH).reduce(0.0) { $0 + g[i * fakeH + $1] * xt[$1] }
                            h[i] = a / (1 + exp(-a)) * u
                        } else {
                            h[i] = max(u, 0)
                        }
                    }
                    for j in 0..<fakeH { ref[j] += we * (0..<fakeI).reduce(0.0) { $0 + ex.down[j * fakeI + $1] * h[$1] } }
                }
                for j in 0..<fakeH {
                    XCTAssertEqual(Double(y[t, j]), ref[j], accuracy: 1e-5 * max(1, abs(ref[j])), "\(kind.rawValue) token \(t)")
                }
            }
        }
    }

    func testMalformedModelsFailNamingTheTensor() throws {
        let dir = temporaryDirectory(self)
        var count = 0
        func expectImportError(_ kind: FakeFamily = .mixtral, contains: [String], shards: Int = 1,
                               _ mutate: (inout [FakeTensor]) -> Void = { _ in },
                               config edit: ((inout [(String, JSONValue)]) -> Void)? = nil, noConfig: Bool = false,
                               line: UInt = #line) throws {
            count += 1
            var (tensors, config) = fakeModel(kind, dtype: .F32)
            mutate(&tensors)
            edit?(&config)
            let src = dir + "/bad\(count)"
            try writeFakeModel(src, tensors, config: noConfig ? nil : config, shards: shards)
            XCTAssertThrowsError(try HFImport.run(directory: src, output: src + ".h5"), line: line) { e in
                guard let s = e as? SMoEError else { return XCTFail("not an SMoEError: \(e)", line: line) }
                XCTAssertFalse(s.message.contains("\n"), line: line)
                XCTAssertTrue(s.message.contains(src), "\(s.message) names the model", line: line)
                for c in contains { XCTAssertTrue(s.message.contains(c), "\(s.message) should mention \(c)", line: line) }
            }
            XCTAssertFalse(FileManager.default.fileExists(atPath: src + ".h5"), line: line)
        }
        let p = "model.layers.1.block_sparse_moe"
        try expectImportError(contains: ["missing expert tensor \(p).experts.3.w2.weight"], shards: 2) { t in
            t.removeAll { $0.name == "\(p).experts.3.w2.weight" }
        }
        try expectImportError(contains: ["\(p).experts.4.w1.weight", "extra expert 4"]) { t in
            t.append(FakeTensor(name: "\(p).experts.4.w1.weight", dtype: .F32, shape: [fakeI, fakeH], bytes: [UInt8](repeating: 0, count: 4 * fakeI * fakeH)))
        }
        try expectImportError(contains: ["\(p).experts.0.w4.weight", "unknown expert tensor"]) { t in
            t.append(FakeTensor(name: "\(p).experts.0.w4.weight", dtype: .F32, shape: [1], bytes: [0, 0, 0, 0]))
        }
        try expectImportError(contains: ["\(p).experts.2.w1.weight", "shape"]) { t in
            let i = t.firstIndex { $0.name == "\(p).experts.2.w1.weight" }!
            t[i] = FakeTensor(name: t[i].name, dtype: .F32, shape: [fakeI + 1, fakeH], bytes: [UInt8](repeating: 0, count: 4 * (fakeI + 1) * fakeH))
        }
        try expectImportError(contains: ["\(p).experts.1.w3.weight", "dtype"]) { t in
            let i = t.firstIndex { $0.name == "\(p).experts.1.w3.weight" }!
            t[i] = FakeTensor(name: t[i].name, dtype: .F16, shape: t[i].shape, bytes: [UInt8](repeating: 0, count: 2 * fakeI * fakeH))
        }
        try expectImportError(contains: ["\(p).experts.0.w1.weight", "no router"]) { t in t.removeAll { $0.name == "\(p).gate.weight" } }
        try expectImportError(contains: ["model.layers.0.block_sparse_moe.gate.weight", "config.json says 5"], config: { c in
            c = c.map { $0.0 == "num_local_experts" ? ($0.0, .int(5)) : $0 }
        })
        try expectImportError(contains: ["\(p).gate.bias", "router tensor"]) { t in
            t.append(FakeTensor(name: "\(p).gate.bias", dtype: .F32, shape: [fakeE], bytes: [UInt8](repeating: 0, count: 4 * fakeE)))
        }
        try expectImportError(contains: ["config.json", "missing"], noConfig: true)
        try expectImportError(contains: ["model_type \"llama\"", "not a supported"], config: { c in
            c = c.map { $0.0 == "model_type" ? ($0.0, "llama") : $0 }
        })
        try expectImportError(contains: ["hidden_act", "\"tanh\""], config: { c in
            c = c.map { $0.0 == "hidden_act" ? ($0.0, "tanh") : $0 }
        })
        try expectImportError(.mixtral, contains: ["no MoE layers"]) { t in
            t.removeAll { $0.name.contains("block_sparse_moe") }
        }
        try expectImportError(.qwen3Fused, contains: ["model.layers.1.mlp.experts.gate_up_proj", "is not [4, 2·d_ff, 8]"]) { t in
            let i = t.firstIndex { $0.name == "model.layers.1.mlp.experts.gate_up_proj" }!
            t[i] = FakeTensor(name: t[i].name, dtype: .F32, shape: [fakeE, 2 * fakeI, fakeH + 1], bytes: [UInt8](repeating: 0, count: 4 * fakeE * 2 * fakeI * (fakeH + 1)))
        }
        try expectImportError(.qwen3Fused, contains: ["missing tensor model.layers.2.mlp.experts.down_proj"]) { t in
            t.removeAll { $0.name == "model.layers.2.mlp.experts.down_proj" }
        }
        try expectImportError(.deepseek, contains: ["scoring_func", "sigmoid"], config: { c in
            c = c.map { $0.0 == "scoring_func" ? ($0.0, "sigmoid") : $0 }
        })
        try expectImportError(.switchT, contains: ["missing expert tensor encoder.block.1.layer.1.mlp.experts.expert_2.wo.weight"]) { t in
            t.removeAll { $0.name == "encoder.block.1.layer.1.mlp.experts.expert_2.wo.weight" }
        }
    }

    /// Malformed safetensors through the command line: exit status 1, exactly one `error:` line
    /// naming the file or tensor, and nothing left in the output folder.
    func testCLIImportOfMalformedSafetensorsFailsCleanly() throws {
        let dir = temporaryDirectory(self)
        let outs = dir + "/outs"
        try FileManager.default.createDirectory(atPath: outs, withIntermediateDirectories: false)
        let (tensors, config) = fakeModel(.mixtral, dtype: .F32)
        let p = "model.layers.1.block_sparse_moe"
        func expectCLIError(_ name: String, mentions: (String) -> [String], line: UInt = #line, make: (String) throws -> Void) throws {
            let src = dir + "/" + name
            try make(src)
            let out = outs + "/\(name).h5"
            let r = try runCLI(["import", src, "-o", out])
            let lines = r.stderr.split(separator: "\n", omittingEmptySubsequences: false).filter { !$0.isEmpty }
            XCTAssertEqual(r.status, 1, "\(name): exit status; stderr: \(r.stderr)", line: line)
            XCTAssertEqual(lines.count, 1, "\(name): stderr should be one line: \(r.stderr)", line: line)
            XCTAssertTrue(r.stderr.hasPrefix("error: "), "\(name): \(r.stderr)", line: line)
            for m in mentions(src) { XCTAssertTrue(r.stderr.contains(m), "\(name): stderr should mention \(m): \(r.stderr)", line: line) }
            XCTAssertEqual(r.stdout, "", "\(name): stdout", line: line)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: outs), [], "\(name): output folder not empty", line: line)
        }
        // A valid model whose file then gets a header length running past the end.
        try expectCLIError("header-past-end", mentions: { [$0 + "/model.safetensors", "past the end"] }) { src in
            try writeFakeModel(src, tensors, config: config)
            let h = try FileHandle(forUpdating: URL(fileURLWithPath: src + "/model.safetensors"))
            let size = try h.seekToEnd()
            try h.seek(toOffset: 0)
            var n = (size + 4000).littleEndian
            h.write(withUnsafeBytes(of: &n) { Data($0) })
            try h.close()
        }
        // A router whose data_offsets lie outside the data section.
        try expectCLIError("offsets-out-of-range", mentions: { [$0 + "/model.safetensors", "\(p).gate.weight", "outside the data section"] }) { src in
            try writeFakeModel(src, [], config: config)
            let bytes = 4 * fakeE * fakeH
            handMadeSafetensors(src + "/model.safetensors",
                                header: #"{"\#(p).gate.weight":{"dtype":"F32","shape":[\#(fakeE),\#(fakeH)],"data_offsets":[0,\#(bytes)]}}"#,
                                data: [UInt8](repeating: 0, count: bytes / 2))
        }
        // An expert tensor missing from a sharded model.
        try expectCLIError("missing-expert", mentions: { [$0, "missing expert tensor \(p).experts.2.w3.weight"] }) { src in
            try writeFakeModel(src, tensors.filter { $0.name != "\(p).experts.2.w3.weight" }, config: config, shards: 2)
        }
    }

    /// A merged layer (G < E with an expert_map) is written with one expert per router slot;
    /// factored matrices are materialised to dense.
    func testExportOfMergedAndFactoredLayers() throws {
        let dir = temporaryDirectory(self)
        for kind in [FakeFamily.mixtral, .qwen3Fused] {
            let (tensors, config) = fakeModel(kind, dtype: .BF16, seed: 3)
            let src = dir + "/\(kind.rawValue)"
            try writeFakeModel(src, tensors, config: config)
            let h5 = src + ".h5"
            try HFImport.run(directory: src, output: h5)
            let reader = try CheckpointReader(h5)
            let merged = src + "-merged.h5"
            let w = try CheckpointWriter(destination: merged, derivedFrom: reader, entry: ["stage": "test-merge"])
            var expected: [String: MoELayer] = [:]
            var rng = SplitMix64(seed: 11)
            for c in reader.layers {
                var l = try reader.readLayer(c.name)
                // Two groups: slots {0, 2} → stored 0, {1, 3} → stored 1; expert 1's up factored.
                l.experts = [l.experts[0], l.experts[1]]
                l.expertMap = [0, 1, 0, 1]
                let u = randomMatrix(fakeI, 2, &rng), v = randomMatrix(2, fakeH, &rng)
                let s = CSRMatrix(rows: fakeI, cols: fakeH, indptr: [0, 1, 1, 1, 1, 1, 1], indices: [3], values: [0.25])
                l.experts[1].up = .factored(LowRankSparse(u: u, v: v, s: s))
                try w.write(l)
                expected[c.name] = l
            }
            try w.commit()
            let out = dir + "/\(kind.rawValue)-export"
            let ex = try HFExport.run(checkpoint: merged, outputDirectory: out)
            XCTAssertEqual(ex.mergedLayers, kind.moeLayers)
            XCTAssertEqual(ex.factoredLayers, kind.moeLayers)
            let got = try readFolder(out)
            XCTAssertEqual(Set(got.keys), Set(tensors.map(\.name)))
            for (name, l) in expected {
                for slot in 0..<fakeE {
                    let x = l.experts[l.storedIndex(slot: slot)]
                    let (gate, up, down): ([UInt8], [UInt8], [UInt8])
                    if kind.fused {
                        let gu = got["\(name).experts.gate_up_proj"]!.2, dn = got["\(name).experts.down_proj"]!.2
                        let per = fakeI * fakeH * 2
                        gate = Array(gu[(2 * slot * per)..<((2 * slot + 1) * per)])
                        up = Array(gu[((2 * slot + 1) * per)..<((2 * slot + 2) * per)])
                        down = Array(dn[(slot * per)..<((slot + 1) * per)])
                    } else {
                        func b(_ role: String) -> [UInt8] { got[kind.family.expertTensorName(layer: name, expert: slot, matrix: role)]!.2 }
                        (gate, up, down) = (b("gate"), b("up"), b("down"))
                    }
                    XCTAssertEqual(gate, SafetensorsDType.BF16.encode(x.gate!.dense().data))
                    XCTAssertEqual(up, SafetensorsDType.BF16.encode(x.up.dense().data), "\(name) slot \(slot)")
                    XCTAssertEqual(down, SafetensorsDType.BF16.encode(x.down.dense().data))
                }
            }
            // Dense tensors and routers are untouched.
            for t in tensors where !t.name.contains(".experts.") { XCTAssertEqual(got[t.name]!.2, t.bytes, t.name) }
        }
    }

    /// import → `merge` on the command line → export: one expert per slot, members share weights.
    func testCLIImportMergeExport() throws {
        let dir = temporaryDirectory(self)
        let (tensors, config) = fakeModel(.mixtral, dtype: .F16, seed: 21)
        let src = dir + "/mixtral"
        try writeFakeModel(src, tensors, config: config, shards: 2)
        let h5 = dir + "/mixtral.h5"
        let imp = try runCLI(["import", src, "-o", h5])
        XCTAssertEqual(imp.status, 0, imp.stderr)
        XCTAssertTrue(imp.stdout.contains("mixtral, 2 MoE layers, per-expert experts in F16"), imp.stdout)
        XCTAssertTrue(imp.stdout.contains("experts stored as f16 (source F16, exact)"), imp.stdout)
        let json = try runCLI(["import", src, "-o", dir + "/again.h5", "--json", "--dtype", "f32"])
        XCTAssertEqual(json.status, 0, json.stderr)
        let j = try JSONValue.parse(json.stdout)
        XCTAssertEqual(j["family"]?.stringValue, "mixtral")
        XCTAssertEqual(j["stored_dtype"]?.stringValue, "f32")
        XCTAssertEqual(j["layers"]?.arrayValue?.count, 2)

        // Calibration tokens for the imported layers, then a 2-group merge.
        let calib = dir + "/calib.h5"
        let cw = try CalibrationWriter(destination: calib, source: "test")
        var rng = SplitMix64(seed: 4)
        for (i, name) in FakeFamily.mixtral.moeLayers.enumerated() {
            try cw.write(layer: name, index: i, hiddenStates: randomMatrix(128, fakeH, &rng))
        }
        try cw.commit()
        let merged = dir + "/merged.h5"
        let m = try runCLI(["merge", h5, "--calib", calib, "--groups", "2", "-o", merged, "--quiet"])
        XCTAssertEqual(m.status, 0, m.stderr)
        let out = dir + "/exported"
        let ex = try runCLI(["export", merged, "-o", out, "--max-shard-size", "2KB"])
        XCTAssertEqual(ex.status, 0, ex.stderr)
        XCTAssertTrue(ex.stdout.contains("merged layers written one expert per router slot"), ex.stdout)
        XCTAssertTrue(ex.stdout.contains("model.safetensors.index.json"), ex.stdout)
        let got = try readFolder(out)
        let r = try CheckpointReader(merged)
        for name in FakeFamily.mixtral.moeLayers {
            let l = try r.readLayer(name)
            XCTAssertEqual(l.numStored, 2)
            var distinct = Set<[UInt8]>()
            for slot in 0..<fakeE {
                let b = got["\(name).experts.\(slot).w1.weight"]!
                XCTAssertEqual(b.0, .F16)
                XCTAssertEqual(b.2, SafetensorsDType.F16.encode(l.experts[l.storedIndex(slot: slot)].gate!.dense().data))
                distinct.insert(b.2)
            }
            XCTAssertEqual(distinct.count, 2)
        }
        for t in tensors where !t.name.contains(".experts.") { XCTAssertEqual(got[t.name]!.2, t.bytes, t.name) }

        // A compact merge exports as a 2-expert Mixtral: config.json says so, 2 router rows, 2 experts.
        let compact = dir + "/compact.h5"
        let c = try runCLI(["merge", h5, "--calib", calib, "--groups", "2", "--router", "compact", "-o", compact, "--quiet"])
        XCTAssertEqual(c.status, 0, c.stderr)
        let cex = try runCLI(["export", compact, "-o", dir + "/compact"])
        XCTAssertEqual(cex.status, 0, cex.stderr)
        XCTAssertTrue(cex.stdout.contains("num_local_experts \(fakeE) → 2"), cex.stdout)
        let cgot = try readFolder(dir + "/compact")
        let cconfig = try JSONValue.parse(try String(contentsOfFile: dir + "/compact/config.json", encoding: .utf8))
        XCTAssertEqual(cconfig["num_local_experts"]?.intValue, 2)
        XCTAssertEqual(cconfig["model_type"]?.stringValue, "mixtral")
        for name in FakeFamily.mixtral.moeLayers {
            XCTAssertEqual(cgot["\(name).gate.weight"]?.1, [2, fakeH])
            XCTAssertNotNil(cgot["\(name).experts.1.w2.weight"])
            XCTAssertNil(cgot["\(name).experts.2.w2.weight"])
        }
        for t in tensors where !t.name.contains(".experts.") && !t.name.hasSuffix(".gate.weight") {
            XCTAssertEqual(cgot[t.name]!.2, t.bytes, t.name)
        }

        // Refusals: a non-empty output folder, a checkpoint of no known family.
        let again = try runCLI(["export", merged, "-o", out])
        XCTAssertEqual(again.status, 1)
        XCTAssertTrue(again.stderr.hasPrefix("error: ") && again.stderr.contains(out) && again.stderr.contains("not an empty folder"), again.stderr)
        let planted = try runCLI(["export", fixture("planted-mixtral.h5"), "-o", dir + "/planted"])
        XCTAssertEqual(planted.status, 1)
        XCTAssertTrue(planted.stderr.contains("planted-mixtral.h5") && planted.stderr.hasPrefix("error: --family: is needed"), planted.stderr)
        XCTAssertEqual(planted.stderr.split(separator: "\n").count, 1)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/planted"))
        let bad = try runCLI(["import", dir + "/nowhere", "-o", dir + "/x.h5"])
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.contains(dir + "/nowhere") && bad.stderr.contains("no such folder"), bad.stderr)
        let size = try runCLI(["export", merged, "-o", dir + "/y", "--max-shard-size", "huge"])
        XCTAssertNotEqual(size.status, 0)
        XCTAssertTrue(size.stderr.contains("--max-shard-size"), size.stderr)
        // An empty existing folder is fine (replaced atomically).
        try FileManager.default.createDirectory(atPath: dir + "/empty", withIntermediateDirectories: false)
        let toEmpty = try runCLI(["export", h5, "-o", dir + "/empty", "--json"])
        XCTAssertEqual(toEmpty.status, 0, toEmpty.stderr)
        XCTAssertEqual(try JSONValue.parse(toEmpty.stdout)["tensors"]?.intValue, tensors.count)
    }

    /// Qwen3-MoE's expert count is `num_experts` in transformers 4.x folders and
    /// `num_local_experts` in 5.x ones (issue 24): import reads either (both must agree), and a
    /// compact export updates every key present, so no stale count is left beside the new one.
    func testExpertCountKeysOfTransformers4And5() throws {
        let dir = temporaryDirectory(self)
        let (tensors, base) = fakeModel(.qwen3Fused, dtype: .F32, seed: 5)
        let forms: [(String, [String])] = [("v4", ["num_experts"]), ("v5", ["num_local_experts"]),
                                           ("both", ["num_experts", "num_local_experts"]), ("none", [])]
        var rng = SplitMix64(seed: 6)
        let calib = dir + "/calib.h5"
        let cw = try CalibrationWriter(destination: calib, source: "test")
        for (i, name) in FakeFamily.qwen3Fused.moeLayers.enumerated() {
            try cw.write(layer: name, index: i, hiddenStates: randomMatrix(128, fakeH, &rng))
        }
        try cw.commit()
        for (form, keys) in forms {
            var config = base.filter { $0.0 != "num_experts" }
            for k in keys { config.append((k, .int(fakeE))) }
            let src = dir + "/\(form)", h5 = dir + "/\(form).h5", compact = dir + "/\(form).compact.h5"
            try writeFakeModel(src, tensors, config: config)
            let imported = try HFImport.run(directory: src, output: h5)
            XCTAssertEqual(imported.plan.config.numExperts, keys.isEmpty ? nil : fakeE, form)
            let m = try runCLI(["merge", h5, "--calib", calib, "--groups", "2", "--router", "compact", "-o", compact, "--quiet"])
            XCTAssertEqual(m.status, 0, m.stderr)
            let r = try HFExport.run(checkpoint: compact, outputDirectory: dir + "/\(form).out")
            let text = try String(contentsOfFile: dir + "/\(form).out/config.json", encoding: .utf8)
            let out = try JSONValue.parse(text)
            for k in keys.isEmpty ? ["num_local_experts"] : keys { XCTAssertEqual(out[k]?.intValue, 2, "\(form) \(k)") }
            for k in ["num_experts", "num_local_experts"] where !keys.contains(k) && !keys.isEmpty { XCTAssertNil(out[k], "\(form) \(k)") }
            XCTAssertEqual(r.expertCount?.to, 2, form)
            // The unmodified import keeps config.json byte for byte.
            try HFExport.run(checkpoint: h5, outputDirectory: dir + "/\(form).same")
            if !keys.isEmpty {
                XCTAssertEqual(try String(contentsOfFile: dir + "/\(form).same/config.json", encoding: .utf8),
                               try String(contentsOfFile: src + "/config.json", encoding: .utf8), form)
            }
        }
        // Two names that disagree: one error naming the file and both keys.
        var config = base.filter { $0.0 != "num_experts" }
        config += [("num_experts", .int(fakeE)), ("num_local_experts", .int(8))]
        try writeFakeModel(dir + "/disagree", tensors, config: config)
        XCTAssertThrowsError(try HFImport.run(directory: dir + "/disagree", output: dir + "/disagree.h5")) { e in
            let m = (e as? SMoEError)?.message ?? "\(e)"
            XCTAssertTrue(m.hasPrefix(dir + "/disagree/config.json: num_experts: is 4 but num_local_experts is 8"), m)
            XCTAssertFalse(m.contains("\n"))
        }
    }

    /// An independent check: a model written by python's safetensors, imported and exported,
    /// reads back in python with identical tensors.
    func testPythonWrittenModelRoundTrips() throws {
        try XCTSkipUnless(pythonHas("safetensors.numpy"), "python safetensors not installed")
        let dir = temporaryDirectory(self)
        let src = dir + "/qwen"
        _ = try runPython("""
            import sys, os, json, numpy as np
            from safetensors.numpy import save_file
            d = sys.argv[1]; os.makedirs(d)
            rng = np.random.default_rng(0)
            E, H, I = 4, 8, 6
            t = {"model.embed_tokens.weight": rng.standard_normal((10, H)).astype(np.float16)}
            for l in range(2):
                p = f"model.layers.{l}.mlp"
                t[p + ".gate.weight"] = rng.standard_normal((E, H)).astype(np.float16)
                for e in range(E):
                    for m, s in [("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))]:
                        t[f"{p}.experts.{e}.{m}.weight"] = rng.standard_normal(s).astype(np.float16)
                t[p + ".shared_expert_gate.weight"] = rng.standard_normal((1, H)).astype(np.float32)
            names = sorted(t)
            shards = [names[0::2], names[1::2]]
            wm = {}
            for i, s in enumerate(shards):
                fn = f"model-{i+1:05d}-of-00002.safetensors"
                save_file({n: t[n] for n in s}, os.path.join(d, fn), metadata={"format": "pt"})
                wm.update({n: fn for n in s})
            json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
            json.dump({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "num_experts": E,
                       "num_experts_per_tok": 2, "norm_topk_prob": False, "hidden_act": "silu"}, open(os.path.join(d, "config.json"), "w"))
            """, [src])
        let h5 = dir + "/qwen.h5", out = dir + "/out"
        try HFImport.run(directory: src, output: h5)
        XCTAssertEqual(try CheckpointReader(h5).layers.map(\.routerType), [.softmax_topk, .softmax_topk])
        try HFExport.run(checkpoint: h5, outputDirectory: out, maxShardBytes: 1500)
        let result = try runPython("""
            import sys, json, os
            from safetensors.numpy import load_file
            def load(d):
                t = {}
                for f in sorted(os.listdir(d)):
                    if f.endswith(".safetensors"): t.update(load_file(os.path.join(d, f)))
                return t
            a, b = load(sys.argv[1]), load(sys.argv[2])
            ok = a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a)
            idx = json.load(open(os.path.join(sys.argv[2], "model.safetensors.index.json")))
            ok = ok and set(idx["weight_map"]) == set(a) and idx["metadata"]["total_size"] == sum(v.nbytes for v in a.values())
            print("same" if ok else "different")
            """, [src, out])
        XCTAssertEqual(result.trimmingCharacters(in: .whitespacesAndNewlines), "same")
    }
}

/// End to end against transformers itself (skipped without torch and transformers): tiny
/// randomly initialised Mixtral, Qwen2-MoE (shared expert, no renormalisation) and
/// SwitchTransformers models are saved by `save_pretrained`, captured by
/// tools/capture_calibration.py and imported; every imported layer's forward pass on the
/// captured inputs reproduces the captured outputs and router logits.
final class CaptureCalibrationTests: XCTestCase {
    func testImportedLayersReproduceTransformersOutputs() throws {
        try XCTSkipUnless(pythonHas("torch") && pythonHas("transformers") && pythonHas("h5py"), "torch/transformers not installed")
        let dir = temporaryDirectory(self)
        let tools = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("tools").path
        _ = try runPython("""
            import sys, os, warnings, logging
            warnings.filterwarnings("ignore")
            sys.path.insert(0, sys.argv[2])
            import torch, transformers
            transformers.logging.set_verbosity_error()
            import capture_calibration as cc
            d = sys.argv[1]
            with open(os.path.join(d, "text.txt"), "w") as f:
                f.write("Mixture of experts route every token to a few experts. " * 8)
            torch.manual_seed(0)
            common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, max_position_embeddings=64, num_experts_per_tok=2)
            models = {
                "mixtral": transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **common)),
                "qwen2": transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=12,
                    shared_expert_intermediate_size=20, num_experts=4, norm_topk_prob=False, decoder_sparse_step=1, **common)),
                "switch": transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(
                    vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
                    num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2)),
            }
            for name, m in models.items():
                out = os.path.join(d, name)
                m.save_pretrained(out)
                cc.main([out, "-o", out + ".calib.h5", "--text", os.path.join(d, "text.txt"), "--tokens", "70",
                         "--seq-len", "24", "--batch-size", "2"])
            """, [dir, tools])
        for name in ["mixtral", "qwen2", "switch"] {
            let src = dir + "/" + name
            let h5 = src + ".h5"
            try HFImport.run(directory: src, output: h5)
            let model = try CheckpointReader(h5)
            let calib = try CalibrationReader(src + ".calib.h5")
            try calib.checkMatches(model)
            XCTAssertEqual(calib.layers.map(\.name), model.layers.map(\.name), name)
            for c in model.layers {
                let layer = try model.readLayer(c.name)
                let x = try calib.hiddenStates(c.name)
                XCTAssertEqual(x.rows, 70, "\(name) \(c.name)")
                let z = layer.logits(x)
                XCTAssertLessThan(relativeError(z, try calib.routerLogits(c.name)), 1e-5, "\(name) \(c.name) router")
                let y = layer.forward(x)
                XCTAssertLessThan(relativeError(y, try calib.output(c.name)), 1e-4, "\(name) \(c.name) output")
            }
        }
    }
}
