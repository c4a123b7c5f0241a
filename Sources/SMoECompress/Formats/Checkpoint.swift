import Foundation

/// The highest `format_version` this build reads and the one it writes.
public let smoeFormatVersion = 1

/// Opens an smoe-h5 file and checks its `format` attribute (and version).
func openSMoEFile(_ path: String, expecting format: String) throws -> H5File {
    let f = try H5File.open(path)
    let root = f.root
    guard root.hasAttribute("format") else {
        throw SMoEError.dataset(path, "/@format", "missing attribute: not an smoe-h5 file (expected format \"\(format)\")")
    }
    let got = try root.stringAttribute("format")
    guard got == format else {
        throw SMoEError.dataset(path, "/@format", "is \"\(got)\", expected \"\(format)\"")
    }
    if root.hasAttribute("format_version") {
        let v = try root.intAttribute("format_version")
        if v > smoeFormatVersion || v < 1 {
            throw SMoEError.dataset(path, "/@format_version", "version \(v) is not readable by this tool (reads 1...\(smoeFormatVersion))")
        }
    } else {
        throw SMoEError.dataset(path, "/@format_version", "missing attribute")
    }
    return f
}

/// Detects the kind of an smoe-h5 file from its `format` attribute.
public func smoeFileKind(_ path: String) throws -> String {
    let f = try H5File.open(path)
    guard f.root.hasAttribute("format") else {
        throw SMoEError.dataset(path, "/@format", "missing attribute: not an smoe-h5 file")
    }
    return try f.root.stringAttribute("format")
}

/// How one expert matrix (up, gate or down) is stored in a layer.
public struct StoredMatrixInfo: Sendable {
    public var name: String
    public var out: Int
    public var inFeatures: Int
    /// nil when dense; per stored expert ranks when factored.
    public var ranks: [Int]?
    public var nnz: [Int]?
    /// The float type of the matrix (of an FP8 matrix: the layer's router, the file's float type).
    public var storage: StorageType
    /// Bytes the datasets occupy in the file (an FP8 matrix's scales included).
    public var fileBytes: Int
    /// Dense floats, or block-scaled FP8 (`experts/<m>` float8 bytes, `experts/<m>_scale`).
    public var encoding: ExpertEncoding = .float
}

/// What `inspect` and the stages need to know of a layer without reading its weights.
public struct LayerSummary: Sendable {
    public var config: LayerConfig
    public var numStored: Int
    public var hasExpertMap: Bool
    public var hasRouterBias: Bool
    public var hasUpBias: Bool
    public var hasDownBias: Bool
    public var matrices: [StoredMatrixInfo]
    /// Numbers stored for the experts (matrices, factors, CSR values and biases).
    public var expertParameters: Int
    /// Bytes the experts occupy on disk (datasets' storage sizes, CSR indices included).
    public var expertFileBytes: Int
    public var routerParameters: Int

    public var isCompressed: Bool { matrices.contains { $0.ranks != nil } }
}

/// Reads an smoe-checkpoint file (FORMAT.md §1) one MoE layer at a time.
public final class CheckpointReader: @unchecked Sendable {
    public let path: String
    public let file: H5File
    public let architecture: String
    /// The `history` attribute, a JSON array (empty when absent).
    public let history: [JSONValue]
    public let sourceConfig: String?
    /// Layers in `index` order.
    public let layers: [LayerConfig]

    public init(_ path: String) throws {
        self.path = path
        file = try openSMoEFile(path, expecting: "smoe-checkpoint")
        let root = file.root
        architecture = (try? root.stringAttribute("architecture")) ?? "unknown"
        if root.hasAttribute("history") {
            let text = try root.stringAttribute("history")
            guard let h = try? JSONValue.parse(text), let arr = h.arrayValue else {
                throw SMoEError.dataset(path, "/@history", "is not a JSON array")
            }
            history = arr
        } else {
            history = []
        }
        sourceConfig = root.hasAttribute("source_config") ? try root.stringAttribute("source_config") : nil
        guard root.isGroup("moe_layers") else { throw SMoEError.dataset(path, "/moe_layers", "missing group") }
        let g = try root.openGroup("moe_layers")
        var configs: [LayerConfig] = []
        for name in try g.childNames() {
            configs.append(try Self.readConfig(try g.openGroup(name), name: name))
        }
        configs.sort { ($0.index, $0.name) < ($1.index, $1.name) }
        layers = configs
    }

    static func readConfig(_ g: H5Group, name: String) throws -> LayerConfig {
        func enumAttr<T: RawRepresentable>(_ key: String, _ type: T.Type) throws -> T where T.RawValue == String {
            let s = try g.stringAttribute(key)
            guard let v = T(rawValue: s) else {
                throw SMoEError.dataset(g.file.path, "\(g.path)@\(key)", "unknown value \"\(s)\"")
            }
            return v
        }
        // Routing extensions (absent in older files: no groups, no scaling).
        let groups = g.hasAttribute("n_group") ? try g.intAttribute("n_group") : 1
        let topKGroups = g.hasAttribute("topk_group") ? try g.intAttribute("topk_group") : 1
        let scaling = g.hasAttribute("routed_scaling_factor") ? Float(try g.doubleAttribute("routed_scaling_factor")) : 1
        let c = LayerConfig(
            name: name, index: try g.intAttribute("index"), numExperts: try g.intAttribute("num_experts"),
            topK: try g.intAttribute("top_k"), dModel: try g.intAttribute("d_model"), dFF: try g.intAttribute("d_ff"),
            expertType: try enumAttr("expert_type", ExpertType.self),
            activation: try enumAttr("activation", Activation.self),
            routerType: try enumAttr("router_type", RouterType.self),
            numGroups: groups, topKGroups: topKGroups, routedScalingFactor: scaling)
        let bad: String? =
            c.numExperts < 1 ? "num_experts must be at least 1"
            : (c.topK < 1 || c.topK > c.numExperts) ? "top_k \(c.topK) outside 1...\(c.numExperts)"
            : (c.dModel < 1 || c.dFF < 1) ? "d_model and d_ff must be positive"
            : checkedProduct([c.numExperts, c.dModel, c.dFF, 3 * 8]) == nil ? "num_experts × d_model × d_ff overflows (damaged file?)"
            : c.activation == .swiglu_oai && c.expertType != .glu ? "activation swiglu_oai needs glu experts"
            : c.routingProblem
        if let b = bad { throw SMoEError.dataset(g.file.path, g.path, b) }
        return c
    }

