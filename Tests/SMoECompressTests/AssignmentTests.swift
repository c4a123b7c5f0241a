import Foundation
import XCTest
@testable import SMoECompress

/// Tests of the exact linear sum assignment solver (`LinearAssignment`), against brute force,
/// an independent float64 Hungarian (with an LP dual certificate), planted permutations and
/// SciPy. Every input is built from a seeded `SplitMix64`; every failure names its input.
final class AssignmentTests: XCTestCase {

    // MARK: - Inputs

    /// The kinds of matrices the small (brute-force) tests cover.
    enum Kind: String, CaseIterable {
        /// uniform floats in [-1, 1)
        case uniform
        /// integers 0..<5 (many ties)
        case smallInt
        /// every entry the same value
        case allEqual
        /// two or three distinct values (exactly representable), mostly ties
        case tieHeavy
        /// large magnitudes of both signs: ±1e6 noise around a per-row offset up to ±1e7
        case largeMagnitude

        /// Whether every objective is exactly representable, so comparisons are exact.
        var exact: Bool { self == .smallInt || self == .allEqual || self == .tieHeavy }
    }

    static func matrix(_ kind: Kind, n: Int, seed: UInt64) -> [Float] {
        var rng = SplitMix64(seed: seed)
        switch kind {
        case .uniform:
            return (0..<(n * n)).map { _ in rng.nextFloat(in: -1...1) }
        case .smallInt:
            return (0..<(n * n)).map { _ in Float(rng.nextInt(below: 5)) }
        case .allEqual:
            let v = Float(rng.nextInt(below: 41) - 20) * 0.25
            return [Float](repeating: v, count: n * n)
        case .tieHeavy:
            let values: [Float] = rng.nextInt(below: 2) == 0 ? [0.5, -1.75] : [0.5, -1.75, 3]
            return (0..<(n * n)).map { _ in values[rng.nextInt(below: values.count)] }
        case .largeMagnitude:
            let offsets = (0..<n).map { _ in Float(rng.nextDouble() * 2e7 - 1e7) }
            return (0..<(n * n)).map { k in offsets[k / max(n, 1)] + rng.nextFloat(in: -1e6...1e6) }
        }
    }

    /// Σ costs[i, perm[i]] in float64, in row order.
    static func objective(_ costs: [Float], _ n: Int, _ perm: [Int]) -> Double {
        var s = 0.0
        for i in 0..<n { s += Double(costs[i * n + perm[i]]) }
        return s
    }

    /// |a − b| ≤ rel · max(1, |a|, |b|).
    static func close(_ a: Double, _ b: Double, rel: Double) -> Bool {
        abs(a - b) <= rel * max(1, abs(a), abs(b))
    }

    /// Checks `r` is a permutation of 0..<n whose reported objective is Σ costs[i, r[i]] in float64.
    func checkWellFormed(_ r: AssignmentResult, _ costs: [Float], _ n: Int, _ what: String,
                         file: StaticString = #filePath, line: UInt = #line) -> Bool {
        guard r.rowToColumn.count == n else {
            XCTFail("\(what): \(r.rowToColumn.count) rows assigned, expected \(n)", file: file, line: line)
            return false
        }
        var seen = [Bool](repeating: false, count: n)
        for (i, j) in r.rowToColumn.enumerated() {
            guard j >= 0, j < n, !seen[j] else {
                XCTFail("\(what): rowToColumn is not a permutation of 0..<\(n) (row \(i) → \(j))", file: file, line: line)
                return false
            }
            seen[j] = true
        }
        let recomputed = Self.objective(costs, n, r.rowToColumn)
        // The float64 sum of n float32 values: only the summation order may differ.
        XCTAssertTrue(Self.close(r.objective, recomputed, rel: 1e-12),
                      "\(what): reported objective \(r.objective) but Σ costs[i, rowToColumn[i]] = \(recomputed)",
                      file: file, line: line)
        return true
    }

    // MARK: - Brute force

    /// The minimum and maximum of Σ c[i, π(i)] (float64) over all permutations π of 0..<n.
    static func bruteForce(_ costs: [Float], _ n: Int) -> (min: Double, max: Double) {
        let c = costs.map(Double.init)
        var lo = Double.infinity, hi = -Double.infinity
        var used = [Bool](repeating: false, count: n)
        func go(_ i: Int, _ sum: Double) {
            if i == n { lo = min(lo, sum); hi = max(hi, sum); return }
            for j in 0..<n where !used[j] {
                used[j] = true
                go(i + 1, sum + c[i * n + j])
                used[j] = false
            }
        }
        go(0, 0)
        return (lo, hi)
    }

