import Foundation

/// How a checkpoint stores its experts.
public enum ExpertLayout: String, Sendable {
    /// One tensor per expert and matrix (`experts.N.w1.weight`, `experts.N.up_proj.weight`).
    case perExpert = "per-expert"
    /// `experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `experts.down_proj` [E, H, I].
    case fused
}

/// The MoE settings read from a model's `config.json`.
public struct SourceModelConfig: Sendable {
    public var family: ModelFamily
    /// Experts per layer the config announces (nil when it does not say).
    public var numExperts: Int?
    public var topK: Int
    public var activation: Activation
    public var routerType: RouterType
    /// Grouped top-k and routed scaling (1, 1 and 1 when the family has none).
    public var numGroups: Int = 1
    public var topKGroups: Int = 1
    public var routedScalingFactor: Float = 1
    /// Blocks numbered at or beyond this are not MoE layers (the family's `layerCountKey`).
    public var layerCount: Int? = nil
    /// The config text, stored verbatim in the checkpoint.
    public var text: String

    /// Maps a Hugging Face `hidden_act` to the tool's activations.
    static func activation(_ name: String, path: String, key: String) throws -> Activation {
        switch name {
        case "silu", "swish": return .silu
        case "relu": return .relu
        case "gelu": return .gelu
        case "gelu_new", "gelu_pytorch_tanh", "gelu_fast": return .gelu_tanh
        case "swiglu_oai": return .swiglu_oai
        default: throw SMoEError.dataset(path, key, "activation \"\(name)\" is not supported (silu, relu, gelu, gelu_new, gelu_pytorch_tanh)")
        }
    }

    /// Parses `config.json`, recognises the family from `model_type` / `architectures` and reads
    /// the MoE settings where the family's table entry says they are.
    public static func parse(_ text: String, path: String) throws -> SourceModelConfig {
        let root = try ConfigFile(text, path: path)
        let modelType = try root.string("model_type")
        let archs = modelType == nil ? try root.strings("architectures") ?? [] : []
        guard let family = ModelFamily.recognise(modelType: modelType, architectures: archs) else {
            let what = modelType.map { "model_type \"\($0)\"" } ?? (archs.isEmpty ? "no model_type or architectures" : "architectures \(archs)")
            throw SMoEError.file(path, "\(what) is not a supported MoE family (\(ModelFamily.modelTypeList))")
        }
        // A multimodal wrapper keeps the MoE keys in its text config.
        let config = try family.configSection.flatMap { try root.section($0) } ?? root
        for r in family.requirements { try config.require(r) }
        let topK: Int
        switch family.topK {
        case .fixed(let k): topK = k
        case .key(let key):
            guard let k = try config.count(key) else { throw SMoEError.dataset(path, config.keyPrefix + key, "missing: the number of experts each token uses") }
            topK = k
        }
        let routerType: RouterType
        switch family.routerType {
        case .fixed(let t): routerType = t
        case .normalisedIf(let key, let d): routerType = try config.bool(key, default: d) ? .softmax_topk_norm : .softmax_topk
        case .sigmoidNormalisedIf(let key, let d): routerType = try config.bool(key, default: d) ? .sigmoid_topk_norm : .sigmoid_topk
        }
        // Grouped top-k and scaling: the keys' values, or the transformers defaults when absent.
        func defaulted(_ k: DefaultedKey) throws -> Double { try config.number(k.key) ?? k.value }
        var numGroups = 1, topKGroups = 1
        if let g = family.groupKeys {
            let n = try config.values[g.groups.key] == nil ? Int(g.groups.value) : config.count(g.groups.key)!
            let t = try config.values[g.topKGroups.key] == nil ? Int(g.topKGroups.value) : config.count(g.topKGroups.key)!
            numGroups = n
            topKGroups = t
            if t > n { throw SMoEError.dataset(path, config.keyPrefix + g.topKGroups.key, "\(t) exceeds \(g.groups.key) \(n)") }
        }
        var scaling: Float = 1
        if let k = family.scalingKey {
            let v = try defaulted(k)
            guard v > 0, Float(v).isFinite else { throw SMoEError.dataset(path, config.keyPrefix + k.key, "must be a positive number, not \(v)") }
            scaling = Float(v)
        }
        let act = try family.fixedActivation?.rawValue ?? config.string(family.activationKey) ?? family.defaultActivation
        // The expert count under every name transformers 4.x and 5.x write: all present must agree.
        var numExperts: (key: String, value: Int)? = nil
        for key in family.numExpertsKeys {
            guard let n = try config.count(key) else { continue }
            if let first = numExperts, first.value != n {
                throw SMoEError.dataset(path, config.keyPrefix + key, "is \(n) but \(first.key) is \(first.value): two expert counts (transformers reads both names as one setting)")
            }
            numExperts = numExperts ?? (key, n)
        }
        return SourceModelConfig(family: family, numExperts: numExperts?.value, topK: topK,
                                 activation: try activation(act, path: path, key: config.keyPrefix + family.activationKey),
                                 routerType: routerType, numGroups: numGroups, topKGroups: topKGroups,
                                 routedScalingFactor: scaling, layerCount: try family.layerCountKey.flatMap { try config.count($0) },
                                 text: text)
    }
}

/// The top-level keys of a model's `config.json`, read with their types and ranges checked:
/// every problem is one error naming the file and the key. Duplicate keys are refused
/// (transformers takes the last one, a first-wins reader the first: neither is safe to guess).
struct ConfigFile {
    let path: String
    let values: [String: JSONValue]
    /// `text_config.` for the keys of a nested section (messages name the key by its path).
    var keyPrefix = ""
    /// Largest expert count or top-k accepted. A stated limit: published MoE models have at most
    /// a few hundred experts per layer, and 2^20 keeps every later count × size product far from
    /// overflow.
    static let countLimit = 1 << 20