    public func config(_ name: String) throws -> LayerConfig {
        guard let c = layers.first(where: { $0.name == name }) else {
            throw SMoEError.dataset(path, "/moe_layers/\(name)", "no such MoE layer")
        }
        return c
    }

    func layerGroup(_ name: String) throws -> H5Group {
        try file.root.openGroup("moe_layers/\(name)")
    }

    public var hasDense: Bool { file.root.isGroup("dense") }

    /// The stored float type of the first layer's expert weights (f16, f32, ...).
    public func expertStorage() throws -> StorageType {
        guard let first = layers.first else { return .f32 }
        return try summary(first.name).matrices.first?.storage ?? .f32
    }

    /// Names and bytes of the `/dense` tensors.
    public func denseSummary() throws -> (count: Int, parameters: Int, bytes: Int) {
        guard hasDense else { return (0, 0, 0) }
        var count = 0, params = 0, bytes = 0
        func walk(_ g: H5Group) throws {
            for n in try g.childNames() {
                if g.isGroup(n) { try walk(try g.openGroup(n)) } else if g.isDataset(n) {
                    let d = try g.openDataset(n)
                    count += 1
                    params = saturatingSum(params, try d.checkedElementCount())
                    bytes = saturatingSum(bytes, d.storageBytes)
                }
            }
        }
        try walk(try file.root.openGroup("dense"))
        return (count, params, bytes)
    }

    /// Summary of a layer from shapes and attributes only.
    public func summary(_ name: String) throws -> LayerSummary {
        let c = try config(name)
        let g = try layerGroup(name)
        let eg = try g.openGroup("experts")
        let names = c.expertType == .glu ? ["up", "gate", "down"] : ["up", "down"]
        var mats: [StoredMatrixInfo] = []
        var numStored = -1
        var params = 0, bytes = 0
        for m in names {
            let (out, inn) = m == "down" ? (c.dModel, c.dFF) : (c.dFF, c.dModel)
            if eg.isDataset(m) {
                let d = try eg.openDataset(m)
                numStored = d.shape.first ?? 0
                params = saturatingSum(params, try d.checkedElementCount())
                var fileBytes = d.storageBytes, storage = d.storage ?? .f32, encoding = ExpertEncoding.float
                if d.rawElementType == .f8_e4m3 {
                    let block = try FP8ExpertMatrix.block(of: d)
                    encoding = .fp8Block(rows: block.rows, cols: block.cols)
                    if eg.isDataset(m + "_scale") { fileBytes = saturatingSum(fileBytes, try eg.openDataset(m + "_scale").storageBytes) }
                    storage = (try? g.openDataset("router/weight").storage ?? .f32) ?? .f32
                }
                bytes = saturatingSum(bytes, fileBytes)
                mats.append(StoredMatrixInfo(name: m, out: out, inFeatures: inn, ranks: nil, nnz: nil,
                                             storage: storage, fileBytes: fileBytes, encoding: encoding))
            } else if eg.isGroup(m) {
                let mg = try eg.openGroup(m)
                let count = try mg.childNames().count
                numStored = count
                var ranks: [Int] = [], nnzs: [Int] = [], mb = 0
                var st = StorageType.f32
                for e in 0..<count {
                    let sg = try mg.openGroup(String(e))
                    for part in ["U", "V", "S_indptr", "S_indices", "S_values"] {
                        let d = try sg.openDataset(part)
                        mb = saturatingSum(mb, d.storageBytes)
                        if part != "S_indptr" && part != "S_indices" { params = saturatingSum(params, try d.checkedElementCount()) }
                        if part == "U" { st = d.storage ?? .f32 }
                    }
                    ranks.append(try sg.intAttribute("rank"))
                    nnzs.append(try sg.intAttribute("nnz"))
                }
                bytes = saturatingSum(bytes, mb)
                mats.append(StoredMatrixInfo(name: m, out: out, inFeatures: inn, ranks: ranks, nnz: nnzs, storage: st, fileBytes: mb))
            } else {
                throw SMoEError.dataset(path, "\(eg.path)/\(m)", "missing dataset")
            }
        }
        var hasUB = false, hasDB = false
        for b in ["up_bias", "down_bias"] where eg.isDataset(b) {
            let d = try eg.openDataset(b)
            params = saturatingSum(params, try d.checkedElementCount())
            bytes = saturatingSum(bytes, d.storageBytes)
            if b == "up_bias" { hasUB = true } else { hasDB = true }
        }
        return LayerSummary(
            config: c, numStored: max(numStored, 0), hasExpertMap: g.isDataset("expert_map"),
            hasRouterBias: g.isDataset("router/bias"), hasUpBias: hasUB, hasDownBias: hasDB, matrices: mats,
            expertParameters: params, expertFileBytes: bytes, routerParameters: c.numExperts * c.dModel)
    }

