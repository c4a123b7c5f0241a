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

    func testEdgeCasesNoTokensAndTooFewTokens() throws {
        var rng = SplitMix64(seed: 34)
        let layer = randomLayer(&rng, type: .mlp, router: .softmax_topk, activation: .relu, E: 4, k: 1, d: 8, f: 10)
        let g = LayerGrouping(groups: [[0, 1], [2, 3]], dominant: [0, 2])
        // No tokens at all: every multi-member group falls back to the plain mean.
        let (m0, r0) = try Merging.mergeLayer(layer, grouping: g, frequency: [0.25, 0.25, 0.25, 0.25],
                                              options: MergeOptions(method: .regmeanRefit), tokens: { _ in })
        XCTAssertEqual(r0.map(\.how), ["mean", "mean"])
        let mean = try Merging.weightedAverage([try Alignment.permutation(reference: layer.experts[0], layer.experts[1])].map { try Alignment.permute(layer.experts[1], $0.perm) } + [layer.experts[0]], weights: [1, 1])
        XCTAssertLessThan(relativeError(m0.experts[0].up.dense(), mean.up.dense()), 1e-6)
        // Five tokens (< d_model = 8): fallback with a warning.
        let x = randomMatrix(5, 8, &rng)
        let (_, r1) = try Merging.mergeLayer(layer, grouping: g, frequency: [0.25, 0.25, 0.25, 0.25],
                                             options: MergeOptions(method: .regmean), tokens: blocks(x, 5))
        XCTAssertTrue(r1.allSatisfy { $0.how == "mean" || $0.warning != nil }, "\(r1.map(\.json))")
        // No calibration at all is an error naming the option.
        XCTAssertThrowsError(try Merging.mergeLayer(layer, grouping: g, frequency: [0.25, 0.25, 0.25, 0.25], options: MergeOptions(method: .regmean)))
    }
}
