import Foundation

/// One layer of an smoe-stats file, from attributes and shapes.
public struct StatsLayerInfo: Sendable, Equatable {
    public var name: String
    public var index: Int
    public var numExperts: Int
    /// From the `top_k` attribute, else sum(counts) / num_tokens.
    public var topK: Int
    public var numTokens: Int
    /// Similarity matrices present (names this build does not know are ignored).
    public var bases: [SimilarityBase]
    /// Feature vectors present under `features/`.
    public var featureBases: [SimilarityBase]
}

extension StatsLayerInfo: LayerFileRecord {
    /// As many slots as the model layer's router, and the same top-k.
    public func check(against c: LayerConfig, file: String) throws {
        guard numExperts == c.numExperts else {
            throw SMoEError.dataset(file, "/moe_layers/\(name)/counts", "has \(numExperts) slots but the model's router has \(c.numExperts)")
        }
        guard topK == c.topK else {
            throw SMoEError.dataset(file, "/moe_layers/\(name)@top_k", "is \(topK) but the model's layer has top_k \(c.topK)")
        }
    }
}

/// Writes an smoe-stats file (FORMAT.md §3) to a temporary file renamed on `commit()`.
///
/// Per layer `/moe_layers/<name>/`: attributes `index`, `num_tokens`, `top_k`, `num_experts`;
/// datasets `counts` [E] int64, `frequency` [E] float64, `similarity/<base>` [E, E] float64
/// (`similarity/feature` carries the int64 array attribute `undefined_slots`: the slots never
/// chosen, whose off-diagonal entries are 0), and `features/<base>` [E, d_model] float64 for the
/// bases that compare feature vectors (`feature`, `expert-output`).
public final class StatsWriter: LayerFileWriter, @unchecked Sendable {
    /// - Parameter source: names the model and calibration files (a JSON object as text).
    public init(destination: String, source: String) throws {
        try super.init(destination: destination, format: "smoe-stats", source: source)
    }

    /// The `source` attribute the `stats` command writes: a JSON object naming the inputs.
    public static func source(model: String, calibration: String, bases: [SimilarityBase], maxTokens: Int?) -> String {
        var kv: [(String, JSONValue)] = [
            ("model", .string(model)), ("calibration", .string(calibration)),
            ("tool", .string("smoe-compress \(smoeCompressVersion)")), ("similarity", JSONValue(bases.map(\.rawValue))),
        ]
        if let m = maxTokens { kv.append(("max_tokens", .int(m))) }
        return JSONValue.object(kv).serialized()
    }

    public func write(_ s: LayerStatistics) throws {
        let E = s.numExperts
        let g = try layersGroup.createGroup(s.name)
        try g.setAttribute("index", s.index)
        try g.setAttribute("num_tokens", s.numTokens)
        try g.setAttribute("top_k", s.topK)
        try g.setAttribute("num_experts", E)
        try g.write("counts", ints: s.counts, shape: [E], as: .i64)
        try g.write("frequency", doubles: s.frequency, shape: [E])
        for base in s.bases {
            let m = s.similarity[base]!
            let d = try g.write("similarity/\(base.rawValue)", doubles: m.values, shape: [E, E])
            if base == .feature { try d.setAttribute("undefined_slots", s.neverChosen) }
        }
        for base in s.features.keys.sorted() {
            let m = s.features[base]!
            try g.write("features/\(base.rawValue)", doubles: m.values, shape: [m.rows, m.cols])
        }
        file.flush()
    }
}

/// Reads an smoe-stats file (FORMAT.md §3).
public final class StatsReader: LayerFileReader<StatsLayerInfo>, @unchecked Sendable {
    public init(_ path: String) throws {
        try super.init(path, expecting: "smoe-stats", kind: "statistics file", missing: "no statistics for this MoE layer", record: { name, lg in
            let cd = try lg.openDataset("counts")
            guard cd.shape.count == 1, cd.shape[0] >= 1 else {
                throw SMoEError.dataset(path, cd.path, "shape \(cd.shape) is not [E]")
            }
            let E = cd.shape[0]
            let fd = try lg.openDataset("frequency")
            guard fd.shape == [E] else { throw SMoEError.dataset(path, fd.path, "shape \(fd.shape) is not [\(E)]") }
            let n = try lg.intAttribute("num_tokens")
            guard n >= 0 else { throw SMoEError.dataset(path, lg.path + "@num_tokens", "is negative") }
            if lg.hasAttribute("num_experts"), try lg.intAttribute("num_experts") != E {
                throw SMoEError.dataset(path, lg.path + "@num_experts", "does not match counts [\(E)]")
            }
            var k: Int
            if lg.hasAttribute("top_k") {
                k = try lg.intAttribute("top_k")
            } else {
                let total = try cd.readInts().reduce(0, +)
                k = n > 0 ? total / n : 1
            }
            guard k >= 1, k <= E else { throw SMoEError.dataset(path, lg.path + "@top_k", "\(k) is outside 1...\(E)") }
            // The bases present under `group` (names this build does not know are ignored), each
            // dataset's shape checked.
            func present(_ group: String, shaped fits: ([Int]) -> Bool, _ expected: String) throws -> [SimilarityBase] {
                guard lg.isGroup(group) else { return [] }
                let sg = try lg.openGroup(group)
                var found: [SimilarityBase] = []
                for b in try sg.childNames() {
                    guard let base = SimilarityBase(rawValue: b) else { continue }
                    let d = try sg.openDataset(b)
                    guard fits(d.shape) else { throw SMoEError.dataset(path, d.path, "shape \(d.shape) is not \(expected)") }
                    found.append(base)
                }
                return found
            }
            let bases = try present("similarity", shaped: { $0 == [E, E] }, "[\(E), \(E)]")
            let featureBases = try present("features", shaped: { $0.count == 2 && $0[0] == E }, "[\(E), d_model]")
            return { StatsLayerInfo(name: name, index: $0, numExperts: E, topK: k, numTokens: n,
                                    bases: bases.sorted(), featureBases: featureBases.sorted()) }
        })
    }