    init(_ text: String, path: String) throws {
        let json: JSONValue
        do { json = try JSONValue.parse(text) } catch let e as SMoEError { throw SMoEError.file(path, e.message) }
        guard case .object(let kv) = json else { throw SMoEError.file(path, "is not a JSON object") }
        if let key = json.firstDuplicateKey() {
            throw SMoEError.dataset(path, key, "appears twice (a duplicate key is ambiguous: transformers takes the last)")
        }
        self.path = path
        values = Dictionary(uniqueKeysWithValues: kv)
    }

    init(path: String, values: [String: JSONValue], keyPrefix: String) {
        self.path = path
        self.values = values
        self.keyPrefix = keyPrefix
    }

    /// The object under `key` as a config of its own; nil when the key is absent or null.
    func section(_ key: String) throws -> ConfigFile? {
        guard let v = values[key], v != .null else { return nil }
        guard case .object(let kv) = v else { throw SMoEError.dataset(path, keyPrefix + key, "must be an object, not \(shown(v))") }
        return ConfigFile(path: path, values: Dictionary(kv, uniquingKeysWith: { a, _ in a }), keyPrefix: keyPrefix + key + ".")
    }

    /// A value as written (a number beyond float64, which the parser reads as ±inf, as inf).
    func shown(_ v: JSONValue) -> String {
        if case .double(let d) = v, !d.isFinite { return "\(d)" }
        return v.serialized()
    }

    /// A string value; nil when the key is absent.
    func string(_ key: String) throws -> String? {
        guard let v = values[key] else { return nil }
        guard let s = v.stringValue else { throw SMoEError.dataset(path, keyPrefix + key, "must be a string, not \(shown(v))") }
        return s
    }

    /// A list of strings; nil when the key is absent or null.
    func strings(_ key: String) throws -> [String]? {
        guard let v = values[key], v != .null else { return nil }
        guard let a = v.arrayValue?.compactMap(\.stringValue), a.count == v.arrayValue?.count else {
            throw SMoEError.dataset(path, keyPrefix + key, "must be a list of strings, not \(shown(v))")
        }
        return a
    }

    /// A count (1 ... countLimit, written as an integer); nil when the key is absent.
    func count(_ key: String) throws -> Int? {
        guard let v = values[key] else { return nil }
        guard case .int(let n) = v, n >= 1, n <= ConfigFile.countLimit else {
            throw SMoEError.dataset(path, keyPrefix + key, "must be an integer from 1 to \(ConfigFile.countLimit), not \(shown(v))")
        }
        return n
    }

    /// A finite number; nil when the key is absent.
    func number(_ key: String) throws -> Double? {
        guard let v = values[key] else { return nil }
        guard let d = v.doubleValue, d.isFinite else { throw SMoEError.dataset(path, keyPrefix + key, "must be a finite number, not \(shown(v))") }
        return d
    }

    /// true or false; `default` when the key is absent or null.
    func bool(_ key: String, default d: Bool) throws -> Bool {
        guard let v = values[key] else { return d }
        if case .bool(let b) = v { return b }
        if case .null = v { return d }
        throw SMoEError.dataset(path, keyPrefix + key, "must be true or false, not \(shown(v))")
    }

    /// Checks a value the forward pass needs when the key is present.
    func require(_ r: ConfigRequirement) throws {
        switch r {
        case .string(let key, let want):
            if let s = try string(key), s != want {
                throw SMoEError.dataset(path, keyPrefix + key, "\"\(s)\" routing is not supported (\(want) only)")
            }
        case .number(let key, let want):
            if let f = try number(key), f != want {
                throw SMoEError.dataset(path, keyPrefix + key, "\(f) is not supported (\(want) only)")
            }
        }
    }
}

/// Where one MoE layer's tensors are in the source model.
public struct SourceMoELayer: Sendable {
    public var prefix: String
    public var router: String
    /// The selection bias tensor (families with one).
    public var selectionBias: String? = nil
    /// The router bias tensor (families with one).
    public var routerBias: String? = nil
    /// Per-expert layout: for expert n, matrix role → tensor name.
    public var experts: [[String: String]]
    /// Fused layout: `gate_up` and `down` tensor names.
    public var fused: [String: String]
    public var layout: ExpertLayout
    public var numExperts: Int
    public var dModel: Int
    public var dFF: Int
}

/// What `import` found in a model folder, before anything is written.
public struct ImportPlan: Sendable {
    public var config: SourceModelConfig
    public var layers: [SourceMoELayer]
    /// Every other tensor, copied verbatim to `/dense`.
    public var dense: [String]
    public var layout: ExpertLayout
    /// Suffix of the fused tensors' names ("" or ".weight").
    public var fusedSuffix: String
    public var expertDType: SafetensorsDType
    public var routerDType: SafetensorsDType
    /// dtype of the selection bias tensors (families with one).
    public var selectionBiasDType: SafetensorsDType? = nil
    /// How the experts are quantized (nil: plain floats), and each quantized expert tensor's
    /// scale tensor (FP8 weight → `…_scale_inv`, MXFP4 `…_blocks` → `…_scales`).
    public var encoding: SourceEncoding? = nil
    public var scales: [String: String] = [:]
}

/// Natural order of tensor names: digit runs compare as numbers (`layers.2` < `layers.10`).
public func naturalLess(_ a: String, _ b: String) -> Bool {
    func runs(_ s: String) -> [(Bool, Substring)] {
        var out: [(Bool, Substring)] = []
        var start = s.startIndex
        while start < s.endIndex {
            let digit = s[start].isASCII && s[start].isNumber
            var end = start
            while end < s.endIndex, (s[end].isASCII && s[end].isNumber) == digit { end = s.index(after: end) }
            out.append((digit, s[start..<end]))
            start = end
        }
        return out
    }
    let ra = runs(a), rb = runs(b)
    for (x, y) in zip(ra, rb) where x.1 != y.1 {
        if x.0 && y.0 {
            let xs = x.1.drop { $0 == "0" }, ys = y.1.drop { $0 == "0" }
            if xs.count != ys.count { return xs.count < ys.count }
            if xs != ys { return xs < ys }
            return x.1.count < y.1.count
        }
        return x.1 < y.1
    }
    return ra.count < rb.count
}

