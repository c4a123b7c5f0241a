import Foundation

/// One piece of the name of a family's MoE blocks (`model`, `layers`, a layer number, ...).
public enum BlockNamePart: Sendable, Equatable {
    /// One of these words. When the first part of a pattern has several, blocks sort in this
    /// order (encoder before decoder).
    case word([String])
    /// A layer or block number (ASCII digits), shown as `symbol` in messages.
    case index(_ symbol: String)
    /// One of these words or nothing (a multimodal wrapper's `language_model`, present in the
    /// checkpoints of the wrapper class and absent in those of the text-only class).
    case optionalWord([String])
}

/// Where a family's `config.json` gives the experts each token uses.
public enum TopKRule: Sendable, Equatable {
    /// A positive integer under this key (required).
    case key(String)
    /// The family routes to a fixed number of experts and has no such key.
    case fixed(Int)
}

/// How a family's router weights its top-k experts.
public enum RouterTypeRule: Sendable, Equatable {
    case fixed(RouterType)
    /// A boolean key: true → softmax_topk_norm; false → softmax_topk; absent or null → `default`
    /// (the transformers config class's default: false but for Qwen3-Next).
    case normalisedIf(String, default: Bool = false)
    /// A boolean key: true → sigmoid_topk_norm, false → sigmoid_topk; absent or null → `default`
    /// (the transformers config class's default).
    case sigmoidNormalisedIf(String, default: Bool)
}

/// A numeric config.json key and the value transformers' config class uses when it is absent.
public struct DefaultedKey: Sendable, Equatable {
    public var key: String
    public var value: Double
    public init(_ key: String, _ value: Double) { self.key = key; self.value = value }
}

/// A `config.json` value the forward pass needs when the key is present (routing variants the
/// tool does not model are refused rather than imported wrongly).
public enum ConfigRequirement: Sendable, Equatable {
    case string(key: String, equals: String)
    case number(key: String, equals: Double)
}

