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

/// Exact linear sum assignment on dense square float cost matrices: a permutation π that
/// minimises (or maximises) Σᵢ C[i, π(i)].
///
/// The algorithm is Jonker and Volgenant's (LAPJV, *Computing* 38, 1987): column reduction,
/// reduction transfer and augmenting row reduction assign most rows cheaply, then each row
/// still free is assigned by a Dijkstra shortest augmenting path over reduced costs
/// C[i, j] − v[j]. Prices, distances and all arithmetic on costs are float64; costs are read
/// from the float32 matrix as needed (no n² float64 copy), one contiguous row at a time.
///
/// Tolerances: every cost is converted exactly to float64, and the assignment returned is
/// optimal for the float32 costs up to the rounding of float64 price updates (relative
/// ~1e-12 of the costs' magnitude); the tests compare objectives with brute force (exact on
/// integer costs) and with SciPy (within 1e-9 relative).
///
/// Determinism: the same matrix always gives the same assignment. Every scan that chooses among
/// equal candidates takes the lowest index (preferring a column that is still free, which
/// ends a search earliest), so for example an all-equal matrix gives the identity.
///
/// Speed (`smoe-bench assignment`, weight-matching matrices on this project's 2-core machine):
/// 2.5–7× faster than SciPy's `linear_sum_assignment` at n = 3072 and n = 14336 (figures in
/// ALGORITHM.md §2). Augmenting row reduction reads each row's minima from a short candidate
/// list (valid while prices only drop, which they do), so the expensive Dijkstra phase sees
/// only a handful of rows.
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
        guard rows >= 0, costs.count == rows * cols else {
            throw SMoEError("assignment: \(costs.count) costs given for a \(rows)×\(cols) matrix")
        }
        if let k = costs.firstIndex(where: { !$0.isFinite }) {
            throw SMoEError("assignment: cost (\(k / cols), \(k % cols)) is \(costs[k]); costs must be finite")
        }
        let n = rows
        if n == 0 { return AssignmentResult(rowToColumn: [], objective: 0) }
        let rowToColumn = costs.withUnsafeBufferPointer { c in
            var solver = LAPJV(n: n, costs: c.baseAddress!, sign: maximize ? -1 : 1)
            return solver.run()
        }
        var objective = 0.0
        for i in 0..<n { objective += Double(costs[i * n + rowToColumn[i]]) }
        return AssignmentResult(rowToColumn: rowToColumn, objective: objective)
    }
}

/// The solver's working state. Minimises Σ sign·C[i, π(i)]; `v` holds the column prices of the
/// dual, and the row duals are implicit: an assigned row's column always has its lowest reduced
/// cost sign·C[i, j] − v[j].
private struct LAPJV {
    let n: Int
    let c: UnsafePointer<Float>
    let sign: Double
    var v: [Double]
    var rowsol: [Int]
    var colsol: [Int]

    init(n: Int, costs: UnsafePointer<Float>, sign: Double) {
        self.n = n
        self.c = costs
        self.sign = sign
        v = [Double](repeating: 0, count: n)
        rowsol = [Int](repeating: -1, count: n)
        colsol = [Int](repeating: -1, count: n)
    }

    @inline(__always) func cost(_ i: Int, _ j: Int) -> Double { sign * Double(c[i * n + j]) }

    mutating func run() -> [Int] {
        var free = columnReduction()
        // Augmenting row reduction while it pays: stop when a pass frees fewer than a tenth of
        // the rows it started with, or after eight passes. The rows left are assigned by
        // shortest augmenting paths.
        var pass = 0
        var cand = Candidates(n: n)
        while !free.isEmpty && pass < 8 {
            let before = free.count
            free = augmentingRowReduction(free, &cand)
            pass += 1
            if free.count * 10 > before * 9 { break }
        }
        augment(free)
        return rowsol
    }