    /// Reads and validates a whole MoE layer.
    public func readLayer(_ name: String) throws -> MoELayer {
        try layerSource(name).whole()
    }

    /// A MoE layer with its router, bias, expert map and shapes read and validated, whose dense
    /// experts are read one at a time when asked for (`LayerSource`); factored experts (small)
    /// are read here. Non-finite numbers are refused as each part is read, naming the dataset.
    public func layerSource(_ name: String) throws -> LayerSource {
        let c = try config(name)
        let g = try layerGroup(name)
        let file = path
        let (router, routerBias, selectionBias) = try readRouter(g, c)
        let eg = try g.openGroup("experts")
        let names = c.expertType == .glu ? ["up", "gate", "down"] : ["up", "down"]
        let (dense, factored, gCount, encoding) = try openExpertMatrices(eg, c, names)
        let biases = try readExpertBiases(eg, c, count: gCount)
        let expertMap = try readExpertMap(g, c, count: gCount)
        var header = MoELayer(config: c, router: router, routerBias: routerBias, selectionBias: selectionBias, experts: [], expertMap: expertMap)
        header.expertEncoding = encoding
        let (parameters, flops) = Self.expertSizes(c, names, factored: factored, biases: biases, count: gCount)
        return LayerSource(header: header, parameters: parameters, flops: flops) { e in
            func op(_ m: String) throws -> LinearOp? {
                if let ops = factored[m] { return ops[e] }
                guard let d = dense[m] else { return nil }
                let (out, inn) = m == "down" ? (c.dModel, c.dFF) : (c.dFF, c.dModel)
                let v = try d.read(e)
                try Self.checkFinite(v, d.data, file: file, offset: e * out * inn)
                return .dense(Matrix(rows: out, cols: inn, data: v))
            }
            return Expert(up: try op("up")!, gate: try op("gate"), down: try op("down")!,
                          upBias: biases.up?[e], downBias: biases.down?[e], gateBias: biases.gate?[e])
        }
    }

    /// Refuses a dataset whose shape is not `shape`.
    static func checkShape(_ d: H5Dataset, _ shape: [Int], file: String) throws {
        guard d.shape == shape else {
            throw SMoEError.dataset(file, d.path, "shape \(d.shape) does not match the layer (expected \(shape))")
        }
    }

    /// Refuses NaN and Inf in `v`, read from `d`; `offset`: the flat index of v[0] in the dataset.
    static func checkFinite(_ v: [Float], _ d: H5Dataset, file: String, offset: Int = 0) throws {
        if let i = v.firstIndex(where: { !$0.isFinite }) {
            throw SMoEError.dataset(file, d.path, "contains \(v[i].isNaN ? "NaN" : "Inf") at flat index \(offset + i)")
        }
    }

    /// A float vector or matrix of the layer group `g` at `name`, of shape `shape`, checked finite.
    private func readChecked(_ g: H5Group, _ name: String, _ shape: [Int]) throws -> [Float] {
        let d = try g.openDataset(name)
        try Self.checkShape(d, shape, file: path)
        let v = try d.readFloats()
        try Self.checkFinite(v, d, file: path)
        return v
    }

    /// The router weight [E, d_model], its bias and its selection bias ([E] each, when stored).
    private func readRouter(_ g: H5Group, _ c: LayerConfig) throws -> (Matrix, bias: [Float]?, selectionBias: [Float]?) {
        let router = Matrix(rows: c.numExperts, cols: c.dModel, data: try readChecked(g, "router/weight", [c.numExperts, c.dModel]))
        let bias = g.isDataset("router/bias") ? try readChecked(g, "router/bias", [c.numExperts]) : nil
        let selectionBias = g.isDataset("router/selection_bias") ? try readChecked(g, "router/selection_bias", [c.numExperts]) : nil
        return (router, bias, selectionBias)
    }

