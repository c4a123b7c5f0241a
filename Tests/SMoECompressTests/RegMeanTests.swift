import XCTest
@testable import SMoECompress

final class RegMeanTests: XCTestCase {
    func blocks(_ x: Matrix, _ size: Int) -> TokenBlocks {
        { body in
            var s = 0
            while s < x.rows { let e = min(s + size, x.rows); try body(x.rowBlock(s, e - s)); s = e }
        }
    }

    /// With all members identical, every method returns that member.
    func testIdenticalMembersGiveThatMember() throws {
        var rng = SplitMix64(seed: 31)
        var layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 4, k: 2, d: 8, f: 12)
        layer.experts = (0..<4).map { _ in layer.experts[0] }
        let x = randomMatrix(400, 8, &rng)
        let grouping = LayerGrouping(groups: [[0, 1, 2], [3]], dominant: [0, 3])
        for method in MergeMethod.allCases {
            for ridge in [0.0, 1e-3] {
                let (m, reports) = try Merging.mergeLayer(layer, grouping: grouping, frequency: [0.3, 0.3, 0.2, 0.2],
                                                         options: MergeOptions(method: method, ridge: ridge, refitRidge: ridge), tokens: blocks(x, 64))
                let tol = 1e-4  // the ridges pull towards the frequency average, which is the member itself
                for name in ["up", "gate", "down"] {
                    let err = relativeError(m.experts[0][matrix: name]!.dense(), layer.experts[0][matrix: name]!.dense())
                    XCTAssertLessThan(err, tol, "\(method) ridge \(ridge) \(name): \(err) (\(reports[0].how))")
                }
                XCTAssertEqual(m.experts[1], layer.experts[3], "\(method): singleton copied exactly")
            }
        }
    }

    /// RegMean (α = 1, no ridge) equals the closed-form least-squares merge of linear maps:
    /// W* = argmin Σ_i ‖D_i^½ (X_i W_iᵀ − X_i Wᵀ)‖².
    func testRegMeanEqualsLeastSquares() throws {
        var rng = SplitMix64(seed: 32)
        let p = 5, q = 3
        let xs = (0..<3).map { _ in randomMatrix(20, p, &rng) }
        let ws = (0..<3).map { _ in randomMatrix(q, p, &rng) }
        let ds = (0..<3).map { _ in (0..<20).map { _ in Float(rng.nextDouble()) + 0.1 } }
        var grams: [[Double]] = []
        for (x, d) in zip(xs, ds) {
            var g = [Double](repeating: 0, count: p * p)
            accumulateWeightedCross(x, x, weights: d, into: &g)
            grams.append(g)
        }
        let (w, method, _) = try OutputAwareMerge.regmeanSolve(grams, ws, alpha: 1, ridge: 0)
        XCTAssertEqual(method, .cholesky)
        // Direct normal equations in Float64 with Gaussian elimination.
        var a = [[Double]](repeating: [Double](repeating: 0, count: p + q), count: p)
        for ((x, wi), d) in zip(zip(xs, ws), ds) {
            for t in 0..<x.rows {
                for i in 0..<p {
                    for j in 0..<p { a[i][j] += Double(d[t]) * Double(x[t, i]) * Double(x[t, j]) }
                    for o in 0..<q {
                        var y = 0.0
                        for j in 0..<p { y += Double(wi[o, j]) * Double(x[t, j]) }
                        a[i][p + o] += Double(d[t]) * Double(x[t, i]) * y
                    }
                }
            }
        }
        for c in 0..<p {
            let piv = (c..<p).max { abs(a[$0][c]) < abs(a[$1][c]) }!
            a.swapAt(c, piv)
            for r in 0..<p where r != c {
                let f = a[r][c] / a[c][c]
                for k in 0..<(p + q) { a[r][k] -= f * a[c][k] }
            }
        }
        for o in 0..<q { for i in 0..<p {
            XCTAssertEqual(Double(w[o, i]), a[i][p + o] / a[i][i], accuracy: 1e-4, "W*[\(o),\(i)]")
        } }
    }

    /// Gram accumulation over blocks equals one-shot accumulation.
    func testBlockAccumulationEqualsOneShot() throws {
        var rng = SplitMix64(seed: 33)
        let x = randomMatrix(103, 6, &rng), y = randomMatrix(103, 4, &rng)
        let w = (0..<103).map { _ in Float(rng.nextDouble()) }
        var one = [Double](repeating: 0, count: 24), blocked = one
        accumulateWeightedCross(x, y, weights: w, into: &one)
        var s = 0
        while s < 103 {
            let e = min(s + 10, 103)
            accumulateWeightedCross(x.rowBlock(s, e - s), y.rowBlock(s, e - s), weights: Array(w[s..<e]), into: &blocked)
            s = e
        }
        for i in 0..<24 { XCTAssertEqual(one[i], blocked[i], accuracy: 1e-9 * max(1, abs(one[i]))) }
        // And the whole merge is block-size independent.
        let r = try CheckpointReader(fixture("trained-switch.h5"))
        let c = try CalibrationReader(fixture("trained-switch.calib.h5"))
        let name = r.layers[1].name
        let layer = try r.readLayer(name)
        let xs = try c.hiddenStates(name)
        let g = LayerGrouping(groups: [[0, 2, 3], [1, 4], [5, 6, 7]], dominant: [3, 1, 5])
        let f = [Double](repeating: 0.125, count: 8)
        let (a, _) = try Merging.mergeLayer(layer, grouping: g, frequency: f, options: MergeOptions(method: .regmeanRefit), tokens: blocks(xs, 1024))
        let (b, _) = try Merging.mergeLayer(layer, grouping: g, frequency: f, options: MergeOptions(method: .regmeanRefit), tokens: blocks(xs, 37))
        for k in 0..<3 { XCTAssertLessThan(relativeError(a.experts[k].down.dense(), b.experts[k].down.dense()), 1e-4, "group \(k)") }
    }

    /// The refit reduces every group's output error on its fitting tokens relative to frequency.
    func testRefitReducesGroupErrorOnFittingTokens() throws {
        for (model, calib) in [("trained-switch.h5", "trained-switch.calib.h5"), ("trained-mixtral.h5", "trained-mixtral.calib.h5")] {
            let r = try CheckpointReader(fixture(model))
            let c = try CalibrationReader(fixture(calib))
            let name = r.layers[0].name
            let layer = try r.readLayer(name)
            let x = try c.hiddenStates(name)
            let routing = layer.route(x)
            var counts = [Double](repeating: 0, count: 8)
            for s in routing.slots { counts[s] += 1 }
            let freq = counts.map { $0 / Double(routing.slots.count) }
            let order = Grouping.byUsage(freq)
            let g = Grouping.assign(dominant: Array(order.prefix(4)), frequency: freq, similarity: (0..<64).map { Double(($0 * 7) % 5) })
            let (fm, _) = try Merging.mergeLayer(layer, grouping: g, frequency: freq)
            let (rm, _) = try Merging.mergeLayer(layer, grouping: g, frequency: freq, options: MergeOptions(method: .regmeanRefit), tokens: blocks(x, 256))
            let y = layer.forward(x, routing: routing)
            // Per group: error on the tokens routed to any of its members.
            for (gi, members) in g.groups.enumerated() where members.count > 1 {
                let rows = (0..<x.rows).filter { t in (0..<layer.config.topK).contains { members.contains(routing.slots[t * layer.config.topK + $0]) } }
                let ye = y.gatherRows(rows)
                let ef = relativeError(fm.forward(x, routing: routing).gatherRows(rows), ye)
                let er = relativeError(rm.forward(x, routing: routing).gatherRows(rows), ye)
                XCTAssertLessThan(er, ef, "\(model) group \(gi) \(members): refit \(er) vs frequency \(ef)")
            }
        }
    }

    // MARK: SymmetricSolver

    /// Row-major n×n · n×m.
    func multiply(_ a: [Double], _ x: [Double], n: Int, m: Int) -> [Double] {
        var out = [Double](repeating: 0, count: n * m)
        for i in 0..<n { for k in 0..<n { for j in 0..<m { out[i * m + j] += a[i * n + k] * x[k * m + j] } } }
        return out
    }

    func norm(_ v: [Double]) -> Double { v.reduce(0) { $0 + $1 * $1 }.squareRoot() }

    /// ‖A·X − B‖ / ‖B‖.
    func residual(_ a: [Double], _ x: [Double], _ b: [Double], n: Int, m: Int) -> Double {
        norm(zip(multiply(a, x, n: n, m: m), b).map { $0 - $1 }) / norm(b)
    }

    /// Gaussian elimination with partial pivoting (the independent reference).
    func gaussSolve(_ a: [Double], _ b: [Double], n: Int, m: Int) -> [Double] {
        var r = (0..<n).map { i in Array(a[(i * n)..<((i + 1) * n)]) + Array(b[(i * m)..<((i + 1) * m)]) }
        for c in 0..<n {
            let piv = (c..<n).max { abs(r[$0][c]) < abs(r[$1][c]) }!
            r.swapAt(c, piv)
            for i in 0..<n where i != c {
                let f = r[i][c] / r[c][c]
                for k in c..<(n + m) { r[i][k] -= f * r[c][k] }
            }
        }
        return (0..<n).flatMap { i in (0..<m).map { r[i][n + $0] / r[i][i] } }
    }

    /// Xᵀ X (row-major) for X [rows, cols] given as rows.
    func gram(_ x: [[Double]]) -> [Double] {
        let p = x[0].count
        var g = [Double](repeating: 0, count: p * p)
        for row in x { for i in 0..<p { for j in 0..<p { g[i * p + j] += row[i] * row[j] } } }
        return g
    }

    /// A well-conditioned SPD system is solved by Cholesky and matches a direct solve.
    func testSolverWellConditionedUsesCholesky() throws {
        var rng = SplitMix64(seed: 41)
        let n = 7, m = 3
        let rows = (0..<20).map { _ in (0..<n).map { _ in rng.nextGaussian() } }
        var a = gram(rows)
        for i in 0..<n { a[i * n + i] += 0.5 }
        let b = (0..<(n * m)).map { _ in rng.nextGaussian() }
        let (x, method, estimate) = try SymmetricSolver.solve(a, b, n: n, m: m)
        XCTAssertEqual(method, .cholesky, "well-conditioned: rcond estimate \(estimate)")
        XCTAssertGreaterThan(estimate, 1e-4, "well-conditioned: rcond estimate")
        let ref = gaussSolve(a, b, n: n, m: m)
        for k in 0..<(n * m) { XCTAssertEqual(x[k], ref[k], accuracy: 1e-10 * max(1, abs(ref[k])), "well-conditioned: x[\(k)]") }
        XCTAssertLessThan(residual(a, x, b, n: n, m: m), 1e-13, "well-conditioned: residual")
        // The threshold is on conditioning, not magnitude: a tiny but perfectly conditioned system.
        let tiny = (0..<(n * n)).map { $0 % (n + 1) == 0 ? 1e-20 : 0 }
        let t = try SymmetricSolver.solve(tiny, b, n: n, m: m)
        XCTAssertEqual(t.method, .cholesky, "1e-20·I")
        for k in 0..<(n * m) { XCTAssertEqual(t.x[k], b[k] * 1e20, accuracy: 1e-6 * abs(b[k] * 1e20), "1e-20·I: x[\(k)]") }
    }

    /// The switch happens at the documented threshold: diag(1, ε) has reciprocal condition ε.
    func testSolverThresholdOnDiagonalSystems() throws {
        let b = [2.0, 3.0]
        for (eps, rcond, expected) in [(1e-9, 1e-10, SymmetricSolver.Method.cholesky), (1e-11, 1e-10, .leastSquares),
                                       (1e-11, 1e-12, .cholesky), (1e-3, 1e-2, .leastSquares)] {
            let label = "diag(1, \(eps)), rcond \(rcond)"
            let (x, method, estimate) = try SymmetricSolver.solve([1, 0, 0, eps], b, n: 2, m: 1, rcond: rcond)
            XCTAssertEqual(method, expected, label)
            XCTAssertEqual(estimate, eps, accuracy: eps * 1e-6, "\(label): dpocon is exact on a diagonal")
            XCTAssertEqual(x[0], 2, accuracy: 1e-12, label)
            // Cholesky solves exactly; the least-squares fallback drops the direction whose
            // singular value is below rcond·σ_max.
            XCTAssertEqual(x[1], expected == .cholesky ? 3 / eps : 0, accuracy: 1e-9 * max(1, 3 / eps), label)
        }
    }

    /// A nearly singular Gram (rank-deficient X, plus a tiny multiple of I) takes the least-squares fallback and
    /// gives the minimum-norm solution of the consistent system: a small residual and no component
    /// along the null space of X.
    func testSolverNearlyAndExactlySingularFallBackToLeastSquares() throws {
        var rng = SplitMix64(seed: 42)
        let m = 2
        // X [30, 6]: columns 4 and 5 are combinations of columns 0–3, so null(X) is spanned by
        // v1 = (c, −1, 0) and v2 = (e, 0, −1). Integer entries keep the Gram exact.
        let c = [1.0, -2, 0, 1], e = [0.0, 1, 3, -1]
        let rows: [[Double]] = (0..<30).map { _ in
            let r = (0..<4).map { _ in Double(rng.nextInt(below: 7)) - 3 }
            return r + [zip(c, r).reduce(0) { $0 + $1.0 * $1.1 }, zip(e, r).reduce(0) { $0 + $1.0 * $1.1 }]
        }
        let n = 6
        let null = [c + [-1, 0], e + [0, -1]]
        let g0 = gram(rows)
        // A consistent right-hand side: B = Xᵀ Y.
        let y = (0..<(30 * m)).map { _ in rng.nextGaussian() }
        var b = [Double](repeating: 0, count: n * m)
        for (t, row) in rows.enumerated() { for i in 0..<n { for j in 0..<m { b[i * m + j] += row[i] * y[t * m + j] } } }
        let meanDiag = (0..<n).reduce(0.0) { $0 + g0[$1 * n + $1] } / Double(n)
        func shifted(_ delta: Double) -> [Double] {
            var a = g0
            for i in 0..<n { a[i * n + i] += delta * meanDiag }
            return a
        }
        // Gram + 1e-12·m·I is positive definite to LAPACK (Cholesky succeeds; the old dposv-only
        // solver kept it) but its reciprocal condition is ~1e-12 < 1e-10, so it must fall back.
        XCTAssertEqual(try SymmetricSolver.solve(shifted(1e-12), b, n: n, m: m, rcond: 0).method, .cholesky,
                       "Gram + 1e-12·m·I: dpotrf should succeed, so only the condition estimate triggers the fallback")
        for (label, a) in [("nearly singular (Gram + 1e-12·m·I)", shifted(1e-12)), ("nearly singular (Gram + 1e-14·m·I)", shifted(1e-14)),
                           ("exactly singular (Gram)", g0)] {
            let (x, method, estimate) = try SymmetricSolver.solve(a, b, n: n, m: m)
            XCTAssertEqual(method, .leastSquares, "\(label): rcond estimate \(estimate)")
            XCTAssertLessThan(estimate, 1e-10, label)
            XCTAssertLessThan(residual(g0, x, b, n: n, m: m), 1e-10, "\(label): residual")
            for j in 0..<m {
                let xj = (0..<n).map { x[$0 * m + j] }
                for v in null {
                    let along = abs(zip(v, xj).reduce(0) { $0 + $1.0 * $1.1 }) / (norm(v) * norm(xj))
                    XCTAssertLessThan(along, 1e-9, "\(label): column \(j) has a null-space component")
                }
            }
        }
        // The all-zero matrix (no information at all): least squares gives zero.
        let z = try SymmetricSolver.solve([Double](repeating: 0, count: n * n), b, n: n, m: m)
        XCTAssertEqual(z.method, .leastSquares, "zero matrix")
        XCTAssertEqual(z.x, [Double](repeating: 0, count: n * m), "zero matrix")
    }

    /// Blocks longer than `float64ChunkRows` are converted to float64 a chunk at a time: the
    /// streamed down system over 2500-token blocks equals the Gram-form system of the same
    /// members (float64 rounding), and so does the plain cross accumulation against a direct sum.
    func testChunkedFloat64AccumulationEqualsTheGramForm() throws {
        var rng = SplitMix64(seed: 36)
        let n = 2 * float64ChunkRows + 452, p = 7, q = 5
        let h = [randomMatrix(n, p, &rng), randomMatrix(n, p, &rng)]
        let w = [randomMatrix(q, p, &rng), randomMatrix(q, p, &rng)]
        let weights = (0..<2).map { _ in (0..<n).map { _ in Float(rng.nextDouble()) } }
        var streamed = OutputAwareMerge.RegMeanSystem(inputs: p, outputs: q)
        var grams: [[Double]] = []
        for k in 0..<2 {
            let wd = w[k].data.map(Double.init)
            streamed.addTokens(h[k], weights: weights[k], member: wd, alpha: 0.9)
            streamed.endMember(member: wd, alpha: 0.9)
            // The member's Gram by a direct float64 sum.
            var g = [Double](repeating: 0, count: p * p)
            for t in 0..<n { for i in 0..<p { for j in 0..<p {
                g[i * p + j] += Double(weights[k][t]) * Double(h[k][t, i]) * Double(h[k][t, j])
            } } }
            var viaBLAS = [Double](repeating: 0, count: p * p)
            accumulateWeightedCross(h[k], h[k], weights: weights[k], into: &viaBLAS)
            for i in 0..<(p * p) { XCTAssertEqual(viaBLAS[i], g[i], accuracy: 1e-10 * max(1, abs(g[i])), "Gram entry \(i)") }
            grams.append(g)
        }
        let (a, _, _) = try streamed.solve(ridge: 1e-3, prior: w[0])
        let (b, _, _) = try OutputAwareMerge.regmeanSolve(grams, w, alpha: 0.9, ridge: 1e-3, prior: w[0])
        XCTAssertLessThan(relativeError(a, b), 1e-6, "streamed in chunks vs Gram form")
    }

    /// RegMean's prior is averaged one matrix at a time: the same bits as the whole average.
    func testOneMatrixAverageIsTheWholeAverage() throws {
        var rng = SplitMix64(seed: 37)
        let layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 3, k: 2, biases: true)
        for weights in [[0.5, 0.3, 0.2], [0, 0, 0]] {
            let whole = try Merging.weightedAverage(layer.experts, weights: weights)
            for name in ["up", "gate", "down"] {
                XCTAssertEqual(try Merging.weightedAverage(name, of: layer.experts, weights: weights), whole[matrix: name]!.dense(), name)
            }
            let b = Merging.weightedBiases(layer.experts, weights: weights)
            XCTAssertEqual(b.up, whole.upBias)
            XCTAssertEqual(b.down, whole.downBias)
        }
    }

    // MARK: Edge cases of the merge

    /// The stored experts of a group aligned to its dominant (what the merge does before solving).
    func aligned(_ layer: MoELayer, _ members: [Int]) throws -> [Expert] {
        let ref = layer.experts[members[0]]
        return try [ref] + members.dropFirst().map { try Alignment.permute(layer.experts[$0], Alignment.permutation(reference: ref, layer.experts[$0]).perm) }
    }

    /// A member that never receives a token drops out of the Gram sums: the group's result is
    /// the RegMean merge of the other members alone.
    func testMemberWithoutTokensDropsOutOfTheSums() throws {
        var rng = SplitMix64(seed: 35)
        var layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 4, k: 2, d: 6, f: 8, biases: true)
        layer.routerBias = [0, 0, -1e4, 0]  // expert 2 is never in the top 2
        let x = randomMatrix(300, 6, &rng)
        let disp = layer.dispatch(layer.route(x))
        XCTAssertTrue(disp[2].tokens.isEmpty)
        XCTAssertFalse(disp[0].tokens.isEmpty || disp[1].tokens.isEmpty)
        let g = LayerGrouping(groups: [[0, 1, 2], [3]], dominant: [0, 3])

        // Ridge 0: the prior plays no part, so member 2's frequency does not matter either.
        let (m, r) = try Merging.mergeLayer(layer, grouping: g, frequency: [0.3, 0.3, 0.2, 0.2],
                                            options: MergeOptions(method: .regmean, ridge: 0), tokens: blocks(x, 64))
        XCTAssertEqual(r[0].how, "regmean", "empty member: \(r[0].json)")
        XCTAssertNil(r[0].warning, "empty member")
        let al = try aligned(layer, [0, 1])
        var gx: [[Double]] = [], gh: [[Double]] = []
        for (k, s) in [0, 1].enumerated() {
            let xs = x.gatherRows(disp[s].tokens)
            var a = [Double](repeating: 0, count: 36)
            accumulateWeightedCross(xs, xs, weights: disp[s].weights, into: &a)
            gx.append(a)
            let h = al[k].hidden(xs, activation: .silu)
            var b = [Double](repeating: 0, count: 64)
            accumulateWeightedCross(h, h, weights: disp[s].weights, into: &b)
            gh.append(b)
        }
        for (name, grams) in [("up", gx), ("gate", gx), ("down", gh)] {
            let (w, method, _) = try OutputAwareMerge.regmeanSolve(grams, al.map { $0[matrix: name]!.dense() }, alpha: 0.9, ridge: 0)
            XCTAssertEqual(method, .cholesky, "empty member: \(name)")
            let err = relativeError(m.experts[0][matrix: name]!.dense(), w)
            XCTAssertLessThan(err, 1e-5, "empty member: \(name) differs from the two-member RegMean by \(err)")
        }
        // Biases: token-count-weighted average of the members that saw tokens.
        let n0 = Float(disp[0].tokens.count), n1 = Float(disp[1].tokens.count)
        for i in 0..<8 {
            XCTAssertEqual(m.experts[0].upBias![i], (n0 * al[0].upBias![i] + n1 * al[1].upBias![i]) / (n0 + n1), accuracy: 1e-5, "empty member: up bias \(i)")
        }

        // Default ridge and refit, member 2 at frequency 0 (so the ridge's prior is the same):
        // the same result as merging the group without member 2.
        let f = [0.3, 0.3, 0.0, 0.4]
        for method in [MergeMethod.regmean, .regmeanRefit] {
            let (with, rw) = try Merging.mergeLayer(layer, grouping: g, frequency: f, options: MergeOptions(method: method), tokens: blocks(x, 64))
            let (without, _) = try Merging.mergeLayer(layer, grouping: LayerGrouping(groups: [[0, 1], [2], [3]], dominant: [0, 2, 3]),
                                                      frequency: f, options: MergeOptions(method: method), tokens: blocks(x, 64))
            XCTAssertEqual(rw[0].how, method.rawValue, "empty member, \(method)")
            for name in ["up", "gate", "down"] {
                let err = relativeError(with.experts[0][matrix: name]!.dense(), without.experts[0][matrix: name]!.dense())
                XCTAssertLessThan(err, 1e-6, "empty member, \(method): \(name) differs from the merge without it by \(err)")
            }
            XCTAssertEqual(with.experts[0].upBias!, without.experts[0].upBias!, "empty member, \(method): up bias")
            for (a, b) in zip(with.experts[0].downBias!, without.experts[0].downBias!) { XCTAssertEqual(a, b, accuracy: 1e-5, "empty member, \(method): down bias") }
        }
    }

    /// Too few tokens: the group keeps the frequency-weighted average and its report says how many
    /// tokens it had; a group with no tokens at all takes the plain mean.
    func testEdgeCasesNoTokensAndTooFewTokens() throws {
        var rng = SplitMix64(seed: 34)
        let layer = randomLayer(&rng, type: .mlp, router: .softmax_topk, activation: .relu, E: 4, k: 1, d: 8, f: 10)
        let g = LayerGrouping(groups: [[0, 1], [2, 3]], dominant: [0, 2])
        let freq = [0.1, 0.4, 0.3, 0.2]
        // No tokens at all: every multi-member group falls back to the plain mean, with a warning.
        let (m0, r0) = try Merging.mergeLayer(layer, grouping: g, frequency: freq,
                                              options: MergeOptions(method: .regmeanRefit), tokens: { _ in })
        XCTAssertEqual(r0.map(\.how), ["mean", "mean"])
        for gi in 0..<2 {
            let mean = try Merging.weightedAverage(try aligned(layer, g.groups[gi]), weights: [1, 1])
            XCTAssertEqual(m0.experts[gi], mean, "no tokens: group \(gi) is not the plain mean")
            XCTAssertEqual(r0[gi].warning, "no routed tokens: fell back to the plain mean", "no tokens: group \(gi)")
        }
        // Five tokens (< d_model = 8): the frequency-weighted average, with a warning naming the count.
        let x = randomMatrix(5, 8, &rng)
        let disp = layer.dispatch(layer.route(x))
        let (m1, r1) = try Merging.mergeLayer(layer, grouping: g, frequency: freq,
                                              options: MergeOptions(method: .regmean), tokens: blocks(x, 5))
        XCTAssertTrue(r1.contains { $0.how == "weighted" }, "five tokens: no group took the too-few-tokens path: \(r1.map(\.json))")
        for gi in 0..<2 {
            let members = g.groups[gi]
            let n = Set(members.flatMap { disp[$0].tokens }).count
            let label = "five tokens, group \(gi) (\(n) tokens)"
            guard let w = r1[gi].warning else { XCTFail("\(label): no warning: \(r1[gi].json)"); continue }
            if n == 0 {
                XCTAssertEqual(r1[gi].how, "mean", label)
                XCTAssertEqual(m1.experts[gi], try Merging.weightedAverage(try aligned(layer, members), weights: [1, 1]), label)
            } else {
                XCTAssertEqual(r1[gi].how, "weighted", label)
                XCTAssertTrue(w.contains("only \(n) routed tokens (< 8)"), "\(label): \(w)")
                XCTAssertEqual(m1.experts[gi], try Merging.weightedAverage(try aligned(layer, members), weights: members.map { freq[$0] }), label)
            }
        }
        // A token routed to two members of a group counts once: six tokens all routed to experts
        // 0 and 1 are 12 member-token pairs but only 6 tokens (< 8) for the group.
        var top2 = randomLayer(&rng, type: .glu, router: .softmax_topk, E: 4, k: 2, d: 8, f: 10)
        top2.routerBias = [50, 50, 0, 0]
        let x2 = randomMatrix(6, 8, &rng)
        let (m2, r2) = try Merging.mergeLayer(top2, grouping: g, frequency: freq, options: MergeOptions(method: .regmeanRefit), tokens: blocks(x2, 6))
        XCTAssertEqual(r2.map(\.how), ["weighted", "mean"], "shared tokens: \(r2.map(\.json))")
        XCTAssertEqual(r2[0].warning, "only 6 routed tokens (< 8): fell back to the frequency-weighted average", "shared tokens")
        XCTAssertEqual(m2.experts[0], try Merging.weightedAverage(try aligned(top2, [0, 1]), weights: [0.1, 0.4]), "shared tokens")
        // No calibration at all is an error naming the setting (the command line names --calib).
        XCTAssertThrowsError(try Merging.mergeLayer(layer, grouping: g, frequency: freq, options: MergeOptions(method: .regmean))) { e in
            XCTAssertEqual((e as? SMoEError)?.setting, .mergeMethod, "\(e)")
            XCTAssertEqual((e as? SMoEError)?.rendered(naming: { "--" + $0.rawValue }), "--merge-method: regmean needs calibration tokens (--calibration)")
        }
    }

    /// Slots that share a stored expert (an already merged layer) can be grouped apart: the
    /// shared expert then belongs to two groups, and each group's solve sees its tokens (the
    /// refit pass used to look them up in one group only and trapped; found by the fuzzer).
    func testStoredExpertSharedByTwoGroups() throws {
        var rng = SplitMix64(seed: 77)
        var layer = randomLayer(&rng, type: .glu, router: .softmax_topk, E: 4, k: 1, d: 6, f: 8)
        layer.experts = Array(layer.experts.prefix(3))
        layer.expertMap = [0, 0, 1, 2]
        let x = randomMatrix(400, 6, &rng)
        let g = LayerGrouping(groups: [[0, 2], [1, 3]], dominant: [0, 1])
        let freq = [0.25, 0.25, 0.25, 0.25]
        let (merged, reports) = try Merging.mergeLayer(layer, grouping: g, frequency: freq, options: MergeOptions(method: .regmeanRefit, minTokens: 1),
                                                       tokens: blocks(x, 64))
        XCTAssertEqual(merged.experts.count, 2)
        XCTAssertEqual(reports.map(\.how), ["regmean+refit", "regmean+refit"], "\(reports.map(\.json))")
        XCTAssertNil(merged.firstNonFinite)
    }
}