/// `smoe-compress import`: a Hugging Face safetensors model folder → smoe-checkpoint.
public enum HFImport {
    /// Reads `config.json` and classifies every tensor: routers and experts of MoE layers,
    /// everything else dense. Fails naming the tensor on an unknown, missing or extra expert.
    /// Steps: the config (`readConfig`), the tensors by role (`ImportPlanner.classify`), each
    /// layer's tensors checked against its router (`ImportPlanner.planLayer`), the one layout,
    /// dtype and encoding of all layers (`ImportPlanner.finish`).
    public static func plan(_ directory: String, model: SafetensorsModel) throws -> ImportPlan {
        let (config, quant, configPath) = try readConfig(directory)
        var planner = ImportPlanner(model: model, config: config, quant: quant, configPath: configPath)
        try planner.classify()
        var layers: [SourceMoELayer] = []
        for (p, name) in planner.selectionBiases.sorted(by: { naturalLess($0.key, $1.key) }) where planner.routers[p] == nil {
            throw SMoEError.dataset(planner.where_(name), name, "selection bias of \(p) but the model has no router \(p).\(config.family.routerSuffix)")
        }
        for (prefix, routerName) in planner.routers.sorted(by: { naturalLess($0.key, $1.key) }) {
            layers.append(try planner.planLayer(prefix, router: routerName))
        }
        return try planner.finish(layers)
    }

    /// The model's `config.json` in `directory`: its family and settings, how its experts are
    /// quantized, and its path.
    static func readConfig(_ directory: String) throws -> (SourceModelConfig, SourceQuantization, path: String) {
        let configPath = directory + "/config.json"
        // A FIFO or device would block or never end; a config.json is a few kilobytes.
        if FileManager.default.fileExists(atPath: configPath) { try requireRegularFile(configPath) }
        if let size = (try? FileManager.default.attributesOfItem(atPath: configPath))?[.size] as? Int, size > 64 << 20 {
            throw SMoEError.file(configPath, "is \(size) bytes: not a model config (more than 64 MiB)")
        }
        guard let data = FileManager.default.contents(atPath: configPath) else {
            throw SMoEError.file(configPath, "missing: import needs the model's config.json to recognise its family")
        }
        guard let text = String(data: data, encoding: .utf8) else { throw SMoEError.file(configPath, "is not UTF-8 text") }
        return (try SourceModelConfig.parse(text, path: configPath), try SourceQuantization.parse(text, path: configPath), configPath)
    }
}

/// The steps of `HFImport.plan`: what it has found so far about a model folder's tensors.
struct ImportPlanner {
    let model: SafetensorsModel
    let config: SourceModelConfig
    let quant: SourceQuantization
    let configPath: String
    var family: ModelFamily { config.family }
    var dir: String { model.directory }

    // The tensors by role (`classify`), keyed by block prefix.
    var routers: [String: String] = [:]
    var selectionBiases: [String: String] = [:]
    var routerBiases: [String: String] = [:]
    var perExpert: [String: [Int: [String: String]]] = [:]
    var fused: [String: [String: String]] = [:]
    var fusedSuffixes = Set<String>()
    var dense: [String] = []
    /// Quantized expert weight → its scale tensor.
    var expertScales: [String: String] = [:]

    // What the layers use (`planLayer`): one of each is supported (`finish`).
    var scaleTypes = Set<SafetensorsDType>()
    var expertDTypes = Set<SafetensorsDType>(), routerDTypes = Set<SafetensorsDType>()
    var layouts = Set<ExpertLayout>()
    var biasDTypes = Set<SafetensorsDType>()

    init(model: SafetensorsModel, config: SourceModelConfig, quant: SourceQuantization, configPath: String) {
        self.model = model
        self.config = config
        self.quant = quant
        self.configPath = configPath
    }

    /// The file holding tensor `name` (the folder when it is not found).
    func where_(_ name: String) -> String { (try? model.locate(name).file.path) ?? dir }