/// Everything the tool knows about one Hugging Face MoE family: how `import` recognises it and
/// finds its tensors, how it reads the family's `config.json`, and how `export` names things.
/// Routers are bias-free linear layers `[num_experts, d_model]`; every tensor that is neither a
/// router nor a routed expert (attention, norms, embeddings, shared experts, dense FFN layers)
/// goes to `/dense` under its own name. Adding a family is one entry in `ModelFamily.all`.
public struct ModelFamily: Sendable, Hashable, CustomStringConvertible {
    /// The identifier stored in checkpoints (root `architecture`, the import history entry).
    public let rawValue: String
    /// The name people use ("Mixtral").
    public let displayName: String
    /// `model_type` values of config.json (decisive when present) ...
    public let modelTypes: [String]
    /// ... and `architectures` entries (used only when `model_type` is absent).
    public let architectures: [String]
    /// The name of an MoE block, e.g. `model.layers.L.block_sparse_moe`.
    public let block: [BlockNamePart]
    /// The router weight's name relative to the block.
    public let routerSuffix: String
    public let routerType: RouterTypeRule
    public let expertType: ExpertType
    /// Per-expert layout: `<block>.experts.<expertPrefix>N.<matrixNames[role]>.weight`.
    public let expertPrefix: String
    /// Source name of each expert matrix role (`up`, `gate`, `down`).
    public let matrixNames: [String: String]
    /// Fused layout: `<block>.experts.<fusedNames[part]>` for the parts `gate_up` ([E, 2I, H], each
    /// expert's gate rows then its up rows) and `down` ([E, H, I]), with or without `.weight`;
    /// empty when the family has no fused layout.
    public let fusedNames: [String: String]
    /// config.json key of the number of routed experts per layer (checked against the router):
    /// the name transformers 5 writes ...
    public let numExpertsKey: String
    /// ... and the other names of the same value (transformers 4.x writes, `attribute_map`
    /// aliases): import reads every one present (they must agree), export updates every one present.
    public let numExpertsAliases: [String]
    public let topK: TopKRule
    /// config.json key of the expert activation, and its value when the key is absent.
    public let activationKey: String
    public let defaultActivation: String
    public let requirements: [ConfigRequirement]
    /// Grouped top-k: the keys of the group count and of the eligible groups (`n_group`,
    /// `topk_group`), or nil when the family does not group.
    public let groupKeys: (groups: DefaultedKey, topKGroups: DefaultedKey)?
    /// The key of the routed scaling factor (every routing weight × it), or nil.
    public let scalingKey: DefaultedKey?
    /// The selection-only bias tensor relative to the block (`gate.e_score_correction_bias`),
    /// required in every MoE layer when set.
    public let selectionBiasSuffix: String?
    /// The selection bias is stored `[1, E]` (ERNIE-4.5's `moe_statics`), not `[E]`.
    public let selectionBiasRowVector: Bool
    /// config.json key of the decoder's layer count when blocks numbered at or beyond it are not
    /// part of the model transformers runs (DeepSeek-V3 / GLM-4.5 multi-token-prediction layers,
    /// `model.layers.61.*`): those go to `/dense` untouched.
    public let layerCountKey: String?
    /// The router bias relative to the block (`router.bias`, GPT-OSS), required when set.
    public let routerBiasSuffix: String?
    /// How the fused tensors hold an expert: `[E, 2I, H]` gate rows then up rows and `[E, H, I]`
    /// (false), or GPT-OSS's input-major `[E, H, 2I]` with gate and up interleaved along the last
    /// axis (even gate, odd up), `[E, I, H]`, and biases `<fusedNames[part]>_bias` (true).
    public let fusedInputMajorInterleaved: Bool
    /// Llama-4's fused layout: input-major `[E, H, 2I]` with each expert's gate columns then its
    /// up columns (halves, `x @ W` convention), `[E, I, H]`, no biases.
    public let fusedInputMajorHalves: Bool
    /// The expert activation when the family fixes it (GPT-OSS: swiglu_oai; `hidden_act` unread).
    public let fixedActivation: Activation?
    /// What `tools/capture_calibration.py` loads the model with (a `transformers` class), and
    /// whether it runs an encoder and a decoder (whose inputs are the text shifted right).
    public let transformersClass: String
    public let encoderDecoder: Bool
    /// The config.json object that holds the MoE keys when the root has it (`text_config` of a
    /// multimodal wrapper: Qwen3.5-MoE, Llama-4); nil: the root. Export writes the expert count
    /// back there.
    public let configSection: String?

    public var description: String { rawValue }
    public static func == (a: ModelFamily, b: ModelFamily) -> Bool { a.rawValue == b.rawValue }
    public func hash(into h: inout Hasher) { h.combine(rawValue) }

    /// The family stored in a checkpoint under `rawValue`.
    public init?(rawValue: String) {
        guard let f = ModelFamily.all.first(where: { $0.rawValue == rawValue }) else { return nil }
        self = f
    }

    init(_ rawValue: String, _ displayName: String, modelTypes: [String], architectures: [String], block: [BlockNamePart],
         routerSuffix: String = "gate.weight", routerType: RouterTypeRule, expertType: ExpertType = .glu,
         expertPrefix: String = "", matrixNames: [String: String] = ["gate": "gate_proj", "up": "up_proj", "down": "down_proj"],
         fusedNames: [String: String] = ["gate_up": "gate_up_proj", "down": "down_proj"], numExpertsKey: String,
         numExpertsAliases: [String] = [], topK: TopKRule = .key("num_experts_per_tok"), activationKey: String = "hidden_act", defaultActivation: String = "silu",
         requirements: [ConfigRequirement] = [], groupKeys: (groups: DefaultedKey, topKGroups: DefaultedKey)? = nil,
         scalingKey: DefaultedKey? = nil, selectionBiasSuffix: String? = nil, selectionBiasRowVector: Bool = false, layerCountKey: String? = nil,
         routerBiasSuffix: String? = nil, fusedInputMajorInterleaved: Bool = false, fusedInputMajorHalves: Bool = false, fixedActivation: Activation? = nil,
         transformersClass: String = "AutoModelForCausalLM", encoderDecoder: Bool = false, configSection: String? = nil) {
        self.rawValue = rawValue
        self.displayName = displayName
        self.modelTypes = modelTypes
        self.architectures = architectures
        self.block = block
        self.routerSuffix = routerSuffix
        self.routerType = routerType
        self.expertType = expertType
        self.expertPrefix = expertPrefix
        self.matrixNames = matrixNames
        self.fusedNames = fusedNames
        self.numExpertsKey = numExpertsKey
        self.numExpertsAliases = numExpertsAliases
        self.topK = topK
        self.activationKey = activationKey
        self.defaultActivation = defaultActivation
        self.requirements = requirements
        self.groupKeys = groupKeys
        self.scalingKey = scalingKey
        self.selectionBiasSuffix = selectionBiasSuffix
        self.selectionBiasRowVector = selectionBiasRowVector
        self.layerCountKey = layerCountKey
        self.routerBiasSuffix = routerBiasSuffix
        self.fusedInputMajorInterleaved = fusedInputMajorInterleaved
        self.fusedInputMajorHalves = fusedInputMajorHalves
        self.fixedActivation = fixedActivation
        self.transformersClass = transformersClass
        self.encoderDecoder = encoderDecoder
        self.configSection = configSection
    }

