// TEMPORARY (not committed): stand-in until the real solver lands.
public struct AssignmentResult: Sendable { public var rowToColumn: [Int]; public var objective: Double }
public enum LinearAssignment {
    public static func solve(_ c: Matrix, maximize: Bool) throws -> AssignmentResult {
        let n = c.rows
        let INF = Double.infinity
        var u = [Double](repeating: 0, count: n + 1), v = u
        var p = [Int](repeating: 0, count: n + 1), way = p
        func a(_ i: Int, _ j: Int) -> Double { let x = Double(c[i - 1, j - 1]); return maximize ? -x : x }
        for i in 1...max(n, 1) where n > 0 {
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
        for j in 1...max(n, 1) where n > 0 { r[p[j] - 1] = j - 1 }
        var obj = 0.0
        for i in 0..<n { obj += Double(c[i, r[i]]) }
        return AssignmentResult(rowToColumn: r, objective: obj)
    }
}