    /// Each expert matrix `names` of the experts group `eg`: a dense dataset [G, out, in] (opened,
    /// its shape and type checked, read later one expert at a time) or a group of factored
    /// experts 0..G-1 (read here); and G, the same for every matrix.
    private func openExpertMatrices(_ eg: H5Group, _ c: LayerConfig, _ names: [String]) throws
        -> (dense: [String: DenseExpertMatrix], factored: [String: [LinearOp]], count: Int, encoding: ExpertEncoding) {
        let file = path
        var dense: [String: DenseExpertMatrix] = [:]
        var factored: [String: [LinearOp]] = [:]
        var numStored: Int? = nil
        for m in names {
            let (out, inn) = m == "down" ? (c.dModel, c.dFF) : (c.dFF, c.dModel)
            let count: Int
            if eg.isDataset(m) {
                let d = try eg.openDataset(m)
                guard d.shape.count == 3, d.shape[1] == out, d.shape[2] == inn else {
                    throw SMoEError.dataset(file, d.path, "shape \(d.shape) does not match the layer (expected [G, \(out), \(inn)])")
                }
                _ = try d.checkedElementCount()
                if d.rawElementType == .f8_e4m3 {
                    dense[m] = try DenseExpertMatrix(fp8: d, scales: eg, name: m)
                } else {
                    try d.checkFloat()
                    dense[m] = DenseExpertMatrix(data: d)
                }
                count = d.shape[0]
            } else if eg.isGroup(m) {
                let mg = try eg.openGroup(m)
                let n = try mg.childNames().count
                var ops: [LinearOp] = []
                for e in 0..<n {
                    guard mg.isGroup(String(e)) else {
                        throw SMoEError.dataset(file, "\(mg.path)/\(e)", "missing group (factored experts must be numbered 0..G-1)")
                    }
                    ops.append(.factored(try Self.readFactored(try mg.openGroup(String(e)), out: out, inn: inn)))
                }
                factored[m] = ops
                count = n
            } else {
                throw SMoEError.dataset(file, "\(eg.path)/\(m)", "missing dataset")
            }
            if let n = numStored, n != count {
                throw SMoEError.dataset(file, "\(eg.path)/\(m)", "holds \(count) experts but another matrix holds \(n)")
            }
            numStored = count
        }
        let gCount = numStored ?? 0
        guard gCount >= 1 else { throw SMoEError.dataset(file, eg.path, "holds no experts") }
        // One encoding per layer: every matrix FP8 with the same blocks, or none.
        let encodings = names.map { dense[$0]?.encoding ?? .float }
        if let fp8 = encodings.first(where: \.isFP8), let other = zip(names, encodings).first(where: { $0.1 != fp8 }) {
            throw SMoEError.dataset(file, "\(eg.path)/\(other.0)", "is \(other.1), but another expert matrix of the layer is \(fp8) (a layer's matrices share one encoding)")
        }
        return (dense, factored, gCount, encodings.first ?? .float)
    }

    /// The experts' biases, per expert, when stored: `up_bias` and `gate_bias` [G, d_ff],
    /// `down_bias` [G, d_model] (`gate_bias` only for GLU experts).
    private func readExpertBiases(_ eg: H5Group, _ c: LayerConfig, count: Int) throws -> (up: [[Float]]?, down: [[Float]]?, gate: [[Float]]?) {
        func bias(_ n: String, _ len: Int) throws -> [[Float]]? {
            guard eg.isDataset(n) else { return nil }
            let v = try readChecked(eg, n, [count, len])
            return (0..<count).map { Array(v[($0 * len)..<(($0 + 1) * len)]) }
        }
        let ub = try bias("up_bias", c.dFF)
        let db = try bias("down_bias", c.dModel)
        let gb = c.expertType == .glu ? try bias("gate_bias", c.dFF) : nil
        return (ub, db, gb)
    }

    /// The layer's `expert_map` (router slot → stored expert), required when it stores fewer
    /// experts (`count`) than router slots.
    private func readExpertMap(_ g: H5Group, _ c: LayerConfig, count: Int) throws -> [Int]? {
        guard g.isDataset("expert_map") else {
            if count != c.numExperts {
                throw SMoEError.dataset(path, g.path + "/expert_map", "missing, but the layer stores \(count) experts for \(c.numExperts) router slots")
            }
            return nil
        }
        let d = try g.openDataset("expert_map")
        try Self.checkShape(d, [c.numExperts], file: path)
        let m = try d.readInts()
        if let bad = m.firstIndex(where: { $0 < 0 || $0 >= count }) {
            throw SMoEError.dataset(path, d.path, "entry \(bad) = \(m[bad]) is outside the \(count) stored experts")
        }
        return m
    }

    /// Each expert's parameters and FLOPs per token, from the shapes (as `Expert` computes them).
    private static func expertSizes(_ c: LayerConfig, _ names: [String], factored: [String: [LinearOp]],
                                    biases: (up: [[Float]]?, down: [[Float]]?, gate: [[Float]]?), count: Int) -> (parameters: [Int], flops: [Int]) {
        var parameters = [Int](repeating: (biases.up != nil ? c.dFF : 0) + (biases.down != nil ? c.dModel : 0)
                                   + (biases.gate != nil ? c.dFF : 0), count: count)
        var flops = [Int](repeating: 0, count: count)
        for m in names {
            for e in 0..<count {
                let op = factored[m]?[e]
                parameters[e] += op?.parameterCount ?? c.dModel * c.dFF
                flops[e] += op?.flopsPerToken ?? 2 * c.dModel * c.dFF
            }
        }
        return (parameters, flops)
    }

    static func readFactored(_ g: H5Group, out: Int, inn: Int) throws -> LowRankSparse {
        let file = g.file.path
        let ud = try g.openDataset("U"), vd = try g.openDataset("V")
        guard ud.shape.count == 2, ud.shape[0] == out else {
            throw SMoEError.dataset(file, ud.path, "shape \(ud.shape) does not match [\(out), r]")
        }
        let r = ud.shape[1]
        guard vd.shape == [r, inn] else { throw SMoEError.dataset(file, vd.path, "shape \(vd.shape) does not match [\(r), \(inn)]") }
        let u = try ud.readFloats(), v = try vd.readFloats()
        if !u.allSatisfy({ $0.isFinite }) { throw SMoEError.dataset(file, ud.path, "contains NaN or Inf") }
        if !v.allSatisfy({ $0.isFinite }) { throw SMoEError.dataset(file, vd.path, "contains NaN or Inf") }
        let ip = try g.openDataset("S_indptr").readInts()
        let ix = try g.openDataset("S_indices").readInts()
        let sv = try g.openDataset("S_values").readFloats()
        guard ix.allSatisfy({ $0 >= 0 && $0 < Int(Int32.max) }) else {
            throw SMoEError.dataset(file, g.path + "/S_indices", "index out of range")
        }
        let s = CSRMatrix(rows: out, cols: inn, indptr: ip, indices: ix.map { Int32($0) }, values: sv)
        if let why = s.validationError() { throw SMoEError.dataset(file, g.path + "/S_*", "invalid CSR: \(why)") }
        return LowRankSparse(u: Matrix(rows: out, cols: r, data: u), v: Matrix(rows: r, cols: inn, data: v), s: s)
    }
}

