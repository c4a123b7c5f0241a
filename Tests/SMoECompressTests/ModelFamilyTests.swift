import Foundation
import XCTest
@testable import SMoECompress

/// The model-family table: its JSON copy for the capture script, its consistency, and the
/// capture script's layer naming against import's.
final class ModelFamilyTests: XCTestCase {
    static let tableFile = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("tools/model_families.json").path

    /// `tools/model_families.json` is the table, so the capture script cannot drift from it.
    func testToolsJSONMatchesTheTable() throws {
        let text = ModelFamily.tableJSON.serialized(pretty: true) + "\n"
        if ProcessInfo.processInfo.environment["SMOE_REGENERATE_GOLDENS"] == "1" {
            try text.write(toFile: Self.tableFile, atomically: true, encoding: .utf8)
        }
        let stored = try String(contentsOfFile: Self.tableFile, encoding: .utf8)
        XCTAssertEqual(stored, text, "tools/model_families.json is out of date: SMOE_REGENERATE_GOLDENS=1 swift test --filter ModelFamilyTests")
    }

    /// Names that pick a family pick exactly one; every glu family has the three roles, mlp two.
    func testTableIsConsistent() {
        let all = ModelFamily.all
        XCTAssertEqual(Set(all.map(\.rawValue)).count, all.count)
        let types = all.flatMap(\.modelTypes), archs = all.flatMap(\.architectures)
        XCTAssertEqual(Set(types).count, types.count)
        XCTAssertEqual(Set(archs).count, archs.count)
        for f in all {
            XCTAssertEqual(ModelFamily(rawValue: f.rawValue), f)
            XCTAssertEqual(Set(f.matrixNames.keys), f.expertType == .glu ? ["up", "gate", "down"] : ["up", "down"], f.rawValue)
            XCTAssertTrue(f.fusedNames.isEmpty || Set(f.fusedNames.keys) == ["gate_up", "down"], f.rawValue)
            for t in f.modelTypes { XCTAssertEqual(ModelFamily.recognise(modelType: t, architectures: []), f) }
            for a in f.architectures { XCTAssertEqual(ModelFamily.recognise(modelType: nil, architectures: ["X", a]), f) }
        }
        XCTAssertNil(ModelFamily(rawValue: "llama"))
        XCTAssertEqual(ModelFamily.switchTransformers.blockPattern, "{encoder|decoder}.block.B.layer.I.mlp")
        XCTAssertEqual(ModelFamily.mixtral.expertTensorName(layer: "model.layers.0.block_sparse_moe", expert: 3, matrix: "gate"),
                       "model.layers.0.block_sparse_moe.experts.3.w1.weight")
        XCTAssertEqual(ModelFamily.switchTransformers.expertTensorName(layer: "encoder.block.1.layer.1.mlp", expert: 2, matrix: "up"),
                       "encoder.block.1.layer.1.mlp.experts.expert_2.wi.weight")
    }