    /// Optimal against brute force for every n in 0...8, every kind, minimising and maximising.
    func testOptimalAgainstBruteForce() throws {
        for n in 0...8 {
            let seeds = n <= 5 ? 24 : (n <= 7 ? 8 : 3)
            for kind in Kind.allCases {
                for s in 0..<seeds {
                    let seed = UInt64(1000 * n + 100 * Kind.allCases.firstIndex(of: kind)! + s)
                    let costs = Self.matrix(kind, n: n, seed: seed)
                    let best = Self.bruteForce(costs, n)
                    for maximize in [false, true] {
                        let what = "\(kind) n=\(n) seed=\(seed) maximize=\(maximize)"
                        let r = try LinearAssignment.solve(rows: n, cols: n, costs: costs, maximize: maximize)
                        guard checkWellFormed(r, costs, n, what) else { continue }
                        let want = maximize ? best.max : best.min
                        if kind.exact {
                            XCTAssertEqual(r.objective, want, "\(what): objective vs brute-force optimum")
                        } else {
                            XCTAssertTrue(Self.close(r.objective, want, rel: 1e-6),
                                          "\(what): objective \(r.objective) vs brute-force optimum \(want)")
                        }
                    }
                }
            }
        }
    }

    // MARK: - Reference Hungarian

    /// A plain O(n³) Hungarian (shortest augmenting paths with potentials) in float64, minimising.
    /// Returns the assignment and dual potentials u (rows), v (columns) with u_i + v_j ≤ c_ij and
    /// equality on the assignment — a certificate of optimality checked by `checkCertificate`.
    static func referenceHungarian(_ c: [Double], _ n: Int) -> (rowToColumn: [Int], u: [Double], v: [Double]) {
        if n == 0 { return ([], [], []) }
        // 1-based with a virtual column 0, as in the textbook formulation.
        var u = [Double](repeating: 0, count: n + 1), v = u
        var rowOf = [Int](repeating: 0, count: n + 1)  // column j → row (1-based, 0 = free)
        var prev = [Int](repeating: 0, count: n + 1)
        var dist = [Double](repeating: 0, count: n + 1)
        var done = [Bool](repeating: false, count: n + 1)
        // Buffer pointers only for speed in the debug build the suite runs (n = 240 is 14M inner
        // steps per call): the same steps in the same order as with array subscripts.
        c.withUnsafeBufferPointer { c in
        u.withUnsafeMutableBufferPointer { u in
        v.withUnsafeMutableBufferPointer { v in
        rowOf.withUnsafeMutableBufferPointer { rowOf in
        prev.withUnsafeMutableBufferPointer { prev in
        dist.withUnsafeMutableBufferPointer { dist in
        done.withUnsafeMutableBufferPointer { done in
        for row in 1...n {
            rowOf[0] = row
            var j0 = 0
            for j in 0...n { dist[j] = .infinity; done[j] = false }
            while true {
                done[j0] = true
                let i0 = rowOf[j0]
                var delta = Double.infinity, j1 = 0
                let base = (i0 - 1) * n
                let ui0 = u[i0]
                for j in 1...n where !done[j] {
                    let reduced = c[base + j - 1] - ui0 - v[j]
                    if reduced < dist[j] { dist[j] = reduced; prev[j] = j0 }
                    if dist[j] < delta { delta = dist[j]; j1 = j }
                }
                for j in 0...n {
                    if done[j] { u[rowOf[j]] += delta; v[j] -= delta } else { dist[j] -= delta }
                }
                j0 = j1
                if rowOf[j0] == 0 { break }
            }
            while j0 != 0 { let j1 = prev[j0]; rowOf[j0] = rowOf[j1]; j0 = j1 }
        }
        }}}}}}}
        var r = [Int](repeating: 0, count: n)
        for j in 1...n { r[rowOf[j] - 1] = j - 1 }
        return (r, Array(u[1...]), Array(v[1...]))
    }