/// Options for writing checkpoints.
public struct WriteOptions: Sendable {
    /// Stored float type for weights: `.f32` (default), `.f16` or `.bf16` (uint16 tagged `dtype = "bfloat16"`).
    public var dtype: StorageType = .f32
    /// gzip level with the shuffle filter for expert tensors (nil = uncompressed, faster).
    public var gzip: Int? = nil
    /// FP8 expert matrices must be stored without rounding (their values are FP8 values with
    /// block scales already, as `import --keep-fp8`'s): a block no scale represents exactly is
    /// an error naming the dataset and expert instead of being re-rounded.
    public var exactFP8 = false
    public init(dtype: StorageType = .f32, gzip: Int? = nil, exactFP8: Bool = false) {
        self.dtype = dtype
        self.gzip = gzip
        self.exactFP8 = exactFP8
    }

    /// Checks the options once (`CheckpointWriter` does, before it creates anything).
    public func validate() throws {
        guard dtype == .f32 || dtype == .f16 || dtype == .bf16 else {
            throw SMoEError.setting(.storage, "must be f32, f16 or bf16")
        }
        if let g = gzip, !(0...9).contains(g) { throw SMoEError.setting(.gzip, "must be in 0...9") }
    }
}

/// Writes an smoe-checkpoint to a temporary file, renamed into place by `commit()`.
public final class CheckpointWriter: @unchecked Sendable {
    public let output: AtomicOutput
    let file: H5File
    let layersGroup: H5Group
    public let options: WriteOptions
    private var history: [JSONValue]

    /// - Parameters:
    ///   - history: the source's history; `entry` is appended to it.
    public init(destination: String, architecture: String, history: [JSONValue], entry: JSONValue,
                sourceConfig: String? = nil, options: WriteOptions = WriteOptions()) throws {
        try options.validate()
        output = try AtomicOutput(destination: destination)
        file = try H5File.create(output.temporaryPath)
        self.options = options
        self.history = history + [entry]
        let root = file.root
        try root.setAttribute("format", "smoe-checkpoint")
        try root.setAttribute("format_version", smoeFormatVersion)
        try root.setAttribute("architecture", architecture)
        if let sc = sourceConfig { try root.setAttribute("source_config", sc) }
        layersGroup = try root.createGroup("moe_layers")
    }

    /// Writer for a checkpoint derived from `source`: keeps its architecture, history and
    /// source_config, and copies `/dense` verbatim.
    public convenience init(destination: String, derivedFrom source: CheckpointReader, entry: JSONValue,
                            options: WriteOptions = WriteOptions()) throws {
        try self.init(destination: destination, architecture: source.architecture, history: source.history,
                      entry: entry, sourceConfig: source.sourceConfig, options: options)
        if source.hasDense { try file.copyObject(from: source.file, "/dense", to: "/dense") }
    }

    /// Replaces the history entry this command appends (e.g. once per-layer results are known).
    public func updateEntry(_ entry: JSONValue) { history[history.count - 1] = entry }

    /// The root group (to add `/dense` tensors directly).
    public var root: H5Group { file.root }

    /// A layer's attributes and router (FORMAT.md §1).
    private func writeHeader(_ g: H5Group, _ c: LayerConfig, router: Matrix, bias: [Float]?, selectionBias: [Float]?) throws {
        try g.setAttribute("index", c.index)
        try g.setAttribute("num_experts", c.numExperts)
        try g.setAttribute("top_k", c.topK)
        try g.setAttribute("d_model", c.dModel)
        try g.setAttribute("d_ff", c.dFF)
        try g.setAttribute("expert_type", c.expertType.rawValue)
        try g.setAttribute("activation", c.activation.rawValue)
        try g.setAttribute("router_type", c.routerType.rawValue)
        // Routing extensions, written only when they differ from the plain routing (so files of
        // the original router types are unchanged).
        if c.numGroups != 1 || c.topKGroups != 1 {
            try g.setAttribute("n_group", c.numGroups)
            try g.setAttribute("topk_group", c.topKGroups)
        }
        if c.routedScalingFactor != 1 { try g.setAttribute("routed_scaling_factor", Double(c.routedScalingFactor)) }
        try g.write("router/weight", floats: router.data, shape: [c.numExperts, c.dModel], as: options.dtype)
        if let b = bias { try g.write("router/bias", floats: b, shape: [c.numExperts], as: options.dtype) }
        // float32 always: the selection bias decides the top-k and is float32 in the source models.
        if let b = selectionBias { try g.write("router/selection_bias", floats: b, shape: [c.numExperts], as: .f32) }
    }

    /// Dense experts of a layer written one at a time, in order, and readable back as stored:
    /// a layer that is never whole in memory (`beginDenseExperts`, then `finishDenseLayer`).
    public final class PendingDenseExperts {
        let group: H5Group
        let datasets: [(name: String, data: DenseExpertMatrix)]
        public let count: Int
        public private(set) var written = 0

        init(group: H5Group, datasets: [(name: String, data: DenseExpertMatrix)], count: Int) {
            self.group = group
            self.datasets = datasets
            self.count = count
        }