    // MARK: The table

    /// Decoder-only models keep their MoE blocks at `model.layers.L.mlp`.
    static let decoderMLP: [BlockNamePart] = [.word(["model"]), .word(["layers"]), .index("L"), .word(["mlp"])]

    public static let mixtral = ModelFamily(
        "mixtral", "Mixtral", modelTypes: ["mixtral"], architectures: ["MixtralForCausalLM"],
        block: [.word(["model"]), .word(["layers"]), .index("L"), .word(["block_sparse_moe", "mlp"])],
        routerType: .fixed(.softmax_topk_norm), matrixNames: ["gate": "w1", "up": "w3", "down": "w2"],
        numExpertsKey: "num_local_experts", numExpertsAliases: ["num_experts"])
    public static let switchTransformers = ModelFamily(
        "switch-transformers", "SwitchTransformers", modelTypes: ["switch_transformers"],
        architectures: ["SwitchTransformersForConditionalGeneration", "SwitchTransformersEncoderModel", "SwitchTransformersModel"],
        block: [.word(["encoder", "decoder"]), .word(["block"]), .index("B"), .word(["layer"]), .index("I"), .word(["mlp"])],
        routerSuffix: "router.classifier.weight", routerType: .fixed(.softmax_topk), expertType: .mlp, expertPrefix: "expert_",
        matrixNames: ["up": "wi", "down": "wo"], fusedNames: [:], numExpertsKey: "num_experts", topK: .fixed(1),
        activationKey: "dense_act_fn", defaultActivation: "relu",
        transformersClass: "SwitchTransformersForConditionalGeneration", encoderDecoder: true)
    public static let qwen2MoE = ModelFamily(
        "qwen2-moe", "Qwen1.5/Qwen2-MoE", modelTypes: ["qwen2_moe"], architectures: ["Qwen2MoeForCausalLM"], block: decoderMLP,
        routerType: .normalisedIf("norm_topk_prob"), numExpertsKey: "num_experts")
    /// transformers 4.x writes `num_experts`, 5.x `num_local_experts`.
    public static let qwen3MoE = ModelFamily(
        "qwen3-moe", "Qwen3-MoE", modelTypes: ["qwen3_moe"], architectures: ["Qwen3MoeForCausalLM"], block: decoderMLP,
        routerType: .normalisedIf("norm_topk_prob"), numExpertsKey: "num_local_experts", numExpertsAliases: ["num_experts"])
    public static let olmoe = ModelFamily(
        "olmoe", "OLMoE", modelTypes: ["olmoe"], architectures: ["OlmoeForCausalLM"], block: decoderMLP,
        routerType: .normalisedIf("norm_topk_prob"), numExpertsKey: "num_experts", numExpertsAliases: ["num_local_experts"])
    /// Only plain softmax top-k routing maps onto the tool's router types.
    public static let deepseek = ModelFamily(
        "deepseek", "DeepSeek-MoE/V2", modelTypes: ["deepseek", "deepseek_v2"],
        architectures: ["DeepseekForCausalLM", "DeepseekV2ForCausalLM"], block: decoderMLP,
        routerType: .normalisedIf("norm_topk_prob"), numExpertsKey: "n_routed_experts",
        numExpertsAliases: ["num_local_experts", "num_experts"], requirements: [.string(key: "scoring_func", equals: "softmax"), .string(key: "topk_method", equals: "greedy"),
                       .number(key: "routed_scaling_factor", equals: 1)])
    /// transformers 5.23's DeepseekV3TopkRouter: sigmoid scores, `e_score_correction_bias` for
    /// the choice only, grouped top-k, weights renormalised (`norm_topk_prob`) and scaled.
    /// Moonlight uses this model_type; Kimi-K2's `kimi_k2` is the same model (transformers maps
    /// it to deepseek_v3). `scoring_func` / `topk_method` are not read by transformers; a config
    /// that names another routing is refused rather than imported as this one.
    public static let deepseekV3 = ModelFamily(
        "deepseek-v3", "DeepSeek-V3/Kimi-K2/Moonlight", modelTypes: ["deepseek_v3", "kimi_k2"],
        architectures: ["DeepseekV3ForCausalLM"], block: decoderMLP,
        routerType: .sigmoidNormalisedIf("norm_topk_prob", default: true), numExpertsKey: "n_routed_experts",
        numExpertsAliases: ["num_local_experts"],
        requirements: [.string(key: "scoring_func", equals: "sigmoid"), .string(key: "topk_method", equals: "noaux_tc")],
        groupKeys: (DefaultedKey("n_group", 8), DefaultedKey("topk_group", 4)), scalingKey: DefaultedKey("routed_scaling_factor", 2.5),
        selectionBiasSuffix: "gate.e_score_correction_bias", layerCountKey: "num_hidden_layers")
    /// GLM-4.5 / 4.6 (`Glm4MoeTopkRouter`, the DeepSeek-V3 router with other defaults).
    public static let glm4MoE = ModelFamily(
        "glm4-moe", "GLM-4.5", modelTypes: ["glm4_moe"], architectures: ["Glm4MoeForCausalLM"], block: decoderMLP,
        routerType: .sigmoidNormalisedIf("norm_topk_prob", default: true), numExpertsKey: "n_routed_experts",
        numExpertsAliases: ["num_local_experts"],
        groupKeys: (DefaultedKey("n_group", 1), DefaultedKey("topk_group", 1)), scalingKey: DefaultedKey("routed_scaling_factor", 1),
        selectionBiasSuffix: "gate.e_score_correction_bias", layerCountKey: "num_hidden_layers")
    /// MiniMax-M2: sigmoid scores, the block's `e_score_correction_bias` for the choice only,
    /// always renormalised, no groups, no scaling; Mixtral's names (`block_sparse_moe`, w1/w3/w2)
    /// as transformers saves it, the fused layout under `mlp`.
    public static let minimaxM2 = ModelFamily(
        "minimax-m2", "MiniMax-M2", modelTypes: ["minimax_m2"], architectures: ["MiniMaxM2ForCausalLM"],
        block: [.word(["model"]), .word(["layers"]), .index("L"), .word(["block_sparse_moe", "mlp"])],
        routerType: .fixed(.sigmoid_topk_norm), matrixNames: ["gate": "w1", "up": "w3", "down": "w2"],
        numExpertsKey: "num_local_experts", numExpertsAliases: ["num_experts"],
        selectionBiasSuffix: "e_score_correction_bias")