    /// Sorts every tensor by role: routers, their biases, per-expert and fused expert tensors and
    /// their scales, and dense (everything else, blocks at or past `num_hidden_layers` too).
    mutating func classify() throws {
        let roleOf = Dictionary(uniqueKeysWithValues: family.matrixNames.map { ($1, $0) })
        let fusedPart = Dictionary(uniqueKeysWithValues: family.fusedNames.map { ($1, $0) })
        let fusedBiasPart = family.fusedInputMajorInterleaved
            ? Dictionary(uniqueKeysWithValues: family.fusedNames.map { ($1 + "_bias", $0 + "_bias") }) : [:]
        for name in model.names {
            guard let (prefix, rest) = family.splitBlock(name),
                  config.layerCount.map({ count in family.layerNumber(prefix).map { $0 < count } ?? true }) ?? true else {
                dense.append(name)
                continue
            }
            let restText = rest.joined(separator: ".")
            if restText == family.routerSuffix {
                routers[prefix] = name
            } else if restText == family.selectionBiasSuffix {
                selectionBiases[prefix] = name
            } else if restText == family.routerBiasSuffix {
                routerBiases[prefix] = name
            } else if rest[0] == "experts" {
                if let w = quant.weight(ofScale: name) {
                    expertScales[w] = name
                    continue
                }
                if quant == .mxfp4, rest.count == 2, rest[1].hasSuffix("_blocks"), let part = fusedPart[String(rest[1].dropLast("_blocks".count))] {
                    fused[prefix, default: [:]][part] = name
                    continue
                }
                if rest.count == 2, let part = fusedBiasPart[rest[1]] {
                    fused[prefix, default: [:]][part] = name
                    continue
                }
                if rest.count == 2, rest[1].hasSuffix("_blocks") || rest[1].hasSuffix("_scales") {
                    throw SMoEError.dataset(where_(name), name, "MXFP4 tensor, but config.json has no quantization_config with quant_method mxfp4")
                }
                if rest.count <= 3, let part = fusedPart[rest[1]], rest.count == 2 || rest[2] == "weight" {
                    fused[prefix, default: [:]][part] = name
                    fusedSuffixes.insert(rest.count == 3 ? ".weight" : "")
                    continue
                }
                let idText = rest.count > 1 ? family.expertID(rest[1]) : ""
                guard rest.count == 4, rest[3] == "weight", let n = Int(idText), String(n) == idText, let role = roleOf[rest[2]] else {
                    throw SMoEError.dataset(where_(name), name, "unknown expert tensor for \(family.rawValue) (expected \(family.expertTensorName(layer: prefix, expert: 0, matrix: "up")) and the like)")
                }
                if perExpert[prefix, default: [:]][n, default: [:]][role] != nil {
                    throw SMoEError.dataset(where_(name), name, "expert tensor given twice")
                }
                perExpert[prefix, default: [:]][n, default: [:]][role] = name
            } else if rest[0] == family.routerSuffix.split(separator: ".")[0] && rest.count > 1 {
                throw SMoEError.dataset(where_(name), name, "router tensor not supported for \(family.rawValue) (only \(prefix).\(family.routerSuffix))")
            } else {
                dense.append(name)
            }
        }
        for p in Set(perExpert.keys).union(fused.keys).sorted(by: naturalLess) where routers[p] == nil {
            let names = (perExpert[p]?.values.flatMap(\.values) ?? []) + (fused[p]?.values.map { $0 } ?? [])
            let example = names.min(by: naturalLess)!
            throw SMoEError.dataset(where_(example), example, "expert tensor of \(p) but the model has no router \(p).\(family.routerSuffix)")
        }
        if fusedSuffixes.count > 1 {
            throw SMoEError.file(dir, "fused expert tensors are named both with and without .weight")
        }
        for (w, s) in expertScales.sorted(by: { naturalLess($0.key, $1.key) }) where !model.contains(w) {
            throw SMoEError.dataset(where_(s), s, "scale tensor without its weight \(w)")
        }
    }

    /// An expert weight's dtype, checked: a float type, or F8_E4M3 with its block scales.
    mutating func expertType(_ name: String, _ info: SafetensorsTensorInfo) throws -> SafetensorsDType {
        if case .fp8(let bo, let bi) = quant, info.dtype == .F8_E4M3 || expertScales[name] != nil {
            guard let s = expertScales[name] else {
                throw SMoEError.dataset(where_(name), name, "is F8_E4M3 but has no scale tensor \(name)_scale_inv")
            }
            scaleTypes.insert(try QuantizedRead.checkFP8(name, scale: s, model: model, block: (bo, bi)))
            return .F8_E4M3
        }
        if info.dtype == .F8_E4M3 {
            throw SMoEError.dataset(where_(name), name, "is F8_E4M3, but config.json has no quantization_config with quant_method fp8 (its block size)")
        }
        if let s = expertScales[name] { throw SMoEError.dataset(where_(s), s, "scale tensor of \(name), which is \(info.dtype.rawValue), not quantized") }
        return info.dtype
    }

    /// One MoE layer: its router (shape, routing settings), biases and experts checked in the
    /// family's layout.
    mutating func planLayer(_ prefix: String, router routerName: String) throws -> SourceMoELayer {
        let ri = try model.info(routerName)
        let file = where_(routerName)
        guard ri.shape.count == 2, ri.shape[0] >= 1, ri.shape[1] >= 1, ri.dtype.isFloat else {
            throw SMoEError.dataset(file, routerName, "router must be a float matrix [num_experts, d_model], is \(ri.dtype.rawValue) \(ri.shape)")
        }
        let E = ri.shape[0], H = ri.shape[1]
        if let want = config.numExperts, want != E {
            throw SMoEError.dataset(file, routerName, "has \(E) rows but config.json says \(want) experts")
        }
        guard config.topK <= E else {
            throw SMoEError.dataset(configPath, "num_experts_per_tok", "\(config.topK) exceeds the \(E) experts of \(prefix)")
        }
        let routing = LayerConfig(name: prefix, index: 0, numExperts: E, topK: config.topK, dModel: H, dFF: 1,
                                  expertType: family.expertType, activation: config.activation, routerType: config.routerType,
                                  numGroups: config.numGroups, topKGroups: config.topKGroups,
                                  routedScalingFactor: config.routedScalingFactor)
        if let problem = routing.routingProblem {
            throw SMoEError.dataset(configPath, family.groupKeys?.groups.key ?? "num_experts_per_tok", "\(problem) (layer \(prefix))")
        }
        var selectionBias: String? = nil
        if let suffix = family.selectionBiasSuffix {
            guard let b = selectionBiases[prefix] else {
                throw SMoEError.file(dir, "missing tensor \(prefix).\(suffix) (\(family.displayName) routers choose experts with it)")
            }
            let bi = try model.info(b)
            let want = family.selectionBiasRowVector ? [1, E] : [E]
            guard bi.shape == want, bi.dtype.isFloat else {
                throw SMoEError.dataset(where_(b), b, "must be a float vector \(want) (one per router row), is \(bi.dtype.rawValue) \(bi.shape)")
            }
            biasDTypes.insert(bi.dtype)
            selectionBias = b
        }
        routerDTypes.insert(ri.dtype)
        var layer = SourceMoELayer(prefix: prefix, router: routerName, selectionBias: selectionBias, experts: [], fused: [:],
                                   layout: .perExpert, numExperts: E, dModel: H, dFF: 0)
        if let suffix = family.routerBiasSuffix {
            guard let b = routerBiases[prefix] else { throw SMoEError.file(dir, "missing tensor \(prefix).\(suffix)") }
            let bi = try model.info(b)
            guard bi.shape == [E], bi.dtype == ri.dtype else {
                throw SMoEError.dataset(where_(b), b, "must be a [\(E)] vector of the router's dtype \(ri.dtype.rawValue), is \(bi.dtype.rawValue) \(bi.shape)")
            }
            layer.routerBias = b
        }
        if family.fusedInputMajorInterleaved {
            try planInterleavedExperts(&layer)
        } else if let f = fused[prefix] {
            try planFusedExperts(&layer, f)
        } else {
            try planPerExpert(&layer)
        }
        layouts.insert(layer.layout)
        return layer
    }