    /// Column reduction and reduction transfer. Returns the rows left unassigned.
    mutating func columnReduction() -> [Int] {
        // Column minima by a row-major sweep, eight columns at a time, in float32 (exact: the
        // costs are float32 and negation is exact); ties keep the lowest row.
        let n8 = n / 8 * 8
        let sf = Float(sign)
        var colMinF = [Float](repeating: .infinity, count: n)
        var argMin = [Int32](repeating: 0, count: n)
        colMinF.withUnsafeMutableBufferPointer { m in
            argMin.withUnsafeMutableBufferPointer { a in
                let mr = UnsafeMutableRawPointer(m.baseAddress!), ar = UnsafeMutableRawPointer(a.baseAddress!)
                for i in 0..<n {
                    let row = UnsafeRawPointer(c + i * n)
                    let iv = SIMD8<Int32>(repeating: Int32(i))
                    var j = 0
                    while j < n8 {
                        let x = sf * row.loadUnaligned(fromByteOffset: 4 * j, as: SIMD8<Float>.self)
                        var mv = mr.loadUnaligned(fromByteOffset: 4 * j, as: SIMD8<Float>.self)
                        var av = ar.loadUnaligned(fromByteOffset: 4 * j, as: SIMD8<Int32>.self)
                        let lower = x .< mv
                        mv.replace(with: x, where: lower)
                        av.replace(with: iv, where: lower)
                        mr.storeBytes(of: mv, toByteOffset: 4 * j, as: SIMD8<Float>.self)
                        ar.storeBytes(of: av, toByteOffset: 4 * j, as: SIMD8<Int32>.self)
                        j += 8
                    }
                    let rowF = c + i * n
                    while j < n {
                        let x = sf * rowF[j]
                        if x < m[j] { m[j] = x; a[j] = Int32(i) }
                        j += 1
                    }
                }
            }
        }
        var matches = [Int](repeating: 0, count: n)
        for j in 0..<n {
            v[j] = Double(colMinF[j])
            let i = Int(argMin[j])
            matches[i] += 1
            if matches[i] == 1 {
                rowsol[i] = j; colsol[j] = i
            } else if v[j] < v[rowsol[i]] {
                colsol[rowsol[i]] = -1
                rowsol[i] = j; colsol[j] = i
            }
        }
        // Reduction transfer: a row that won exactly one column passes on its slack, so the
        // column's price drops by the row's second-lowest reduced cost.
        var free: [Int] = []
        for i in 0..<n {
            if matches[i] == 0 {
                free.append(i)
            } else if matches[i] == 1 {
                let j1 = rowsol[i]
                var m = Double.infinity
                let row = c + i * n
                v.withUnsafeBufferPointer { vp in
                    for j in 0..<n where j != j1 {
                        let h = sign * Double(row[j]) - vp[j]
                        if h < m { m = h }
                    }
                }
                if m.isFinite { v[j1] -= m }
            }
        }
        return free
    }

    /// Candidate lists for augmenting row reduction: for each row visited, the `width` columns
    /// of lowest reduced cost when the list was built and the next-lowest reduced cost then
    /// (`bound`). Prices only ever drop, so reduced costs only grow: while the second-lowest
    /// reduced cost among a row's candidates is below its bound, no other column can be lower
    /// and the row's minimum and second minimum come from the list in O(width). A bound of −∞
    /// marks a row whose list is not built yet (a built bound is finite or +∞).
    struct Candidates {
        static let width = 16
        var columns: [Int32]
        var bound: [Double]
        init(n: Int) {
            columns = [Int32](repeating: 0, count: n * Candidates.width)
            bound = [Double](repeating: -.infinity, count: n)
        }
    }

    /// Rebuilds row i's candidate list by a full scan.
    func buildCandidates(_ i: Int, _ cand: inout Candidates) {
        let k = Candidates.width
        var hs = [Double](repeating: .infinity, count: k + 1)
        var js = [Int32](repeating: -1, count: k + 1)
        let row = c + i * n
        v.withUnsafeBufferPointer { vp in
            for j in 0..<n {
                let h = sign * Double(row[j]) - vp[j]
                if h < hs[k] {
                    // insertion into the sorted k+1 smallest (ties keep the lower column first)
                    var p = k
                    while p > 0 && hs[p - 1] > h { hs[p] = hs[p - 1]; js[p] = js[p - 1]; p -= 1 }
                    hs[p] = h; js[p] = Int32(j)
                }
            }
        }
        let m = min(k, n)
        for t in 0..<k { cand.columns[i * k + t] = t < m ? js[t] : -1 }
        cand.bound[i] = n > k ? hs[k] : .infinity
    }

    /// Lowest and second-lowest reduced cost of row i, and their columns (ties: lower column).
    func rowMinima(_ i: Int, _ cand: inout Candidates) -> (umin: Double, j1: Int, usub: Double, j2: Int) {
        let k = Candidates.width
        for attempt in 0..<2 {
            if cand.bound[i] == -.infinity || attempt == 1 { buildCandidates(i, &cand) }
            var umin = Double.infinity, usub = Double.infinity, j1 = -1, j2 = -1
            for t in 0..<k {
                let j32 = cand.columns[i * k + t]
                if j32 < 0 { break }
                let j = Int(j32)
                let h = cost(i, j) - v[j]
                if h < umin || (h == umin && j < j1) {
                    usub = umin; j2 = j1; umin = h; j1 = j
                } else if h < usub || (h == usub && j < j2) {
                    usub = h; j2 = j
                }
            }
            if usub < cand.bound[i] || (n <= k) { return (umin, j1, usub, j2) }
        }
        // Even a freshly built list fails the test when its second-lowest value ties with the
        // bound (tie-heavy matrices): a full scan settles it.
        var umin = Double.infinity, usub = Double.infinity, j1 = 0, j2 = -1
        for j in 0..<n {
            let h = cost(i, j) - v[j]
            if h < usub {
                if h >= umin { usub = h; j2 = j } else { usub = umin; j2 = j1; umin = h; j1 = j }
            }
        }
        return (umin, j1, usub, j2)
    }