    /// GPT-OSS (bfloat16 weights; the MXFP4 `_blocks`/`_scales` form is refused): router with a
    /// bias, top-k of the logits then softmax over the k; fused input-major experts with gate/up
    /// interleaved and biases; the clamped SwiGLU (α 1.702, limit 7).
    public static let gptOss = ModelFamily(
        "gpt-oss", "GPT-OSS", modelTypes: ["gpt_oss"], architectures: ["GptOssForCausalLM"], block: decoderMLP,
        routerSuffix: "router.weight", routerType: .fixed(.topk_softmax), numExpertsKey: "num_local_experts",
        numExpertsAliases: ["num_experts"],
        requirements: [.number(key: "swiglu_alpha", equals: 1.702), .number(key: "swiglu_limit", equals: 7)],
        routerBiasSuffix: "router.bias", fusedInputMajorInterleaved: true, fixedActivation: .swiglu_oai)

    /// Qwen3-Next: Qwen3-MoE's softmax router (renormalised unless `norm_topk_prob` is false; the
    /// config class defaults it to true) with a sigmoid-gated shared expert (to /dense); linear-
    /// and full-attention layers, dense MLPs in `mlp_only_layers` (no router: not MoE layers).
    public static let qwen3Next = ModelFamily(
        "qwen3-next", "Qwen3-Next", modelTypes: ["qwen3_next"], architectures: ["Qwen3NextForCausalLM"], block: decoderMLP,
        routerType: .normalisedIf("norm_topk_prob", default: true), numExpertsKey: "num_experts")
    /// Qwen3.5-MoE / Qwen3.6-MoE: softmax top-k always renormalised (transformers has no
    /// `norm_topk_prob` for it), a sigmoid-gated shared expert (to /dense), every layer MoE. The
    /// multimodal checkpoint (`Qwen3_5MoeForConditionalGeneration`) keeps the decoder under
    /// `model.language_model.layers.L` and its MoE keys in `text_config`; the text-only one under
    /// `model.layers.L`. Per-expert or fused (`experts.gate_up_proj [E, 2I, H]`) on disk.
    public static let qwen35MoE = ModelFamily(
        "qwen3.5-moe", "Qwen3.5-MoE", modelTypes: ["qwen3_5_moe", "qwen3_5_moe_text"],
        architectures: ["Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForCausalLM"],
        block: [.word(["model"]), .optionalWord(["language_model"]), .word(["layers"]), .index("L"), .word(["mlp"])],
        routerType: .fixed(.softmax_topk_norm), numExpertsKey: "num_experts", configSection: "text_config")