    /// GPT-OSS: fused input-major interleaved `gate_up_proj` and `down_proj` with their biases,
    /// as floats or MXFP4 blocks.
    mutating func planInterleavedExperts(_ layer: inout SourceMoELayer) throws {
        let prefix = layer.prefix, E = layer.numExperts, H = layer.dModel
        guard let f = fused[prefix], let gu = f["gate_up"], let dn = f["down"], let gb = f["gate_up_bias"], let db = f["down_bias"] else {
            throw SMoEError.file(dir, "\(prefix): \(family.displayName) needs the fused tensors \(["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"].map { "experts." + $0 }.joined(separator: ", "))")
        }
        let gi = try model.info(gu), di = try model.info(dn), gbi = try model.info(gb), dbi = try model.info(db)
        if quant == .mxfp4, gu.hasSuffix("_blocks") || dn.hasSuffix("_blocks") {
            // MXFP4: blocks [E, 2I, H/32, 16] and [E, H, I/32, 16] (out × in), float biases.
            guard gu.hasSuffix("_blocks"), dn.hasSuffix("_blocks"), let gs = expertScales[gu], let ds = expertScales[dn] else {
                throw SMoEError.file(dir, "\(prefix): MXFP4 experts need gate_up_proj_blocks, gate_up_proj_scales, down_proj_blocks and down_proj_scales")
            }
            let (ge, gr, gc) = try QuantizedRead.checkMXFP4(gu, scale: gs, model: model)
            guard ge == E, gc == H, gr >= 2, gr % 2 == 0 else {
                throw SMoEError.dataset(where_(gu), gu, "shape \(gi.shape) is not [\(E), 2·d_ff, \(H / 32), 16] (\(E) router slots, d_model \(H) in groups of 32)")
            }
            let I = gr / 2
            let (de, dr, dc) = try QuantizedRead.checkMXFP4(dn, scale: ds, model: model)
            guard de == E, dr == H, dc == I else {
                throw SMoEError.dataset(where_(dn), dn, "shape \(di.shape) is not [\(E), \(H), \(I / 32), 16] (d_ff \(I) in groups of 32)")
            }
            for (n, i, want) in [(gb, gbi, [E, 2 * I]), (db, dbi, [E, H])] {
                guard i.shape == want, i.dtype.isFloat, i.dtype == gbi.dtype else {
                    throw SMoEError.dataset(where_(n), n, "must be a float [\(want.map(String.init).joined(separator: ", "))] tensor of the other bias's dtype, is \(i.dtype.rawValue) \(i.shape)")
                }
            }
            expertDTypes.insert(.U8)
            scaleTypes.insert(gbi.dtype)
            fusedSuffixes.insert("")
            layer.fused = f
            layer.layout = .fused
            layer.dFF = I
            return
        }
        guard gi.shape.count == 3, gi.shape[0] == E, gi.shape[1] == H, gi.shape[2] >= 2, gi.shape[2] % 2 == 0 else {
            throw SMoEError.dataset(where_(gu), gu, "shape \(gi.shape) is not [\(E), \(H), 2·d_ff] (\(E) router slots, d_model \(H))")
        }
        let I = gi.shape[2] / 2
        for (n, i, want) in [(dn, di, [E, I, H]), (gb, gbi, [E, 2 * I]), (db, dbi, [E, H])] {
            guard i.shape == want else { throw SMoEError.dataset(where_(n), n, "shape \(i.shape) is not \(want)") }
            guard i.dtype == gi.dtype, i.dtype.isFloat else {
                throw SMoEError.dataset(where_(n), n, "dtype \(i.dtype.rawValue) differs from \(gu) (\(gi.dtype.rawValue)) or is not a float type")
            }
        }
        expertDTypes.insert(gi.dtype)
        fusedSuffixes.insert("")
        layer.fused = f
        layer.layout = .fused
        layer.dFF = I
    }