    private func group(_ name: String) throws -> H5Group {
        _ = try info(name)
        return try file.root.openGroup("moe_layers/\(name)")
    }

    public func counts(_ name: String) throws -> [Int] {
        let d = try group(name).openDataset("counts")
        let v = try d.readInts()
        if let i = v.firstIndex(where: { $0 < 0 }) { throw SMoEError.dataset(path, d.path, "entry \(i) is negative") }
        return v
    }

    public func frequency(_ name: String) throws -> [Double] {
        let d = try group(name).openDataset("frequency")
        let v = try d.readDoubles()
        if let i = v.firstIndex(where: { !$0.isFinite || $0 < 0 }) {
            throw SMoEError.dataset(path, d.path, "entry \(i) is not a finite number ≥ 0")
        }
        return v
    }

    /// The `similarity/<base>` matrix [E, E].
    public func similarity(_ name: String, _ base: SimilarityBase) throws -> Float64Matrix {
        let i = try info(name)
        guard i.bases.contains(base) else {
            throw SMoEError.dataset(path, "/moe_layers/\(name)/similarity/\(base.rawValue)",
                                    "missing (the file has \(i.bases.isEmpty ? "no similarity" : i.bases.map(\.rawValue).joined(separator: ", ")); rerun stats with {similarity} \(base.rawValue))")
        }
        let d = try group(name).openDataset("similarity/\(base.rawValue)")
        let v = try d.readDoubles()
        if let j = v.firstIndex(where: { !$0.isFinite }) { throw SMoEError.dataset(path, d.path, "contains NaN or Inf at flat index \(j)") }
        return Float64Matrix(rows: i.numExperts, cols: i.numExperts, values: v)
    }

    /// The `features/<base>` vectors [E, d_model].
    public func features(_ name: String, _ base: SimilarityBase) throws -> Float64Matrix {
        let i = try info(name)
        guard i.featureBases.contains(base) else {
            throw SMoEError.dataset(path, "/moe_layers/\(name)/features/\(base.rawValue)", "missing")
        }
        let d = try group(name).openDataset("features/\(base.rawValue)")
        let v = try d.readDoubles()
        if let j = v.firstIndex(where: { !$0.isFinite }) { throw SMoEError.dataset(path, d.path, "contains NaN or Inf at flat index \(j)") }
        return Float64Matrix(rows: d.shape[0], cols: d.shape[1], values: v)
    }

    /// Everything stored for one layer.
    public func read(_ name: String) throws -> LayerStatistics {
        let i = try info(name)
        var sims: [SimilarityBase: Float64Matrix] = [:]
        for b in i.bases { sims[b] = try similarity(name, b) }
        var feats: [SimilarityBase: Float64Matrix] = [:]
        for b in i.featureBases { feats[b] = try features(name, b) }
        return LayerStatistics(name: name, index: i.index, topK: i.topK, numTokens: i.numTokens,
                               counts: try counts(name), frequency: try frequency(name), similarity: sims, features: feats)
    }
}

extension Inspection {
    /// A JSON description of a statistics file (counts, frequency, never-chosen slots, bases;
    /// the matrices themselves only with `matrices`).
    public static func stats(_ r: StatsReader, matrices: Bool = false) throws -> JSONValue {
        .object([
            ("file", .string(r.path)), ("format", "smoe-stats"), ("source", .string(r.source)),
            ("layers", .array(try r.layers.map { try statsLayer(r.read($0.name), matrices: matrices) })),
        ])
    }

    /// One layer's statistics as JSON.
    public static func statsLayer(_ s: LayerStatistics, matrices: Bool = false) -> JSONValue {
        var kv: [(String, JSONValue)] = [
            ("name", .string(s.name)), ("index", .int(s.index)), ("tokens", .int(s.numTokens)),
            ("num_experts", .int(s.numExperts)), ("top_k", .int(s.topK)), ("counts", JSONValue(s.counts)),
            ("frequency", JSONValue(s.frequency)), ("never_chosen", JSONValue(s.neverChosen)),
            ("max_share", .double(s.maxShare)), ("similarity", JSONValue(s.bases.map(\.rawValue))),
        ]
        if matrices {
            kv.append(("matrices", .object(s.bases.map { b in
                let m = s.similarity[b]!
                return (b.rawValue, .array((0..<m.rows).map { JSONValue(m.row($0)) }))
            })))
        }
        return .object(kv)
    }
}