    /// Llama-4 (Scout, Maverick): top-1 of the router logits, weight σ(z) applied to the expert's
    /// INPUT (`topk_sigmoid_input`); fused input-major experts `[E, H, 2I]` (gate half, up half)
    /// and `[E, I, H]`; an ungated `shared_expert` (to /dense); dense layers outside `moe_layers`
    /// (no router). The multimodal checkpoint (`llama4`) keeps the decoder under
    /// `language_model.model.layers.L` and its MoE keys in `text_config`.
    public static let llama4 = ModelFamily(
        "llama4", "Llama-4", modelTypes: ["llama4", "llama4_text"],
        architectures: ["Llama4ForConditionalGeneration", "Llama4ForCausalLM"],
        block: [.optionalWord(["language_model"]), .word(["model"]), .word(["layers"]), .index("L"), .word(["feed_forward"])],
        routerSuffix: "router.weight", routerType: .fixed(.topk_sigmoid_input), numExpertsKey: "num_local_experts",
        fusedInputMajorHalves: true, configSection: "text_config")

    /// ERNIE-4.5-MoE: softmax scores, the `moe_statics.e_score_correction_bias` [1, E] for the
    /// choice only, the k weights divided by max(Σ, moe_norm_min) (the clamp never acts for
    /// moe_norm_min ≤ 1/E: the largest of E probabilities is ≥ 1/E; other values are refused);
    /// ungated `shared_experts` (to /dense); dense layers outside the MoE interval (no router).
    /// The router is float32 in the checkpoints.
    public static let ernie45MoE = ModelFamily(
        "ernie4.5-moe", "ERNIE-4.5-MoE", modelTypes: ["ernie4_5_moe"], architectures: ["Ernie4_5_MoeForCausalLM"],
        block: decoderMLP, routerType: .fixed(.softmax_topk_norm), numExpertsKey: "moe_num_experts",
        numExpertsAliases: ["num_experts"], topK: .key("moe_k"), requirements: [.number(key: "moe_norm_min", equals: 1e-12)],
        selectionBiasSuffix: "moe_statics.e_score_correction_bias", selectionBiasRowVector: true)