    /// Fused `gate_up` and `down` tensors `f` ([E, 2I, H] and [E, H, I]; Llama-4 input-major).
    mutating func planFusedExperts(_ layer: inout SourceMoELayer, _ f: [String: String]) throws {
        let prefix = layer.prefix, E = layer.numExperts, H = layer.dModel
        if let pe = perExpert[prefix], let any = pe.values.first?.values.first {
            throw SMoEError.dataset(where_(any), any, "per-expert tensor next to fused expert tensors in \(prefix)")
        }
        let suffix = fusedSuffixes.first ?? ""
        guard let gu = f["gate_up"] else { throw SMoEError.file(dir, "missing tensor \(family.fusedTensorName(layer: prefix, part: "gate_up", suffix: suffix))") }
        guard let dn = f["down"] else { throw SMoEError.file(dir, "missing tensor \(family.fusedTensorName(layer: prefix, part: "down", suffix: suffix))") }
        let gi = try model.info(gu), di = try model.info(dn)
        // [E, 2I, H] and [E, H, I]; Llama-4: input-major [E, H, 2I] and [E, I, H].
        let inMajor = family.fusedInputMajorHalves
        let (hAxis, iAxis) = inMajor ? (1, 2) : (2, 1)
        guard gi.shape.count == 3, gi.shape[0] == E, gi.shape[hAxis] == H, gi.shape[iAxis] >= 2, gi.shape[iAxis] % 2 == 0 else {
            throw SMoEError.dataset(where_(gu), gu, "shape \(gi.shape) is not \(inMajor ? "[\(E), \(H), 2·d_ff]" : "[\(E), 2·d_ff, \(H)]") (\(E) router slots, d_model \(H))")
        }
        let I = gi.shape[iAxis] / 2
        guard di.shape == (inMajor ? [E, I, H] : [E, H, I]) else {
            throw SMoEError.dataset(where_(dn), dn, "shape \(di.shape) is not \(inMajor ? [E, I, H] : [E, H, I])")
        }
        let gt = try expertType(gu, gi), dt = try expertType(dn, di)
        guard gt == dt, gt.isFloat || gt == .F8_E4M3 else {
            throw SMoEError.dataset(where_(dn), dn, "dtype \(di.dtype.rawValue) differs from \(gu) (\(gi.dtype.rawValue)) or is not a float type")
        }
        expertDTypes.insert(gt)
        layer.fused = f
        layer.layout = .fused
        layer.dFF = I
    }

    /// One tensor per expert and matrix, for every router slot 0..E-1 and no other.
    mutating func planPerExpert(_ layer: inout SourceMoELayer) throws {
        let prefix = layer.prefix, routerName = layer.router, E = layer.numExperts, H = layer.dModel
        let roles = ["up", "gate", "down"].filter { family.matrixNames[$0] != nil }
        let pe = perExpert[prefix] ?? [:]
        if let extra = pe.keys.filter({ $0 >= E }).min(), let any = pe[extra]!.values.sorted().first {
            throw SMoEError.dataset(where_(any), any, "extra expert \(extra): the router \(routerName) has \(E) slots")
        }
        var I: Int? = nil
        var dtype: SafetensorsDType? = nil
        for n in 0..<E {
            var m: [String: String] = [:]
            for role in roles {
                let want = family.expertTensorName(layer: prefix, expert: n, matrix: role)
                guard let name = pe[n]?[role] else {
                    throw SMoEError.file(dir, "missing expert tensor \(want) (the router \(routerName) has \(E) slots)")
                }
                let info = try model.info(name)
                let i = I ?? (role == "down" ? info.shape.last ?? 0 : info.shape.first ?? 0)
                let shape = role == "down" ? [H, i] : [i, H]
                guard info.shape == shape, i >= 1 else {
                    throw SMoEError.dataset(where_(name), name, "shape \(info.shape) does not match \(shape) (d_model \(H) from the router)")
                }
                let t = try expertType(name, info)
                guard t.isFloat || t == .F8_E4M3, dtype == nil || dtype == t else {
                    throw SMoEError.dataset(where_(name), name, "dtype \(info.dtype.rawValue) differs from the layer's other experts or is not a float type")
                }
                I = i
                dtype = t
                m[role] = name
            }
            layer.experts.append(m)
        }
        expertDTypes.insert(dtype!)
        layer.dFF = I!
    }

    /// The plan of `layers`: one layout, expert dtype, router dtype and selection bias dtype for
    /// all, and the experts' encoding.
    func finish(_ planned: [SourceMoELayer]) throws -> ImportPlan {
        var layers = planned
        guard !layers.isEmpty else {
            throw SMoEError.file(dir, "no MoE layers found for \(family.rawValue) (no tensor named like \(family.blockPattern).\(family.routerSuffix))")
        }
        guard layouts.count == 1, expertDTypes.count == 1, routerDTypes.count == 1 else {
            throw SMoEError.file(dir, "MoE layers differ in expert layout or dtype (\(layouts.map(\.rawValue).sorted()), experts \(expertDTypes.map(\.rawValue).sorted()), routers \(routerDTypes.map(\.rawValue).sorted())); one of each is supported")
        }
        if biasDTypes.count > 1 {
            throw SMoEError.file(dir, "selection bias tensors differ in dtype (\(biasDTypes.map(\.rawValue).sorted())); one is supported")
        }
        layers.sort { family.blockLess($0.prefix, $1.prefix) }
        var encoding: SourceEncoding? = nil
        switch (quant, expertDTypes.first!) {
        case (.fp8(let bo, let bi), .F8_E4M3):
            guard scaleTypes.count == 1 else {
                throw SMoEError.file(dir, "expert scale tensors differ in dtype (\(scaleTypes.map(\.rawValue).sorted())); one is supported")
            }
            encoding = .fp8Block(rows: bo, cols: bi, scaleType: scaleTypes.first!)
        case (.mxfp4, .U8):
            guard scaleTypes.count == 1 else {
                throw SMoEError.file(dir, "expert bias tensors differ in dtype (\(scaleTypes.map(\.rawValue).sorted())); one is supported")
            }
            encoding = .mxfp4(biasType: scaleTypes.first!)
        default: break
        }
        return ImportPlan(config: config, layers: layers, dense: dense, layout: layouts.first!,
                          fusedSuffix: fusedSuffixes.first ?? ".weight", expertDType: expertDTypes.first!, routerDType: routerDTypes.first!,
                          selectionBiasDType: biasDTypes.first, encoding: encoding,
                          scales: expertScales.filter { w, _ in layers.contains { $0.fused.values.contains(w) || $0.experts.contains { $0.values.contains(w) } } })
    }
}

