import Foundation

/// What two router slots are compared by (ALGORITHM.md §1).
public enum SimilarityBase: String, Sendable, CaseIterable, Comparable, Hashable {
    /// Cosine of the slots' router-logit columns over all tokens, mapped to [0, 1] as (cos + 1) / 2.
    case routerLogits = "router-logits"
    /// Cosine of the mean input of the tokens routed to each slot, in [-1, 1]. Undefined for
    /// slots never chosen: their off-diagonal entries are 0 (see `LayerStatistics.undefinedSlots`).
    case feature
    /// Cosine of the concatenated flattened matrices (up, gate, down) of the slot's stored
    /// expert, in [-1, 1]; from the weights alone.
    case weight
    /// HC-SMoE: every expert run on all tokens, feature = its mean output vector; the similarity
    /// is the negative Euclidean distance between those features (0 on the diagonal).
    case expertOutput = "expert-output"

    /// Whether the similarity reads the experts (weight, expert-output) or the router alone.
    public var needsExperts: Bool { self == .weight || self == .expertOutput }

    public static func < (a: SimilarityBase, b: SimilarityBase) -> Bool {
        allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
    }

    /// Parses a comma-separated list of base names, or `all`. Duplicates are dropped and the
    /// result is in canonical order.
    public static func parseList(_ text: String) throws -> [SimilarityBase] {
        var out = Set<SimilarityBase>()
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            let name = part.trimmingCharacters(in: .whitespaces)
            if name == "all" { out.formUnion(allCases); continue }
            guard let b = SimilarityBase(rawValue: name) else {
                throw SMoEError.setting(.similarity, "unknown similarity \"\(name)\" (expected a comma list of \(allCases.map(\.rawValue).joined(separator: ", ")), or all)")
            }
            out.insert(b)
        }
        return out.sorted()
    }
}

/// A dense row-major matrix of `Double` (similarities [E, E] and per-slot features [E, d]).
public struct Float64Matrix: Sendable, Equatable {
    public var rows: Int
    public var cols: Int
    public var values: [Double]

    public init(rows: Int, cols: Int, values: [Double]) {
        precondition(values.count == rows * cols, "Float64Matrix values count \(values.count) != \(rows)x\(cols)")
        self.rows = rows
        self.cols = cols
        self.values = values
    }

    public init(rows: Int, cols: Int, repeating v: Double = 0) {
        self.init(rows: rows, cols: cols, values: [Double](repeating: v, count: rows * cols))
    }

    @inlinable public subscript(i: Int, j: Int) -> Double {
        get { values[i * cols + j] }
        set { values[i * cols + j] = newValue }
    }

    public func row(_ i: Int) -> [Double] { Array(values[(i * cols)..<((i + 1) * cols)]) }

    /// The candidate column `j != i` with the largest `self[i, j]` (ties to the lower index);
    /// nil when there is none. Candidates default to every column.
    public func mostSimilar(to i: Int, among candidates: [Int]? = nil) -> Int? {
        var best: Int? = nil
        for j in (candidates ?? Array(0..<cols)).sorted() where j != i {
            if best == nil || self[i, j] > self[i, best!] { best = j }
        }
        return best
    }

    /// Largest absolute element-wise difference (tests and cross-checks).
    public func maxAbsDifference(_ other: Float64Matrix) -> Double {
        precondition(rows == other.rows && cols == other.cols)
        var m = 0.0
        for i in 0..<values.count { m = max(m, abs(values[i] - other.values[i])) }
        return m
    }
}

/// Routing statistics of one MoE layer over a set of calibration tokens (ALGORITHM.md §1).
public struct LayerStatistics: Sendable, Equatable {
    public var name: String
    public var index: Int
    /// Top-k of the layer (frequency = counts / (numTokens · topK)).
    public var topK: Int
    /// N, the tokens the statistics were computed on.
    public var numTokens: Int
    /// Routing hits per slot over all tokens and all k choices, [E].
    public var counts: [Int]
    /// counts / (N · k), [E] (all 0 when N = 0).
    public var frequency: [Double]
    /// The similarity matrices computed, each [E, E].
    public var similarity: [SimilarityBase: Float64Matrix]
    /// The per-slot feature vectors behind `feature` (mean input of the slot's tokens; a zero row
    /// for a slot never chosen) and `expert-output` (mean output of the slot's expert over all
    /// tokens), each [E, d_model]. Hierarchical clustering uses the `expert-output` ones.
    public var features: [SimilarityBase: Float64Matrix]

    public init(name: String, index: Int, topK: Int, numTokens: Int, counts: [Int], frequency: [Double],
                similarity: [SimilarityBase: Float64Matrix] = [:], features: [SimilarityBase: Float64Matrix] = [:]) {
        self.name = name
        self.index = index
        self.topK = topK
        self.numTokens = numTokens
        self.counts = counts
        self.frequency = frequency
        self.similarity = similarity
        self.features = features
    }

    public var numExperts: Int { counts.count }
    /// The similarity bases present, in canonical order.
    public var bases: [SimilarityBase] { similarity.keys.sorted() }
    /// Slots no token chose (their `feature` similarity is undefined and stored as 0).
    public var neverChosen: [Int] { counts.indices.filter { counts[$0] == 0 } }
    /// The largest slot's share of the hits.
    public var maxShare: Double { frequency.max() ?? 0 }

    /// Euclidean distances between the `expert-output` features, [E, E] (nil when not computed).
    public var expertOutputDistance: Float64Matrix? {
        guard var s = similarity[.expertOutput] else { return nil }
        for i in 0..<s.values.count { s.values[i] = abs(s.values[i]) }
        return s
    }
}
