/// A partition of a layer's router slots into groups, each with a dominant slot.
public struct LayerGrouping: Sendable, Equatable {
    /// Member slots of each group, ascending; groups are ordered by their dominant slot.
    public var groups: [[Int]]
    /// The dominant slot of each group.
    public var dominant: [Int]

    public init(groups: [[Int]], dominant: [Int]) {
        // Canonical order: groups by dominant slot, members ascending.
        let order = dominant.indices.sorted { dominant[$0] < dominant[$1] }
        self.groups = order.map { groups[$0].sorted() }
        self.dominant = order.map { dominant[$0] }
    }

    /// Group index of every slot (the merged layer's `expert_map`).
    public var slotToGroup: [Int] {
        let e = groups.reduce(0) { $0 + $1.count }
        var m = [Int](repeating: -1, count: e)
        for (g, members) in groups.enumerated() { for s in members { m[s] = g } }
        return m
    }

    /// The identity grouping of E slots (every slot its own group).
    public static func identity(_ e: Int) -> LayerGrouping {
        LayerGrouping(groups: (0..<e).map { [$0] }, dominant: Array(0..<e))
    }
}

/// Grouping rules of ALGORITHM.md §3: dominant experts by usage, members by similarity,
/// adaptive budgets across layers, and HC-SMoE average-linkage clustering.
public enum Grouping {
    /// Slots ordered by frequency, most used first (ties to the lower index).
    public static func byUsage(_ frequency: [Double]) -> [Int] {
        frequency.indices.sorted { frequency[$0] != frequency[$1] ? frequency[$0] > frequency[$1] : $0 < $1 }
    }

    /// Groups around the given dominant slots: every other slot joins the dominant it is most
    /// similar to (`similarity` row-major E×E, larger = more alike); ties go to the more used
    /// dominant, then the lower index.
    public static func assign(dominant: [Int], frequency: [Double], similarity: [Double]) -> LayerGrouping {
        let e = frequency.count
        precondition(similarity.count == e * e, "similarity must be E×E")
        precondition(!dominant.isEmpty)
        let rank = byUsage(frequency)
        let usageRank = Dictionary(uniqueKeysWithValues: rank.enumerated().map { ($1, $0) })
        let domSet = Set(dominant)
        var groups = dominant.map { [$0] }
        for s in 0..<e where !domSet.contains(s) {
            var best = 0
            for (gi, d) in dominant.enumerated() where gi > 0 {
                let v = similarity[s * e + d], bv = similarity[s * e + dominant[best]]
                if v > bv || (v == bv && usageRank[d]! < usageRank[dominant[best]]!) { best = gi }
            }
            groups[best].append(s)
        }
        return LayerGrouping(groups: groups, dominant: dominant)
    }

    /// Uniform grouping: the `groups` most used slots are dominant.
    public static func uniform(frequency: [Double], similarity: [Double], groups: Int) -> LayerGrouping {
        precondition(groups >= 1 && groups <= frequency.count, "groups validated by MergeSettings")
        return assign(dominant: Array(byUsage(frequency).prefix(groups)), frequency: frequency, similarity: similarity)
    }

    /// Adaptive allocation (the paper's setting): one budget T = groupsPerLayer × layers shared
    /// by all layers. Each layer's most used slot counts as 1.0; τ is the (T+1)-th largest value
    /// over all layers; a layer keeps as dominant the slots strictly above τ (at least its most
    /// used one). Returns the dominant slots of each layer, most used first.
    public static func adaptiveDominants(frequencies: [[Double]], groupsPerLayer: Int) -> [[Int]] {
        let total = frequencies.reduce(0) { $0 + $1.count }
        let budget = groupsPerLayer * frequencies.count
        precondition(groupsPerLayer >= 1 && frequencies.allSatisfy { groupsPerLayer <= $0.count }, "groups validated by MergeSettings")
        let scores: [[Double]] = frequencies.map { f in
            var s = f
            if let top = byUsage(f).first { s[top] = 1.0 }
            return s
        }
        if budget >= total { return scores.map { byUsage($0) } }
        let all = scores.flatMap { $0 }.sorted(by: >)
        let tau = all[budget]  // the (T+1)-th largest
        return scores.map { s in
            let order = byUsage(s)
            let kept = order.filter { s[$0] > tau }
            return kept.isEmpty ? [order[0]] : kept
        }
    }