    /// One pass of augmenting row reduction over `free`; returns the rows still free.
    mutating func augmentingRowReduction(_ free: [Int], _ cand: inout Candidates) -> [Int] {
        var todo = free
        var next: [Int] = []
        var k = 0
        // A row displaced with a strict price drop is retried at once; bound those retries so
        // float rounding (tiny drops) can never cycle.
        var retries = 0
        let maxRetries = 64 * n
        while k < todo.count {
            let i = todo[k]; k += 1
            let (umin, lowest, usub, j2) = rowMinima(i, &cand)
            var j1 = lowest
            var i0 = colsol[j1]
            let strict = umin < usub
            if strict {
                v[j1] -= usub - umin
            } else if i0 >= 0 {
                // A tie with j1 taken: take j2 if it is free; if both are taken, leave the row
                // to the shortest-path phase (which prefers free columns, then lower indices)
                // instead of displacing a row over a tie.
                guard j2 >= 0, colsol[j2] < 0 else { next.append(i); continue }
                j1 = j2; i0 = -1
            }
            rowsol[i] = j1; colsol[j1] = i
            if i0 >= 0 {
                rowsol[i0] = -1
                if strict && retries < maxRetries {
                    retries += 1
                    k -= 1; todo[k] = i0
                } else {
                    next.append(i0)
                }
            }
        }
        return next
    }

    /// Shortest augmenting paths (Dijkstra over reduced costs) for every row in `free`.
    ///
    /// The columns not yet scanned are kept packed in `remaining` (a scanned column is swapped
    /// out), so each step costs the number of columns left, and one pass both relaxes their
    /// distances through the row just reached and finds the next closest. Among columns at the
    /// same distance a free one wins (it ends the search), then the lowest index.
    mutating func augment(_ free: [Int]) {
        if free.isEmpty { return }
        let n = self.n, sign = self.sign, c = self.c
        var w = [Double](repeating: 0, count: n)      // tentative distances
        var pred = [Int](repeating: 0, count: n)
        var remaining = [Int](repeating: 0, count: n)
        var scanned: [(column: Int, distance: Double)] = []
        scanned.reserveCapacity(n)
        for f in free {
            scanned.removeAll(keepingCapacity: true)
            var endOfPath = -1
            var m = 0.0
            v.withUnsafeBufferPointer { vp in
            colsol.withUnsafeBufferPointer { cs in
            w.withUnsafeMutableBufferPointer { wp in
            pred.withUnsafeMutableBufferPointer { pr in
            remaining.withUnsafeMutableBufferPointer { rem in
                var nRem = n
                var best = Double.infinity, bestFree = false, bestJ = Int.max, bestK = -1
                // Is column j (distance x) closer than the best so far?
                @inline(__always) func consider(_ x: Double, _ j: Int, _ k: Int) {
                    if x <= best {
                        let fr = cs[j] < 0
                        if x < best || (fr && !bestFree) || (fr == bestFree && j < bestJ) {
                            best = x; bestFree = fr; bestJ = j; bestK = k
                        }
                    }
                }
                let rowF = c + f * n
                for j in 0..<n {
                    rem[j] = j
                    let d = sign * Double(rowF[j]) - vp[j]
                    wp[j] = d; pr[j] = f
                    consider(d, j, j)
                }
                while true {
                    m = best
                    let j1 = bestJ
                    if bestFree { endOfPath = j1; break }
                    // Scan j1: its distance is final; swap it out of the remaining columns.
                    scanned.append((j1, m))
                    nRem -= 1
                    rem[bestK] = rem[nRem]
                    let i = cs[j1]
                    let row = c + i * n
                    let h = sign * Double(row[j1]) - vp[j1] - m
                    best = .infinity; bestFree = false; bestJ = Int.max; bestK = -1
                    // The hottest loop: specialised for each sign so the cost is used as read.
                    @inline(__always) func relax(negated: Bool) {
                        let rp = rem.baseAddress!, vq = vp.baseAddress!, wq = wp.baseAddress!
                        for k in 0..<nRem {
                            let j = rp[k]
                            let cost = negated ? -Double(row[j]) : Double(row[j])
                            let d = cost - vq[j] - h
                            var x = wq[j]
                            if d < x { x = d; wq[j] = d; pr[j] = i }
                            consider(x, j, k)
                        }
                    }
                    if sign < 0 { relax(negated: true) } else { relax(negated: false) }
                }
            }}}}}
            // Price update of the scanned columns keeps the dual feasible and makes the path tight.
            for (j, d) in scanned { v[j] += d - m }
            // Augment along the path back to f.
            var j = endOfPath
            while true {
                let i = pred[j]
                colsol[j] = i
                let prev = rowsol[i]
                rowsol[i] = j
                if i == f { break }
                j = prev
            }
        }
    }
}