extension HFImport {

    /// Reads one MoE layer of the plan.
    public static func readLayer(_ src: SourceMoELayer, index: Int, plan: ImportPlan, model: SafetensorsModel) throws -> MoELayer {
        let c = plan.config
        let E = src.numExperts, H = src.dModel, I = src.dFF
        let config = LayerConfig(name: src.prefix, index: index, numExperts: E, topK: c.topK, dModel: H, dFF: I,
                                 expertType: c.family.expertType, activation: c.activation, routerType: c.routerType,
                                 numGroups: c.numGroups, topKGroups: c.topKGroups, routedScalingFactor: c.routedScalingFactor)
        func finite(_ v: [Float], _ name: String) throws -> [Float] {
            if let i = v.firstIndex(where: { !$0.isFinite }) {
                throw SMoEError.dataset(try model.locate(name).file.path, name, "contains \(v[i].isNaN ? "NaN" : "Inf") at flat index \(i)")
            }
            return v
        }
        // An expert tensor as float32 in transformers' module layout (dequantized when quantized).
        func expert(_ name: String) throws -> [Float] {
            guard let scale = plan.scales[name], let enc = plan.encoding else { return try finite(try model.floats(name), name) }
            switch enc {
            case .fp8Block(let bo, let bi, _): return try finite(try QuantizedRead.fp8(name, scale: scale, model: model, block: (bo, bi)), name)
            case .mxfp4: return try finite(try QuantizedRead.mxfp4(name, scale: scale, model: model), name)
            }
        }
        let router = Matrix(rows: E, cols: H, data: try finite(try model.floats(src.router), src.router))
        let routerBias = try src.routerBias.map { try finite(try model.floats($0), $0) }
        var experts: [Expert] = []
        switch src.layout {
        case .fused where c.family.fusedInputMajorInterleaved:
            // [E, H, 2I] input-major, gate even / up odd along the last axis; [E, I, H]; biases.
            let gu = try expert(src.fused["gate_up"]!)
            let dn = try expert(src.fused["down"]!)
            let gb = try finite(try model.floats(src.fused["gate_up_bias"]!), src.fused["gate_up_bias"]!)
            let db = try finite(try model.floats(src.fused["down_bias"]!), src.fused["down_bias"]!)
            for e in 0..<E {
                var gate = Matrix(rows: I, cols: H), up = Matrix(rows: I, cols: H), down = Matrix(rows: H, cols: I)
                let base = e * H * 2 * I
                for h in 0..<H {
                    for i in 0..<I {
                        gate.data[i * H + h] = gu[base + h * 2 * I + 2 * i]
                        up.data[i * H + h] = gu[base + h * 2 * I + 2 * i + 1]
                    }
                }
                for i in 0..<I { for h in 0..<H { down.data[h * I + i] = dn[e * I * H + i * H + h] } }
                let b = Array(gb[(e * 2 * I)..<((e + 1) * 2 * I)])
                experts.append(Expert(up: up, gate: gate, down: down, upBias: stride(from: 1, to: 2 * I, by: 2).map { b[$0] },
                                      downBias: Array(db[(e * H)..<((e + 1) * H)]), gateBias: stride(from: 0, to: 2 * I, by: 2).map { b[$0] }))
            }
        case .perExpert:
            for m in src.experts {
                func mat(_ role: String) throws -> Matrix? {
                    guard let name = m[role] else { return nil }
                    let (r, cc) = role == "down" ? (H, I) : (I, H)
                    return Matrix(rows: r, cols: cc, data: try expert(name))
                }
                experts.append(Expert(up: try mat("up")!, gate: try mat("gate"), down: try mat("down")!))
            }
        case .fused:
            let gu = try expert(src.fused["gate_up"]!)
            let dn = try expert(src.fused["down"]!)
            let per = I * H
            if c.family.fusedInputMajorHalves {
                // [E, H, 2I]: column i of expert e's block is gate row i, column I + i up row i;
                // [E, I, H]: down transposed.
                for e in 0..<E {
                    var gate = Matrix(rows: I, cols: H), up = Matrix(rows: I, cols: H), down = Matrix(rows: H, cols: I)
                    let base = e * 2 * per
                    for h in 0..<H {
                        for i in 0..<I {
                            gate.data[i * H + h] = gu[base + h * 2 * I + i]
                            up.data[i * H + h] = gu[base + h * 2 * I + I + i]
                        }
                    }
                    for i in 0..<I { for h in 0..<H { down.data[h * I + i] = dn[e * per + i * H + h] } }
                    experts.append(Expert(up: up, gate: gate, down: down))
                }
                break
            }
            for e in 0..<E {
                let base = e * 2 * per
                experts.append(Expert(up: Matrix(rows: I, cols: H, data: Array(gu[(base + per)..<(base + 2 * per)])),
                                      gate: Matrix(rows: I, cols: H, data: Array(gu[base..<(base + per)])),
                                      down: Matrix(rows: H, cols: I, data: Array(dn[(e * per)..<((e + 1) * per)]))))
            }
        }
        let bias = try src.selectionBias.map { try finite(try model.floats($0), $0) }
        return MoELayer(config: config, router: router, routerBias: routerBias, selectionBias: bias, experts: experts)
    }

    /// The stored float type of routers and experts for `--dtype` (auto: float16 stays float16 and
    /// bfloat16 stays bfloat16 when router and experts share that type; anything else becomes
    /// float32, which holds bfloat16 and float16 exactly).
    public static func storage(for dtype: StorageChoice, source: SafetensorsDType, router: SafetensorsDType = .F16) -> StorageType {
        dtype.resolved(keeping: source != router ? nil : source == .F16 ? .f16 : source == .BF16 ? .bf16 : nil)
    }