    /// An optional word (a multimodal wrapper's `language_model`) may be present or absent; the
    /// layer number is found either way; a wrapper's MoE keys are read from its text_config and
    /// errors name them by their path.
    func testOptionalBlockWordAndTextConfig() throws {
        let f = ModelFamily.qwen35MoE
        XCTAssertEqual(f.blockPattern, "model.[language_model].layers.L.mlp")
        XCTAssertEqual(f.splitBlock("model.language_model.layers.12.mlp.gate.weight")?.prefix, "model.language_model.layers.12.mlp")
        XCTAssertEqual(f.splitBlock("model.layers.3.mlp.experts.gate_up_proj")?.rest, ["experts", "gate_up_proj"])
        XCTAssertNil(f.splitBlock("model.visual.blocks.0.mlp.gate.weight"))
        XCTAssertNil(f.splitBlock("mtp.layers.0.mlp.gate.weight"))
        XCTAssertEqual(f.layerNumber("model.language_model.layers.12.mlp"), 12)
        XCTAssertEqual(f.layerNumber("model.layers.7.mlp"), 7)
        let c = try SourceModelConfig.parse(#"{"model_type": "qwen3_5_moe", "text_config": {"num_experts": 16, "num_experts_per_tok": 4}}"#, path: "c.json")
        XCTAssertEqual(c.numExperts, 16)
        XCTAssertEqual(c.topK, 4)
        XCTAssertEqual(c.routerType, .softmax_topk_norm)
        XCTAssertThrowsError(try SourceModelConfig.parse(#"{"model_type": "qwen3_5_moe", "text_config": {"num_experts_per_tok": 0}}"#, path: "c.json")) { e in
            XCTAssertEqual((e as? SMoEError)?.message, "c.json: text_config.num_experts_per_tok: must be an integer from 1 to 1048576, not 0")
        }
        // Qwen3-Next renormalises unless norm_topk_prob is false (its config class defaults it to true).
        XCTAssertEqual(try SourceModelConfig.parse(#"{"model_type": "qwen3_next", "num_experts_per_tok": 2}"#, path: "c.json").routerType, .softmax_topk_norm)
        XCTAssertEqual(try SourceModelConfig.parse(#"{"model_type": "qwen3_next", "num_experts_per_tok": 2, "norm_topk_prob": false}"#, path: "c.json").routerType, .softmax_topk)
        XCTAssertEqual(try SourceModelConfig.parse(#"{"model_type": "qwen3_moe", "num_experts_per_tok": 2}"#, path: "c.json").routerType, .softmax_topk)
    }

    /// The unsupported-family message lists every model_type of the table (it once omitted
    /// deepseek_v3), and each listed model_type imports.
    func testEveryModelTypeIsListedAndImports() throws {
        let dir = temporaryDirectory(self)
        XCTAssertThrowsError(try SourceModelConfig.parse(#"{"model_type": "llama"}"#, path: "c.json")) { e in
            let m = (e as? SMoEError)?.message ?? ""
            for t in ModelFamily.all.flatMap(\.modelTypes) { XCTAssertTrue(m.contains(t), "\(m) lists \(t)") }
        }
        let (tensors, source) = fakeModel(.deepseek, dtype: .F32)
        var config = source
        for t in ModelFamily.deepseek.modelTypes {
            config = config.map { $0.0 == "model_type" ? ($0.0, .string(t)) : $0 }
            try writeFakeModel(dir + "/" + t, tensors, config: config)
            let r = try HFImport.run(directory: dir + "/" + t, output: dir + "/\(t).h5")
            XCTAssertEqual(r.plan.config.family, .deepseek)
            XCTAssertEqual(r.layers.map(\.name), FakeFamily.deepseek.moeLayers)
        }
    }

    /// tools/capture_calibration.py names and orders the MoE layers of every family as import
    /// does (its `moe_layers` reads the family table and only the index file, so it needs no
    /// torch or safetensors package).
    func testCaptureScriptLayerNamesMatchImport() throws {
        guard pythonHas("json") else { throw XCTSkip("python3 is not available") }
        let dir = temporaryDirectory(self)
        let tools = URL(fileURLWithPath: Self.tableFile).deletingLastPathComponent().path
        for kind in FakeFamily.allCases {
            let (tensors, config) = fakeModel(kind, dtype: .F32)
            let src = dir + "/\(kind.rawValue)"
            try writeFakeModel(src, tensors, config: config, shards: 2)
            let modelType = JSONValue.object(config)["model_type"]!.stringValue!
            let script = """
                import sys; sys.path.insert(0, sys.argv[1]); import capture_calibration as c
                print("\\n".join(c.moe_layers(sys.argv[2], c.family_of(sys.argv[3]))))
                """
            let out = try runPython(script, [tools, src, modelType])
            let imported = try HFImport.plan(src, model: try SafetensorsModel(src)).layers.map(\.prefix)
            XCTAssertEqual(out.split(separator: "\n").map(String.init), imported, kind.rawValue)
            XCTAssertEqual(imported, kind.moeLayers, kind.rawValue)
        }
    }
}