        /// Stores the next expert (no biases).
        public func write(_ e: Expert) throws {
            precondition(written < count, "more experts than announced")
            for (name, d) in datasets { try d.write(e[matrix: name]!.dense(), at: written) }
            written += 1
        }

        /// Expert `i` as stored (after rounding to the file's float type).
        public func read(_ i: Int) throws -> Expert {
            var m: [String: Matrix] = [:]
            for (name, d) in datasets {
                let (rows, cols) = (d.data.shape[1], d.data.shape[2])
                m[name] = Matrix(rows: rows, cols: cols, data: try d.read(i))
            }
            return Expert(up: m["up"]!, gate: m["gate"], down: m["down"]!)
        }
    }

    /// Starts layer `name` with `count` dense experts [d_ff, d_model] (up, gate when `gated`) and
    /// [d_model, d_ff] (down), chunked one expert per chunk as `write` stores them, in `encoding`.
    public func beginDenseExperts(named name: String, count: Int, dModel: Int, dFF: Int, gated: Bool,
                                  encoding: ExpertEncoding = .float) throws -> PendingDenseExperts {
        let g = try layersGroup.createGroup(name)
        let eg = try g.createGroup("experts")
        var sets: [(name: String, data: DenseExpertMatrix)] = []
        for m in gated ? ["up", "gate", "down"] : ["up", "down"] {
            let (out, inn) = m == "down" ? (dModel, dFF) : (dFF, dModel)
            sets.append((m, try DenseExpertMatrix(creating: m, in: eg, shape: [count, out, inn], options: options, encoding: encoding)))
        }
        return PendingDenseExperts(group: g, datasets: sets, count: count)
    }

    /// Completes a layer begun with `beginDenseExperts`: its attributes and router.
    public func finishDenseLayer(_ pending: PendingDenseExperts, config c: LayerConfig, router: Matrix,
                                 bias: [Float]? = nil, selectionBias: [Float]? = nil) throws -> H5Group {
        guard pending.written == pending.count, c.numExperts == pending.count else {
            throw SMoEError.output(output.destination, pending.group.path, "\(pending.written) of \(pending.count) experts written for \(c.numExperts) slots")
        }
        try writeHeader(pending.group, c, router: router, bias: bias, selectionBias: selectionBias)
        file.flush()
        return pending.group
    }

    /// Writes one MoE layer; returns its group so callers may add attributes.
    @discardableResult
    public func write(_ layer: MoELayer) throws -> H5Group {
        let c = layer.config
        let g = try layersGroup.createGroup(c.name)
        try writeHeader(g, c, router: layer.router, bias: layer.routerBias, selectionBias: layer.selectionBias)
        let dt = options.dtype
        let G = layer.experts.count
        let eg = try g.createGroup("experts")
        let names = c.expertType == .glu ? ["up", "gate", "down"] : ["up", "down"]
        if layer.expertEncoding.isFP8, let f = layer.experts.flatMap(\.namedMatrices).first(where: \.op.isFactored) {
            throw SMoEError.output(output.destination, g.path, "stores FP8 experts, but a \(f.name) matrix is factored (FP8 holds dense matrices only)")
        }
        for m in names {
            let ops = layer.experts.map { $0[matrix: m]! }
            let (out, inn) = m == "down" ? (c.dModel, c.dFF) : (c.dFF, c.dModel)
            if ops.allSatisfy({ !$0.isFactored }) {
                let d = try DenseExpertMatrix(creating: m, in: eg, shape: [G, out, inn], options: options, encoding: layer.expertEncoding)
                for (e, op) in ops.enumerated() { try d.write(op.dense(), at: e) }
            } else {
                let mg = try eg.createGroup(m)
                for (e, op) in ops.enumerated() {
                    let f: LowRankSparse
                    switch op {
                    case .factored(let x): f = x
                    case .dense(let w):
                        // Mixed layer: a matrix left dense is stored as its exact factorisation.
                        f = LowRankSparse.exact(w)
                    }
                    let sg = try mg.createGroup(String(e))
                    try sg.write("U", floats: f.u.data, shape: [out, f.rank], as: dt)
                    try sg.write("V", floats: f.v.data, shape: [f.rank, inn], as: dt)
                    try sg.write("S_indptr", ints: f.s.indptr, shape: [out + 1], as: .i64)
                    try sg.write("S_indices", ints: f.s.indices.map { Int($0) }, shape: [f.s.nnz], as: .i32)
                    try sg.write("S_values", floats: f.s.values, shape: [f.s.nnz], as: dt)
                    try sg.setAttribute("rank", f.rank)
                    try sg.setAttribute("nnz", f.s.nnz)
                }
            }
        }
        try finishLayer(g, c, upBiases: layer.experts.map(\.upBias), downBiases: layer.experts.map(\.downBias),
                        gateBiases: layer.experts.map(\.gateBias), expertMap: layer.expertMap)
        return g
    }