    /// Checks the LP dual certificate: u_i + v_j ≤ c_ij + tol everywhere and = on the assignment,
    /// which proves Σ c[i, r[i]] = Σ u + Σ v is the minimum.
    func checkCertificate(_ c: [Double], _ n: Int, _ ref: (rowToColumn: [Int], u: [Double], v: [Double]), _ what: String) {
        var scale = 1.0
        for x in c { scale = max(scale, abs(x)) }
        let tol = 1e-9 * scale
        var worst = 0.0
        for i in 0..<n { for j in 0..<n { worst = max(worst, ref.u[i] + ref.v[j] - c[i * n + j]) } }
        XCTAssertLessThanOrEqual(worst, tol, "\(what): reference Hungarian's duals are infeasible")
        for i in 0..<n {
            let slack = c[i * n + ref.rowToColumn[i]] - ref.u[i] - ref.v[ref.rowToColumn[i]]
            XCTAssertLessThanOrEqual(abs(slack), tol, "\(what): reference Hungarian row \(i) is not tight")
        }
    }

    /// The reference itself agrees with brute force (so the large-n comparisons mean something).
    func testReferenceHungarianAgreesWithBruteForce() {
        for n in 0...7 {
            for kind in Kind.allCases {
                for s in 0..<6 {
                    let seed = UInt64(50_000 + 1000 * n + 100 * Kind.allCases.firstIndex(of: kind)! + s)
                    let costs = Self.matrix(kind, n: n, seed: seed)
                    let ref = Self.referenceHungarian(costs.map(Double.init), n)
                    let got = Self.objective(costs, n, ref.rowToColumn)
                    XCTAssertTrue(Self.close(got, Self.bruteForce(costs, n).min, rel: 1e-9),
                                  "reference Hungarian, \(kind) n=\(n) seed=\(seed)")
                }
            }
        }
    }

    /// Structured and random matrices for the reference comparison.
    static let structuredKinds = ["uniform", "gaussian", "int0..<10", "i*j", "(i+j)%3", "(i+j)%7", "rank-1", "big-offset"]

    static func structured(_ kind: String, n: Int, seed: UInt64) -> [Float] {
        var rng = SplitMix64(seed: seed)
        switch kind {
        case "uniform": return (0..<(n * n)).map { _ in rng.nextFloat(in: 0...1) }
        case "gaussian": return (0..<(n * n)).map { _ in Float(rng.nextGaussian()) }
        case "int0..<10": return (0..<(n * n)).map { _ in Float(rng.nextInt(below: 10)) }
        case "i*j": return (0..<(n * n)).map { k in Float((k / n) * (k % n)) }
        case "(i+j)%3": return (0..<(n * n)).map { k in Float((k / n + k % n) % 3) }
        case "(i+j)%7": return (0..<(n * n)).map { k in Float((k / n + k % n) % 7) }
        case "rank-1":
            let a = (0..<n).map { _ in rng.nextGaussian() }, b = (0..<n).map { _ in rng.nextGaussian() }
            return (0..<(n * n)).map { k in Float(a[k / n] * b[k % n]) }
        case "big-offset":  // small differences on top of a large common value
            return (0..<(n * n)).map { _ in 1000 + rng.nextFloat(in: 0...1) }
        default: fatalError(kind)
        }
    }

    /// Against the reference Hungarian for n up to 240, minimising and maximising: equal
    /// objectives (1e-9 relative); closed forms for c = i·j (rearrangement inequality).
    func testAgainstReferenceHungarian() throws {
        for n in [1, 2, 3, 5, 9, 16, 33, 64, 100, 150, 240] {
            for (k, kind) in Self.structuredKinds.enumerated() {
                let seed = UInt64(90_000 + 100 * n + k)
                let costs = Self.structured(kind, n: n, seed: seed)
                let c = costs.map(Double.init)
                for maximize in [false, true] {
                    let what = "\(kind) n=\(n) seed=\(seed) maximize=\(maximize)"
                    let ref = Self.referenceHungarian(maximize ? c.map { -$0 } : c, n)
                    checkCertificate(maximize ? c.map { -$0 } : c, n, ref, what)
                    let want = Self.objective(costs, n, ref.rowToColumn)
                    let r = try LinearAssignment.solve(rows: n, cols: n, costs: costs, maximize: maximize)
                    guard checkWellFormed(r, costs, n, what) else { continue }
                    XCTAssertTrue(Self.close(r.objective, want, rel: 1e-9),
                                  "\(what): objective \(r.objective) vs reference Hungarian \(want)")
                    if kind == "i*j" {
                        // min pairs i with n−1−i; max pairs i with i.
                        let closed = (0..<n).reduce(0.0) { $0 + Double($1 * (maximize ? $1 : n - 1 - $1)) }
                        XCTAssertEqual(r.objective, closed, "\(what): closed form")
                    }
                }
            }
        }
    }