    /// Every family `import` and `export` understand.
    public static let all: [ModelFamily] = [.mixtral, .switchTransformers, .qwen2MoE, .qwen3MoE, .olmoe, .deepseek,
                                            .deepseekV3, .glm4MoE, .minimaxM2, .gptOss, .qwen3Next, .qwen35MoE, .llama4, .ernie45MoE]

    /// Every config.json key that may hold the expert count, transformers 5's name first.
    public var numExpertsKeys: [String] { [numExpertsKey] + numExpertsAliases }

    /// The family a config.json names: `model_type` decides when present, `architectures` only
    /// when it is absent.
    static func recognise(modelType: String?, architectures: [String]) -> ModelFamily? {
        if let t = modelType { return all.first { $0.modelTypes.contains(t) } }
        return architectures.lazy.compactMap { a in all.first { $0.architectures.contains(a) } }.first
    }

    /// Every `model_type` the table knows, for messages.
    public static var modelTypeList: String { all.flatMap(\.modelTypes).joined(separator: ", ") }

    // MARK: Names

    /// Name of expert `n`'s matrix `role` in the per-expert layout.
    public func expertTensorName(layer prefix: String, expert n: Int, matrix role: String) -> String {
        "\(prefix).experts.\(expertPrefix)\(n).\(matrixNames[role] ?? role).weight"
    }

    /// Name of the fused tensor `part` (`gate_up` or `down`) of a block.
    public func fusedTensorName(layer prefix: String, part: String, suffix: String) -> String {
        "\(prefix).experts.\(fusedNames[part] ?? part)\(suffix)"
    }

    /// The expert number of a per-expert tensor's `experts.<id>` component ("" when it is not one).
    func expertID(_ component: String) -> String {
        component.hasPrefix(expertPrefix) ? String(component.dropFirst(expertPrefix.count)) : ""
    }

    /// The block naming for messages, e.g. `{encoder|decoder}.block.B.layer.I.mlp`.
    public var blockPattern: String {
        block.map { p in
            switch p {
            case .index(let s): return s
            case .word(let w): return w.count == 1 ? w[0] : "{" + w.joined(separator: "|") + "}"
            case .optionalWord(let w): return "[" + w.joined(separator: "|") + "]"
            }
        }.joined(separator: ".")
    }

    /// The MoE block prefix of a tensor name and the rest, when the name lies in a place where
    /// this family keeps its MoE blocks. An optional word is taken when the name has it.
    func splitBlock(_ name: String) -> (prefix: String, rest: [String])? {
        let parts = name.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        guard let (used, _) = matchBlock(parts), parts.count > used else { return nil }
        return (parts[0..<used].joined(separator: "."), Array(parts[used...]))
    }

    /// How many leading name parts the block pattern takes and the position of its first layer
    /// number among them (nil when the parts do not start with a block name).
    func matchBlock(_ parts: [String]) -> (used: Int, index: Int?)? {
        func match(_ i: Int, _ b: Int, _ index: Int?) -> (Int, Int?)? {
            if b == block.count { return (i, index) }
            switch block[b] {
            case .optionalWord(let w):
                if i < parts.count, w.contains(parts[i]), let m = match(i + 1, b + 1, index) { return m }
                return match(i, b + 1, index)
            case .word(let w):
                guard i < parts.count, w.contains(parts[i]) else { return nil }
                return match(i + 1, b + 1, index)
            case .index:
                let s = i < parts.count ? parts[i] : ""
                guard !s.isEmpty, s.allSatisfy(\.isASCII), s.allSatisfy(\.isNumber) else { return nil }
                return match(i + 1, b + 1, index ?? i)
            }
        }
        return match(0, 0, nil).map { (used: $0.0, index: $0.1) }
    }

    /// The first layer number of a block prefix (`model.layers.61.mlp` → 61).
    func layerNumber(_ prefix: String) -> Int? {
        let parts = prefix.split(separator: ".").map(String.init)
        guard let i = matchBlock(parts)?.index else { return nil }
        return Int(parts[i])
    }

    /// Import's layer order: by the first name part's word order (encoder before decoder), then
    /// in natural order.
    func blockLess(_ a: String, _ b: String) -> Bool {
        func stack(_ s: String) -> Int {
            guard case .word(let w)? = block.first, let first = s.split(separator: ".").first else { return 0 }
            return w.firstIndex(of: String(first)) ?? 0
        }
        let sa = stack(a), sb = stack(b)
        return sa != sb ? sa < sb : naturalLess(a, b)
    }