    /// Writes a layer whose experts are read from `source` one at a time, each read once: the
    /// same layer as `write(source.whole())` without the whole layer in memory (docs/ALGORITHM.md
    /// "Scale"). A layer whose experts are factored (small) is read whole and written so.
    @discardableResult
    public func write(_ source: LayerSource) throws -> H5Group {
        if let layer = source.inMemory { return try write(layer) }
        let c = source.config, G = source.numStored
        var next: Expert? = G > 0 ? try source.expert(0) : nil
        if let e = next, e.namedMatrices.contains(where: { $0.op.isFactored }) { return try write(try source.whole()) }
        let pending = try beginDenseExperts(named: c.name, count: G, dModel: c.dModel, dFF: c.dFF, gated: c.expertType == .glu,
                                            encoding: source.header.expertEncoding)
        var upBiases: [[Float]?] = [], downBiases: [[Float]?] = [], gateBiases: [[Float]?] = []
        for i in 0..<G {
            let e = try next ?? source.expert(i)
            next = nil
            if let m = e.namedMatrices.first(where: { $0.op.isFactored }) {
                throw SMoEError.output(output.destination, pending.group.path, "stored expert \(i)'s \(m.name) is factored, expert 0's are dense")
            }
            try pending.write(e)
            upBiases.append(e.upBias)
            downBiases.append(e.downBias)
            gateBiases.append(e.gateBias)
        }
        let g = pending.group
        try writeHeader(g, c, router: source.header.router, bias: source.header.routerBias, selectionBias: source.header.selectionBias)
        try finishLayer(g, c, upBiases: upBiases, downBiases: downBiases, gateBiases: gateBiases, expertMap: source.header.expertMap)
        return g
    }

    /// A layer's biases (zeros for an expert without one, when another has one) and expert map.
    private func finishLayer(_ g: H5Group, _ c: LayerConfig, upBiases: [[Float]?], downBiases: [[Float]?],
                             gateBiases: [[Float]?] = [], expertMap: [Int]?) throws {
        let G = upBiases.count, dt = options.dtype
        if upBiases.contains(where: { $0 != nil }) {
            let v = upBiases.flatMap { $0 ?? [Float](repeating: 0, count: c.dFF) }
            try g.write("experts/up_bias", floats: v, shape: [G, c.dFF], as: dt, chunk: [1, c.dFF])
        }
        if downBiases.contains(where: { $0 != nil }) {
            let v = downBiases.flatMap { $0 ?? [Float](repeating: 0, count: c.dModel) }
            try g.write("experts/down_bias", floats: v, shape: [G, c.dModel], as: dt, chunk: [1, c.dModel])
        }
        if gateBiases.contains(where: { $0 != nil }) {
            let v = gateBiases.flatMap { $0 ?? [Float](repeating: 0, count: c.dFF) }
            try g.write("experts/gate_bias", floats: v, shape: [G, c.dFF], as: dt, chunk: [1, c.dFF])
        }
        if let m = expertMap {
            try g.write("expert_map", ints: m, shape: [c.numExperts], as: .i32)
        } else if G != c.numExperts {
            throw SMoEError.output(output.destination, g.path, "stores \(G) experts for \(c.numExperts) slots without an expert_map")
        }
        file.flush()
    }

    /// Writes the history, closes and renames the file into place.
    public func commit() throws {
        do { try file.root.setAttribute("history", JSONValue.array(history).serialized()) } catch {
            output.discard()
            throw error
        }
        try output.commit(closing: file)
    }
}

extension StorageType {
    /// `x` as it reads back after being stored in this type (float16 and bfloat16 round to
    /// nearest even, as the writer does).
    @inline(__always) public func roundTrip(_ x: Float) -> Float {
        switch self {
        case .f16: return Float(Float16(x))
        case .bf16: return Float(bitPattern: UInt32(bfloat16Bits(x)) << 16)
        default: return x
        }
    }
}

extension MoELayer {
    /// The layer exactly as `CheckpointWriter` with this float type stores it and a reader
    /// reads it back, so in-memory figures (compress's report) describe the written file (dense
    /// expert matrices through FP8 when `expertEncoding` says so).
    public func roundedForStorage(_ type: StorageType) -> MoELayer {
        var out = self
        out.roundForStorage(type)
        return out
    }

    /// `roundedForStorage` in place, one array at a time: a layer held only here is rounded
    /// without a second copy of it (compress's peak, docs/ALGORITHM.md "Scale").
    public mutating func roundForStorage(_ type: StorageType) {
        guard type == .f16 || type == .bf16 || expertEncoding.isFP8 else { return }
        let encoding = expertEncoding
        func r(_ v: inout [Float]) {
            guard type == .f16 || type == .bf16 else { return }
            v.withUnsafeMutableBufferPointer { b in for i in b.indices { b[i] = type.roundTrip(b[i]) } }
        }
        func r(_ v: inout [Float]?) { if v != nil { r(&v!) } }
        func op(_ o: inout LinearOp) {
            switch o {
            case .dense(var w):
                o = .dense(Matrix(rows: 0, cols: 0, data: []))  // drop o's reference so w is unique
                if case .fp8Block(let br, let bc) = encoding {
                    // As the writer quantizes it and the reader dequantizes it (FP8ExpertMatrix).
                    w.data = FP8ExpertMatrix.roundTrip(w, block: (br, bc))
                } else {
                    r(&w.data)
                }
                o = .dense(w)
            case .factored(var f):
                o = .dense(Matrix(rows: 0, cols: 0, data: []))
                r(&f.u.data)
                r(&f.v.data)
                r(&f.s.values)
                o = .factored(f)
            }
        }
        r(&router.data)
        r(&routerBias)
        for i in experts.indices {
            op(&experts[i].up)
            if experts[i].gate != nil { op(&experts[i].gate!) }
            op(&experts[i].down)
            r(&experts[i].upBias)
            r(&experts[i].downBias)
            r(&experts[i].gateBias)
        }
    }
}

