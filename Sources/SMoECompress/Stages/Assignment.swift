/// The result of a linear sum assignment.
public struct AssignmentResult: Sendable, Equatable {
    /// Row i is assigned column `rowToColumn[i]` (a permutation of 0..<n).
    public var rowToColumn: [Int]
    /// Σ costs[i, rowToColumn[i]] of the given (not negated) costs, summed in float64.
    public var objective: Double

    public init(rowToColumn: [Int], objective: Double) {
        self.rowToColumn = rowToColumn
        self.objective = objective
    }
}

/// Exact linear sum assignment on dense square float cost matrices (SKELETON: interim
/// Hungarian until the Jonker–Volgenant solver lands).
public enum LinearAssignment {
    /// Solves the assignment problem on the square matrix `costs` (minimising by default,
    /// maximising with `maximize: true`).
    public static func solve(_ costs: Matrix, maximize: Bool = false) throws -> AssignmentResult {
        try solve(rows: costs.rows, cols: costs.cols, costs: costs.data, maximize: maximize)
    }

    /// The same on a row-major `rows × cols` buffer.
    public static func solve(rows: Int, cols: Int, costs: [Float], maximize: Bool = false) throws -> AssignmentResult {
        guard rows == cols else {
            throw SMoEError("assignment: the cost matrix must be square, got \(rows)×\(cols)")
        }
        guard costs.count == rows * cols else {
            throw SMoEError("assignment: \(costs.count) costs given for a \(rows)×\(cols) matrix")
        }
        if let k = costs.firstIndex(where: { !$0.isFinite }) {
            throw SMoEError("assignment: cost (\(k / cols), \(k % cols)) is \(costs[k]); costs must be finite")
        }
        let n = rows
        if n == 0 { return AssignmentResult(rowToColumn: [], objective: 0) }
        let INF = Double.infinity
        var u = [Double](repeating: 0, count: n + 1), v = u
        var p = [Int](repeating: 0, count: n + 1), way = p
        func a(_ i: Int, _ j: Int) -> Double { let x = Double(costs[(i - 1) * n + j - 1]); return maximize ? -x : x }
        for i in 1...n {
            p[0] = i
            var j0 = 0
            var minv = [Double](repeating: INF, count: n + 1)
            var used = [Bool](repeating: false, count: n + 1)
            repeat {
                used[j0] = true
                let i0 = p[j0]
                var delta = INF, j1 = 0
                for j in 1...n where !used[j] {
                    let cur = a(i0, j) - u[i0] - v[j]
                    if cur < minv[j] { minv[j] = cur; way[j] = j0 }
                    if minv[j] < delta { delta = minv[j]; j1 = j }
                }
                for j in 0...n { if used[j] { u[p[j]] += delta; v[j] -= delta } else { minv[j] -= delta } }
                j0 = j1
            } while p[j0] != 0
            repeat { let j1 = way[j0]; p[j0] = p[j1]; j0 = j1 } while j0 != 0
        }
        var r = [Int](repeating: 0, count: n)
        for j in 1...n { r[p[j] - 1] = j - 1 }
        var obj = 0.0
        for i in 0..<n { obj += Double(costs[i * n + r[i]]) }
        return AssignmentResult(rowToColumn: r, objective: obj)
    }
}
