import Foundation

/// One factored matrix competing for bytes in a rank allocation: its shape and its (whitened)
/// singular values, descending. Keeping rank r leaves the squared output error Σ_{i>r} σ_i²
/// (ALGORITHM.md §4.2), so the i-th rank removes σ_i².
public struct RankCandidate: Sendable, Equatable {
    public var rows: Int
    public var cols: Int
    public var singularValues: [Double]

    public init(rows: Int, cols: Int, singularValues: [Double]) {
        self.rows = rows
        self.cols = cols
        self.singularValues = singularValues
    }

    /// Stored bytes at rank r with no sparse part: U, V and the empty CSR's row pointers
    /// (`LinearOp.storedBytes`).
    public func bytes(rank r: Int, floatBytes: Int) -> Int { r * (rows + cols) * floatBytes + (rows + 1) * 8 }

    /// The largest rank whose factors take fewer bytes than the dense matrix (at least 1).
    public func maxRank(floatBytes: Int) -> Int {
        let dense = rows * cols * floatBytes
        var r = min(rows, cols, singularValues.count)
        while r > 1 && bytes(rank: r, floatBytes: floatBytes) >= dense { r -= 1 }
        return max(r, 1)
    }

    /// Σ_{i>r} σ_i².
    public func tailEnergy(rank r: Int) -> Double { singularValues.dropFirst(r).reduce(0) { $0 + $1 * $1 } }
}

/// Ranks for a set of matrices under a byte budget (ALGORITHM.md §4.2).
public enum RankAllocation {
    public struct Result: Sendable, Equatable {
        public var ranks: [Int]
        public var bytes: Int
        /// Σ over matrices of the squared error left, Σ_{i>r} σ_i².
        public var errorEnergy: Double
    }

    /// Greedy allocation: every matrix starts at rank 1; then the rank increments (matrix m from
    /// r to r + 1 removes σ_{r+1}² for (rows + cols) × floatBytes bytes) are taken in decreasing
    /// order of error removed per byte (ties: lower matrix index, then lower rank), skipping an
    /// increment that no longer fits, up to each matrix's `maxRank` (a factored matrix stays
    /// smaller than dense). Because each matrix's σ² are non-increasing, every matrix receives
    /// a prefix of its increments, and the result is optimal up to one increment per matrix
    /// (the fractional-knapsack bound). nil when even rank 1 everywhere exceeds `budget`.
    public static func allocate(_ candidates: [RankCandidate], budget: Int, floatBytes: Int) -> Result? {
        var ranks = [Int](repeating: 1, count: candidates.count)
        var used = candidates.reduce(0) { $0 + $1.bytes(rank: 1, floatBytes: floatBytes) }
        guard used <= budget else { return nil }
        struct Step { var ratio: Double; var matrix: Int; var rank: Int }
        var steps: [Step] = []
        for (m, c) in candidates.enumerated() {
            let cost = Double((c.rows + c.cols) * floatBytes)
            let top = c.maxRank(floatBytes: floatBytes)
            if top < 2 { continue }
            for r in 2...top { steps.append(Step(ratio: c.singularValues[r - 1] * c.singularValues[r - 1] / cost, matrix: m, rank: r)) }
        }
        steps.sort { $0.ratio != $1.ratio ? $0.ratio > $1.ratio : ($0.matrix != $1.matrix ? $0.matrix < $1.matrix : $0.rank < $1.rank) }
        var closed = [Bool](repeating: false, count: candidates.count)
        for s in steps where !closed[s.matrix] && ranks[s.matrix] == s.rank - 1 {
            let cost = (candidates[s.matrix].rows + candidates[s.matrix].cols) * floatBytes
            if used + cost > budget { closed[s.matrix] = true; continue }
            used += cost
            ranks[s.matrix] = s.rank
        }
        let err = zip(candidates, ranks).reduce(0.0) { $0 + $1.0.tailEnergy(rank: $1.1) }
        return Result(ranks: ranks, bytes: used, errorEnergy: err)
    }
}