    // MARK: - Planted permutations

    /// C = −|noise| except a large value on a planted permutation: maximising recovers it exactly;
    /// the negated matrix minimised recovers it too.
    func testRecoversPlantedPermutation() throws {
        for n in [2, 3, 7, 20, 64, 150] {
            for s in 0..<3 {
                let seed = UInt64(7_000 + 10 * n + s)
                var rng = SplitMix64(seed: seed)
                let planted = rng.permutation(n)
                var costs = (0..<(n * n)).map { _ in -abs(Float(rng.nextGaussian())) }
                for i in 0..<n { costs[i * n + planted[i]] = 10 + rng.nextFloat(in: 0...1) }
                let what = "planted n=\(n) seed=\(seed)"
                let r = try LinearAssignment.solve(rows: n, cols: n, costs: costs, maximize: true)
                XCTAssertEqual(r.rowToColumn, planted, "\(what), maximize")
                let m = try LinearAssignment.solve(rows: n, cols: n, costs: costs.map { -$0 })
                XCTAssertEqual(m.rowToColumn, planted, "\(what), minimise the negation")
            }
        }
    }

    /// A random expert [f, d] and a copy whose neurons are permuted by q (copy neuron j is
    /// original neuron q[j]) with Gaussian noise of `noise` relative size.
    static func expertPair(d: Int, f: Int, glu: Bool, noise: Float, seed: UInt64) throws -> (a: Expert, b: Expert, q: [Int]) {
        var rng = SplitMix64(seed: seed)
        let s = 1 / Float(d).squareRoot()
        let a = Expert(up: randomMatrix(f, d, &rng, scale: s), gate: glu ? randomMatrix(f, d, &rng, scale: s) : nil,
                       down: randomMatrix(d, f, &rng, scale: s))
        let q = rng.permutation(f)
        var b = try Alignment.permute(a, q)
        func noisy(_ m: Matrix) -> Matrix {
            var m = m
            for k in 0..<m.data.count { m.data[k] += noise * s * Float(rng.nextGaussian()) }
            return m
        }
        b = Expert(up: noisy(b.up.dense()), gate: b.gate.map { noisy($0.dense()) }, down: noisy(b.down.dense()))
        return (a, b, q)
    }

    /// Weight matching: solving Alignment.costMatrix(reference: a, b) with maximize recovers the
    /// planted permutation in Alignment's convention (aligned neuron i is b's neuron perm[i]),
    /// and permuting b by it gives back a up to the noise.
    func testWeightMatchingRecoversPlantedPermutation() throws {
        for (d, f, glu, seed) in [(16, 48, false, UInt64(11)), (32, 128, true, 12), (48, 200, false, 13)] {
            let what = "weight matching d=\(d) f=\(f) glu=\(glu) seed=\(seed)"
            let (a, b, q) = try Self.expertPair(d: d, f: f, glu: glu, noise: 0.2, seed: seed)
            var qInverse = [Int](repeating: 0, count: f)
            for (j, p) in q.enumerated() { qInverse[p] = j }
            let c = try Alignment.costMatrix(reference: a, b)
            let r = try LinearAssignment.solve(c, maximize: true)
            XCTAssertEqual(r.rowToColumn, qInverse, what)
            XCTAssertEqual(try Alignment.permutation(reference: a, b).perm, qInverse, "\(what): Alignment.permutation")
            let back = try Alignment.permute(b, r.rowToColumn)
            XCTAssertLessThan(relativeError(back.up.dense(), a.up.dense()), 0.3, "\(what): permuted back")
        }
    }

    // MARK: - Maximise vs minimise