    /// HC-SMoE: average-linkage agglomerative clustering on a distance matrix (row-major E×E)
    /// down to `groups` clusters. At each step the two clusters with the smallest mean pairwise
    /// distance merge (ties: the pair with the lowest smallest members). A cluster's dominant is
    /// its most used member.
    public static func hierarchical(distance: [Double], frequency: [Double], groups: Int) -> LayerGrouping {
        let e = frequency.count
        precondition(distance.count == e * e)
        precondition(groups >= 1 && groups <= e, "groups validated by MergeSettings")
        var clusters: [[Int]] = (0..<e).map { [$0] }
        // Sum of pairwise distances between clusters (average = sum / (|a|·|b|)).
        var sum = distance
        while clusters.count > groups {
            var bi = -1, bj = -1
            var best = Double.infinity
            for i in 0..<clusters.count {
                for j in (i + 1)..<clusters.count {
                    let avg = sum[i * e + j] / Double(clusters[i].count * clusters[j].count)
                    if avg < best { best = avg; bi = i; bj = j }
                }
            }
            // Merge bj into bi; update sums by row/column addition, then drop bj.
            let n = clusters.count
            for k in 0..<n where k != bi && k != bj {
                let v = sum[bi * e + k] + sum[bj * e + k]
                sum[bi * e + k] = v
                sum[k * e + bi] = v
            }
            clusters[bi] += clusters[bj]
            clusters.remove(at: bj)
            // Compact the sums matrix: remove row/column bj.
            var next = [Double](repeating: 0, count: e * e)
            let keep = (0..<n).filter { $0 != bj }
            for (a, i) in keep.enumerated() { for (b, j) in keep.enumerated() { next[a * e + b] = sum[i * e + j] } }
            sum = next
            // Keep clusters ordered by their smallest member so ties resolve deterministically.
            let order = clusters.indices.sorted { clusters[$0].min()! < clusters[$1].min()! }
            if order != Array(clusters.indices) {
                var reordered = [Double](repeating: 0, count: e * e)
                for (a, i) in order.enumerated() { for (b, j) in order.enumerated() { reordered[a * e + b] = sum[i * e + j] } }
                sum = reordered
                clusters = order.map { clusters[$0] }
            }
        }
        let rank = byUsage(frequency)
        let pos = Dictionary(uniqueKeysWithValues: rank.enumerated().map { ($1, $0) })
        return LayerGrouping(groups: clusters, dominant: clusters.map { c in c.min { pos[$0]! < pos[$1]! }! })
    }

    /// Adjusted Rand index of two labelings (1 = identical partitions).
    public static func adjustedRandIndex(_ a: [Int], _ b: [Int]) -> Double {
        precondition(a.count == b.count)
        let n = a.count
        func c2(_ x: Int) -> Double { Double(x * (x - 1)) / 2 }
        var table: [[Int]: Int] = [:], ra: [Int: Int] = [:], rb: [Int: Int] = [:]
        for i in 0..<n { table[[a[i], b[i]], default: 0] += 1; ra[a[i], default: 0] += 1; rb[b[i], default: 0] += 1 }
        let index = table.values.reduce(0) { $0 + c2($1) }
        let sa = ra.values.reduce(0) { $0 + c2($1) }, sb = rb.values.reduce(0) { $0 + c2($1) }
        let expected = sa * sb / max(c2(n), 1)
        let maxIndex = (sa + sb) / 2
        if maxIndex == expected { return 1 }
        return (index - expected) / (maxIndex - expected)
    }
}