extension OutputAwareMerge {
    /// RegMean of members with Grams `grams` and weights `weights`, all at once (the stage folds
    /// them into a `RegMeanSystem` one member at a time; the sums are the same).
    static func regmeanSolve(_ grams: [[Double]], _ weights: [Matrix], alpha: Double, ridge: Double,
                             prior: Matrix? = nil) throws -> (w: Matrix, method: SymmetricSolver.Method, conditionEstimate: Double) {
        var system = RegMeanSystem(inputs: weights[0].cols, outputs: weights[0].rows)
        for (g, w) in zip(grams, weights) {
            var gt = g
            system.add(gram: &gt, weight: w, alpha: alpha)
        }
        return try system.solve(ridge: ridge, prior: prior)
    }

}

final class RegMeanMinTokensTests: XCTestCase {
    /// `--regmean-min-tokens`: with 64 calibration tokens the default rule (d_model = 64 distinct
    /// routed tokens) sends groups to the frequency average with a warning each; 1 solves every
    /// group (no warning); 0 is refused naming the flag.
    func testMinTokensFlag() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("trained-mixtral.h5"), c = fixture("trained-mixtral.calib.h5")
        let rule = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--max-tokens", "64", "-o", dir + "/a.h5", "--quiet"])
        XCTAssertEqual(rule.status, 0, rule.stderr)
        XCTAssertTrue(rule.stderr.contains("fell back to the frequency-weighted average"), rule.stderr)
        let solve = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--max-tokens", "64", "--regmean-min-tokens", "1", "-o", dir + "/b.h5", "--quiet"])
        XCTAssertEqual(solve.status, 0, solve.stderr)
        XCTAssertFalse(solve.stderr.contains("fell back to the frequency-weighted average"), solve.stderr)
        XCTAssertEqual(try CheckpointReader(dir + "/b.h5").history.last?["regmean_min_tokens"]?.intValue, 1)
        let bad = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--regmean-min-tokens", "0", "-o", dir + "/x.h5"])
        XCTAssertEqual(bad.stderr, "error: --regmean-min-tokens: must be at least 1 (got 0)\n")
    }
}