    /// maximize(C) and minimise(−C): objectives equal up to sign; the same assignment when the
    /// optimum is unique (continuous random costs).
    func testMaximizeIsMinimizeOfNegation() throws {
        for n in [1, 2, 5, 8, 31, 100] {
            for kind in ["uniform", "gaussian", "int0..<10", "(i+j)%3"] {
                let seed = UInt64(31_000 + n)
                let costs = Self.structured(kind, n: n, seed: seed)
                let what = "\(kind) n=\(n) seed=\(seed)"
                let mx = try LinearAssignment.solve(rows: n, cols: n, costs: costs, maximize: true)
                let mn = try LinearAssignment.solve(rows: n, cols: n, costs: costs.map { -$0 }, maximize: false)
                XCTAssertTrue(Self.close(mx.objective, -mn.objective, rel: 1e-12),
                              "\(what): max(C) = \(mx.objective), min(−C) = \(mn.objective)")
                if kind == "uniform" || kind == "gaussian" {
                    XCTAssertEqual(mx.rowToColumn, mn.rowToColumn, "\(what): assignments differ")
                }
                // And the Matrix overload agrees with the flat one.
                XCTAssertEqual(try LinearAssignment.solve(Matrix(rows: n, cols: n, data: costs), maximize: true), mx, what)
            }
        }
    }

    // MARK: - Errors and edge sizes