    /// Imports `directory` into the checkpoint `output`, one tensor / one MoE layer at a time.
    /// `keepFP8`: a block-scaled FP8 release's expert matrices are stored as FP8 with their
    /// blocks (docs/FORMAT.md §1, one byte per weight plus the scales) instead of dequantized
    /// to floats, with exactly the release's values.
    @discardableResult
    public static func run(directory: String, output: String, dtype: StorageChoice = .auto, keepFP8: Bool = false,
                           progress: ProgressCallback? = nil) throws -> ImportReport {
        let model = try SafetensorsModel(directory)
        try ensureOutputDiffers(output, from: model.files.map(\.path) + [directory + "/config.json"] + (model.indexPath.map { [$0] } ?? []))
        let plan = try plan(directory, model: model)
        let stored = storage(for: dtype, source: plan.expertDType, router: plan.routerDType)
        var kept: ExpertEncoding = .float
        if keepFP8 {
            guard case .fp8Block(let bo, let bi, _) = plan.encoding else {
                throw SMoEError.setting(.keepFP8, "the experts of \(directory) are \(plan.expertDType.rawValue), not block-scaled FP8: there are no FP8 codes to keep")
            }
            // Per-expert tensors are [out, in] like the checkpoint's matrices, so their scale
            // blocks are the checkpoint's; fused stacks run their blocks along other axes.
            guard plan.layout == .perExpert else {
                throw SMoEError.setting(.keepFP8, "the FP8 experts of \(directory) are fused tensors, whose scale blocks do not follow the checkpoint's [out, in] matrices; import without it to store them dequantized")
            }
            kept = .fp8Block(rows: bo, cols: bi)
        }
        var entry: [(String, JSONValue)] = [
            ("stage", "import"), ("source", .string(directory)), ("family", .string(plan.config.family.rawValue)),
            ("layout", .string(plan.layout.rawValue)),
        ]
        if plan.layout == .fused { entry.append(("fused_suffix", .string(plan.fusedSuffix))) }
        entry += [
            ("expert_dtype", .string(plan.expertDType.rawValue)), ("router_dtype", .string(plan.routerDType.rawValue)),
        ]
        if let b = plan.selectionBiasDType { entry.append(("selection_bias_dtype", .string(b.rawValue))) }
        if let e = plan.encoding { entry.append(("source_encoding", e.json)) }
        entry += [
            ("stored_dtype", .string(stored.rawValue)),
        ] + (kept.isFP8 ? [("expert_encoding", .string(kept.description))] : []) + [
            ("metadata", .object(model.metadata.map { ($0.0, .string($0.1)) })),
            ("tool", .string(smoeCompressVersion)),
        ]
        let writer = try CheckpointWriter(destination: output, architecture: plan.config.family.rawValue, history: [],
                                          entry: .object(entry), sourceConfig: plan.config.text,
                                          options: WriteOptions(dtype: stored, exactFP8: keepFP8))
        let total = plan.layers.count + plan.dense.count
        var done = 0
        var configs: [LayerConfig] = []
        for (i, src) in plan.layers.enumerated() {
            progress?("import \(src.prefix)", done, total)
            var layer = try readLayer(src, index: i, plan: plan, model: model)
            // Kept exactly (`exactFP8`): the writer's quantizer keeps a block's scale when a scale
            // represents the block (FP8Block.quantize); a release's largest code per block is 448,
            // so its codes and scales are stored as they are.
            layer.expertEncoding = kept
            try writer.write(layer)
            configs.append(layer.config)
            done += 1
        }
        var denseBytes = 0
        if !plan.dense.isEmpty {
            let g = try writer.root.createGroup("dense")
            for name in plan.dense {
                if done % 16 == 0 { progress?("import dense", done, total) }
                let (file, info) = try model.locate(name)
                let parts = name.split(separator: "/", omittingEmptySubsequences: false)
                guard !parts.contains(where: { $0.isEmpty || $0 == "." || $0 == ".." }) else {
                    throw SMoEError.dataset(file.path, name, "tensor name cannot be stored as an HDF5 path")
                }
                _ = try file.withBytes(name) { try g.writeRaw(name, type: info.dtype.rawType, shape: info.shape, bytes: $0) }
                denseBytes += info.byteCount
                done += 1
            }
        }
        try writer.commit()
        return ImportReport(output: output, plan: plan, stored: stored, layers: configs, denseCount: plan.dense.count, denseBytes: denseBytes,
                            expertEncoding: kept)
    }
}

/// What `import` wrote.
public struct ImportReport: Sendable {
    public var output: String
    public var plan: ImportPlan
    public var stored: StorageType
    public var layers: [LayerConfig]
    public var denseCount: Int
    public var denseBytes: Int
    /// How the expert matrices were stored: floats, or the release's FP8 blocks (`keepFP8`).
    public var expertEncoding: ExpertEncoding = .float

    public var json: JSONValue {
        .object([
            ("output", .string(output)), ("family", .string(plan.config.family.rawValue)), ("layout", .string(plan.layout.rawValue)),
            ("expert_dtype", .string(plan.expertDType.rawValue)), ("stored_dtype", .string(stored.rawValue)),
            ("expert_encoding", .string(expertEncoding.description)),
            ("source_encoding", plan.encoding?.json ?? .null),
            ("layers", .array(layers.map { c in
                .object([("name", .string(c.name)), ("index", .int(c.index)), ("num_experts", .int(c.numExperts)),
                         ("top_k", .int(c.topK)), ("d_model", .int(c.dModel)), ("d_ff", .int(c.dFF)),
                         ("expert_type", .string(c.expertType.rawValue)), ("activation", .string(c.activation.rawValue)),
                         ("router_type", .string(c.routerType.rawValue))])
            })),
            ("dense_tensors", .int(denseCount)), ("dense_bytes", .int(denseBytes)),
        ])
    }
}