    // MARK: The table as JSON

    /// The table as JSON: `tools/model_families.json`, which `tools/capture_calibration.py`
    /// reads (a test keeps the file equal to this).
    public static var tableJSON: JSONValue {
        func rules(_ f: ModelFamily) -> [(String, JSONValue)] {
            var out: [(String, JSONValue)] = [("num_experts_key", .string(f.numExpertsKey)),
                                              ("num_experts_aliases", JSONValue(f.numExpertsAliases))]
            switch f.topK {
            case .key(let k): out.append(("top_k_key", .string(k)))
            case .fixed(let k): out.append(("top_k", .int(k)))
            }
            switch f.routerType {
            case .fixed(let t): out.append(("router_type", .string(t.rawValue)))
            case .normalisedIf(let k, let d):
                out.append(("router_type_normalised_if", .string(k)))
                if d { out.append(("router_type_normalised_default", .bool(true))) }
            case .sigmoidNormalisedIf(let k, let d):
                out.append(("router_type_sigmoid_normalised_if", .object([("key", .string(k)), ("default", .bool(d))])))
            }
            if let g = f.groupKeys {
                out.append(("group_keys", .object([(g.groups.key, .double(g.groups.value)), (g.topKGroups.key, .double(g.topKGroups.value))])))
            }
            if let k = f.scalingKey { out.append(("scaling_key", .object([(k.key, .double(k.value))]))) }
            if let b = f.selectionBiasSuffix { out.append(("selection_bias_suffix", .string(b))) }
            if f.selectionBiasRowVector { out.append(("selection_bias_row_vector", .bool(true))) }
            if let k = f.layerCountKey { out.append(("layer_count_key", .string(k))) }
            if let b = f.routerBiasSuffix { out.append(("router_bias_suffix", .string(b))) }
            if f.fusedInputMajorInterleaved { out.append(("fused_input_major_interleaved", .bool(true))) }
            if f.fusedInputMajorHalves { out.append(("fused_input_major_halves", .bool(true))) }
            if let a = f.fixedActivation { out.append(("fixed_activation", .string(a.rawValue))) }
            out += [("activation_key", .string(f.activationKey)), ("default_activation", .string(f.defaultActivation))]
            out.append(("requirements", .object(f.requirements.map { r in
                switch r {
                case .string(let k, let v): return (k, .string(v))
                case .number(let k, let v): return (k, .double(v))
                }
            })))
            return out
        }
        func sorted(_ d: [String: String]) -> JSONValue { .object(d.sorted { $0.key < $1.key }.map { ($0.key, .string($0.value)) }) }
        return .object([
            ("comment", "Generated from Sources/SMoECompress/Formats/ModelFamilies.swift; regenerate with SMOE_REGENERATE_GOLDENS=1 swift test --filter ModelFamilyTests"),
            ("families", .array(all.map { f in
                .object([
                    ("family", .string(f.rawValue)), ("display_name", .string(f.displayName)),
                    ("model_types", JSONValue(f.modelTypes)), ("architectures", JSONValue(f.architectures)),
                    ("block", .array(f.block.map { p in
                        switch p {
                        case .word(let w): return .object([("words", JSONValue(w))])
                        case .index(let s): return .object([("index", .string(s))])
                        case .optionalWord(let w): return .object([("words", JSONValue(w)), ("optional", .bool(true))])
                        }
                    })),
                    ("block_pattern", .string(f.blockPattern)), ("router_suffix", .string(f.routerSuffix)),
                    ("expert_type", .string(f.expertType.rawValue)), ("expert_prefix", .string(f.expertPrefix)),
                    ("matrix_names", sorted(f.matrixNames)), ("fused_names", sorted(f.fusedNames)),
                ] + rules(f) + [
                    ("transformers_class", .string(f.transformersClass)), ("encoder_decoder", .bool(f.encoderDecoder)),
                ] + (f.configSection.map { [("config_section", .string($0))] } ?? []))
            })),
        ])
    }
}