    func expectError(_ what: String, mentioning words: [String], _ body: () throws -> AssignmentResult,
                     file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try body(), "\(what): no error", file: file, line: line) { e in
            guard let err = e as? SMoEError else {
                XCTFail("\(what): threw \(type(of: e)), not SMoEError", file: file, line: line)
                return
            }
            XCTAssertFalse(err.message.isEmpty, "\(what): empty message", file: file, line: line)
            XCTAssertFalse(err.message.contains("\n"), "\(what): message is not one line: \(err.message)", file: file, line: line)
            let lower = err.message.lowercased()
            XCTAssertTrue(words.contains { lower.contains($0) },
                          "\(what): message mentions none of \(words): \(err.message)", file: file, line: line)
        }
    }

    func testErrors() {
        for maximize in [false, true] {
            expectError("2×3 flat, maximize=\(maximize)", mentioning: ["square"]) {
                try LinearAssignment.solve(rows: 2, cols: 3, costs: [Float](repeating: 0, count: 6), maximize: maximize)
            }
            expectError("3×2 Matrix, maximize=\(maximize)", mentioning: ["square"]) {
                try LinearAssignment.solve(Matrix(rows: 3, cols: 2), maximize: maximize)
            }
            expectError("0×4 flat, maximize=\(maximize)", mentioning: ["square"]) {
                try LinearAssignment.solve(rows: 0, cols: 4, costs: [], maximize: maximize)
            }
            for count in [8, 10, 0] {
                expectError("\(count) costs for 3×3, maximize=\(maximize)", mentioning: ["\(count)", "count"]) {
                    try LinearAssignment.solve(rows: 3, cols: 3, costs: [Float](repeating: 1, count: count), maximize: maximize)
                }
            }
            for (bad, words) in [(Float.nan, ["nan", "finite"]), (Float.infinity, ["inf", "finite"]),
                                 (-Float.infinity, ["inf", "finite"])] {
                for position in [0, 5, 15] {
                    var costs = (0..<16).map { Float($0) }
                    costs[position] = bad
                    expectError("\(bad) at \(position) of 4×4, maximize=\(maximize)", mentioning: words) {
                        try LinearAssignment.solve(rows: 4, cols: 4, costs: costs, maximize: maximize)
                    }
                    expectError("\(bad) at \(position) of a 4×4 Matrix, maximize=\(maximize)", mentioning: words) {
                        try LinearAssignment.solve(Matrix(rows: 4, cols: 4, data: costs), maximize: maximize)
                    }
                }
            }
        }
    }

    func testEmptyAndSingle() throws {
        for maximize in [false, true] {
            let empty = AssignmentResult(rowToColumn: [], objective: 0)
            XCTAssertEqual(try LinearAssignment.solve(rows: 0, cols: 0, costs: [], maximize: maximize), empty, "n=0 flat")
            XCTAssertEqual(try LinearAssignment.solve(Matrix(rows: 0, cols: 0), maximize: maximize), empty, "n=0 Matrix")
            for v: Float in [-3.5, 0, 2.25, 1e30, -1e-30] {
                let want = AssignmentResult(rowToColumn: [0], objective: Double(v))
                XCTAssertEqual(try LinearAssignment.solve(rows: 1, cols: 1, costs: [v], maximize: maximize), want, "n=1 value \(v)")
                XCTAssertEqual(try LinearAssignment.solve(Matrix([[v]]), maximize: maximize), want, "n=1 Matrix value \(v)")
            }
        }
    }

    // MARK: - Determinism

    /// The same tie-heavy input always gives the same output (including through the Matrix overload).
    func testDeterministicOnTies() throws {
        for n in [5, 17, 60, 120] {
            for kind in [Kind.tieHeavy, .smallInt, .allEqual] {
                let seed = UInt64(77_000 + n)
                let costs = Self.matrix(kind, n: n, seed: seed)
                for maximize in [false, true] {
                    let what = "\(kind) n=\(n) seed=\(seed) maximize=\(maximize)"
                    let first = try LinearAssignment.solve(rows: n, cols: n, costs: costs, maximize: maximize)
                    for _ in 0..<2 {
                        XCTAssertEqual(try LinearAssignment.solve(rows: n, cols: n, costs: costs, maximize: maximize), first, what)
                    }
                    XCTAssertEqual(try LinearAssignment.solve(Matrix(rows: n, cols: n, data: costs), maximize: maximize), first, what)
                }
            }
        }
    }

    /// An all-equal matrix gives the identity (ties go to the lower index).
    func testAllEqualGivesIdentity() throws {
        for n in [2, 3, 10, 50] {
            for value: Float in [0, 1, -2.5] {
                for maximize in [false, true] {
                    let r = try LinearAssignment.solve(rows: n, cols: n, costs: [Float](repeating: value, count: n * n), maximize: maximize)
                    XCTAssertEqual(r.rowToColumn, Array(0..<n), "all-equal \(value) n=\(n) maximize=\(maximize)")
                }
            }
        }
    }

    // MARK: - SciPy

    /// The same objectives as `scipy.optimize.linear_sum_assignment` (minimise and maximise; both
    /// in float64 from the float32 costs) within 1e-9 relative, on random and weight-matching
    /// matrices of n = 200, 350, 500.
    func testAgreesWithSciPy() throws {
        try XCTSkipUnless(pythonHas("scipy, numpy"), "scipy/numpy are not importable by python3")
        let dir = temporaryDirectory(self)
        var cases: [(name: String, n: Int, costs: [Float])] = []
        for n in [200, 350, 500] {
            var rng = SplitMix64(seed: UInt64(4_200 + n))
            cases.append(("uniform seed=\(4_200 + n)", n, (0..<(n * n)).map { _ in rng.nextFloat(in: -1...1) }))
            let (a, b, _) = try Self.expertPair(d: 64, f: n, glu: false, noise: 0.3, seed: UInt64(4_300 + n))
            cases.append(("weight-matching related d=64 seed=\(4_300 + n)", n, try Alignment.costMatrix(reference: a, b).data))
        }
        var paths: [String] = []
        for (k, c) in cases.enumerated() {
            let path = dir + "/c\(k).f32"
            // Raw float32, little-endian (the byte order of every platform Swift runs on here).
            try c.costs.withUnsafeBytes { Data($0) }.write(to: URL(fileURLWithPath: path))
            paths.append(path)
        }
        let out = try runPython("""
            import sys, json
            import numpy as np
            from scipy.optimize import linear_sum_assignment
            res = []
            for path, n in zip(sys.argv[1::2], sys.argv[2::2]):
                c = np.fromfile(path, dtype='<f4').reshape(int(n), int(n))
                c64 = c.astype(np.float64)
                o = {}
                for mx in (False, True):
                    r, k = linear_sum_assignment(c, maximize=mx)
                    o['max' if mx else 'min'] = float(c64[r, k].sum())
                res.append(o)
            print(json.dumps(res))
            """, zip(paths, cases).flatMap { [$0, String($1.n)] })
        guard case .array(let results) = try JSONValue.parse(out), results.count == cases.count else {
            return XCTFail("unexpected python output: \(out)")
        }
        for (c, res) in zip(cases, results) {
            for maximize in [false, true] {
                let what = "\(c.name) n=\(c.n) maximize=\(maximize)"
                guard let scipy = res[maximize ? "max" : "min"]?.doubleValue else {
                    XCTFail("\(what): unexpected python output \(out)")
                    continue
                }
                let r = try LinearAssignment.solve(rows: c.n, cols: c.n, costs: c.costs, maximize: maximize)
                guard checkWellFormed(r, c.costs, c.n, what) else { continue }
                XCTAssertTrue(Self.close(r.objective, scipy, rel: 1e-9), "\(what): objective \(r.objective) vs scipy \(scipy)")
            }
        }
    }
}