/// Block-scaled FP8 expert matrices in a checkpoint (docs/FORMAT.md §1): `experts/<m>` holds
/// float8_e4m3fn bytes [G, out, in] (uint8 tagged `dtype = "float8_e4m3fn"`, attribute
/// `block_size` = [rows, cols]) and `experts/<m>_scale` float32 [G, ⌈out/rows⌉, ⌈in/cols⌉];
/// element (i, j) of expert e = e4m3(q[e, i, j]) · scale[e, i / rows, j / cols], as the FP8
/// releases store their weights (`weight_scale_inv`).
enum FP8ExpertMatrix {
    /// The `block_size` attribute of an FP8 expert dataset.
    static func block(of d: H5Dataset) throws -> (rows: Int, cols: Int) {
        guard d.hasAttribute("block_size") else { throw SMoEError.dataset(d.file.path, d.path + "@block_size", "missing attribute (an FP8 expert matrix names its scale blocks)") }
        let b = try d.intArrayAttribute("block_size")
        guard b.count == 2, b[0] >= 1, b[1] >= 1 else {
            throw SMoEError.dataset(d.file.path, d.path + "@block_size", "is \(b), expected two block sizes ≥ 1")
        }
        return (b[0], b[1])
    }

    /// A matrix as the writer stores it and the reader reads it back: quantized as transformers'
    /// `Fp8Quantize` (float32 scales; a block FP8 already represents is kept), dequantized.
    static func roundTrip(_ w: Matrix, block: (Int, Int)) -> [Float] {
        let q = FP8Block.quantize(w.data, batch: 1, rows: w.rows, cols: w.cols, block: block)
        return q.bytes.withUnsafeBytes { FP8Block.dequantize($0, scales: q.scales, batch: 1, rows: w.rows, cols: w.cols, block: block) }
    }
}

/// One dense expert matrix dataset [G, out, in] of a layer, read and written one expert at a
/// time: floats of the file's type, or FP8 bytes with their block scales.
struct DenseExpertMatrix {
    let data: H5Dataset
    let scales: H5Dataset?
    let encoding: ExpertEncoding

    /// `WriteOptions.exactFP8`.
    var exact = false

    init(data: H5Dataset) {
        self.data = data
        scales = nil
        encoding = .float
    }

    /// An FP8 matrix `name` of the experts group `eg` (`data`), with its scales, checked.
    init(fp8 data: H5Dataset, scales eg: H5Group, name: String) throws {
        let file = data.file.path
        let block = try FP8ExpertMatrix.block(of: data)
        let grid = FP8Block.grid(rows: data.shape[1], cols: data.shape[2], block: block)
        guard eg.isDataset(name + "_scale") else {
            throw SMoEError.dataset(file, "\(eg.path)/\(name)_scale", "missing dataset (the FP8 matrix \(name)'s block scales)")
        }
        let s = try eg.openDataset(name + "_scale")
        try CheckpointReader.checkShape(s, [data.shape[0], grid.0, grid.1], file: file)
        try s.checkFloat()
        self.data = data
        self.scales = s
        encoding = .fp8Block(rows: block.rows, cols: block.cols)
    }

    /// Creates `name` in `eg` for G experts of [out, in] (`shape`), chunked one expert per chunk.
    init(creating name: String, in eg: H5Group, shape: [Int], options: WriteOptions, encoding: ExpertEncoding) throws {
        self.encoding = encoding
        exact = options.exactFP8
        switch encoding {
        case .float:
            data = try eg.createDataset(name, shape: shape, type: options.dtype, chunk: [1, shape[1], shape[2]], gzip: options.gzip)
            scales = nil
        case .fp8Block(let br, let bc):
            data = try eg.createRawDataset(name, type: .f8_e4m3, shape: shape, chunk: [1, shape[1], shape[2]], gzip: options.gzip)
            try data.setAttribute("block_size", [br, bc])
            let (gr, gc) = FP8Block.grid(rows: shape[1], cols: shape[2], block: (br, bc))
            scales = try eg.createDataset(name + "_scale", shape: [shape[0], gr, gc], type: .f32, chunk: [1, gr, gc])
        }
    }

    /// Expert `e` as stored (dequantized for FP8), flat [out · in].
    func read(_ e: Int) throws -> [Float] {
        guard case .fp8Block(let br, let bc) = encoding, let s = scales else { return try data.readFloats(rows: e..<(e + 1)) }
        let q = try data.readRaw(rows: e..<(e + 1))
        let sc = try s.readFloats(rows: e..<(e + 1))
        try CheckpointReader.checkFinite(sc, s, file: s.file.path, offset: e * sc.count)
        return q.withUnsafeBytes { FP8Block.dequantize($0, scales: sc, batch: 1, rows: data.shape[1], cols: data.shape[2], block: (br, bc)) }
    }

    /// Stores `w` as expert `e`.
    func write(_ w: Matrix, at e: Int) throws {
        guard case .fp8Block(let br, let bc) = encoding, let s = scales else { return try data.write(floats: w.data, rows: e..<(e + 1)) }
        let q = FP8Block.quantize(w.data, batch: 1, rows: w.rows, cols: w.cols, block: (br, bc))
        if exact && q.rounded > 0 {
            throw SMoEError.dataset(data.file.path, data.path, "expert \(e): \(q.rounded) block(s) of \(br) × \(bc) are not FP8 values under any float32 scale the writer finds, so they cannot be stored exactly")
        }
        try data.writeRaw(q.bytes, rows: e..<(e + 1))
        try s.write(floats: q.scales, rows: e..<(e + 1))
    }
}
