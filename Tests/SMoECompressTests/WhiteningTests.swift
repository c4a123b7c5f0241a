import Foundation
import XCTest
@testable import SMoECompress

/// Activation-aware (whitened) low rank, ALGORITHM.md §4.1.
final class WhiteningTests: XCTestCase {
    /// X [n, T] with correlated, unevenly scaled features (so whitening changes the answer).
    func inputs(_ n: Int, _ t: Int, _ rng: inout SplitMix64) -> Matrix {
        var mix = randomMatrix(n, n, &rng)
        for i in 0..<n { for j in 0..<n { mix.data[i * n + j] *= Float(1 + 3 * j) / Float(n) } }
        return BLAS.matmul(mix, randomMatrix(n, t, &rng))
    }

    func gram(_ x: Matrix) -> InputGram {
        let g = BLAS.matmul(x, x, transB: true)
        return InputGram(n: x.rows, gram: g.data.map(Double.init), tokens: x.cols)
    }

    func outputErrorSq(_ w: Matrix, _ op: LinearOp, _ x: Matrix) -> Double {
        let d = BLAS.matmul(w - op.dense(), x)
        return d.data.reduce(0.0) { $0 + Double($1) * Double($1) }
    }

    /// With no ridge, ‖(W − U·V)·X‖² equals the output-optimal value: the tail Σ_{i>r} σ_i² of the
    /// singular values of W·X (the best rank-r approximation of W·X is reachable as B·X because X
    /// has full row rank), computed without the Cholesky path; and no random rank-r perturbation
    /// of the factors does better.
    func testWhitenedTruncationIsOutputOptimal() throws {
        var rng = SplitMix64(seed: 7)
        let w = randomMatrix(12, 9, &rng), x = inputs(9, 60, &rng)
        var o = LowRankOptions(rank: .fixed(3), svd: .exact)
        o.whiteningRidge = 0
        let wh = try XCTUnwrap(try Whitening(gram(x), relativeRidge: 0))
        let (op, report) = try LowRankStage.factor(w, options: o, whitening: wh)
        XCTAssertTrue(report.whitened)
        let err = outputErrorSq(w, op, x)
        let s = try BLAS.matmul(w, x).singularValues().map(Double.init)
        let optimum = s[3...].reduce(0) { $0 + $1 * $1 }
        // float32 products and SVDs: 1e-4 relative is ~100 float32 roundings of a sum of squares.
        XCTAssertEqual(err, optimum, accuracy: 1e-4 * s.reduce(0) { $0 + $1 * $1 })
        // Plain weight SVD is measurably worse on the output.
        let plain = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(3), svd: .exact)).op
        XCTAssertGreaterThan(outputErrorSq(w, plain, x), err * 1.05)
        guard case .factored(let f) = op else { return XCTFail("not factored") }
        for trial in 0..<50 {
            var r2 = SplitMix64(seed: UInt64(100 + trial))
            let u = f.u + randomMatrix(f.u.rows, f.u.cols, &r2, scale: 0.02)
            let v = f.v + randomMatrix(f.v.rows, f.v.cols, &r2, scale: 0.02)
            let other = LinearOp.factored(LowRankSparse(u: u, v: v, s: .empty(rows: 12, cols: 9)))
            XCTAssertGreaterThanOrEqual(outputErrorSq(w, other, x), err * (1 - 1e-5), "trial \(trial)")
        }
    }

    /// With X = I (any ridge: G + λI is then a multiple of I) whitening gives the plain SVD's U·V.
    func testIdentityInputsGivePlainSVD() throws {
        var rng = SplitMix64(seed: 3)
        let w = randomMatrix(16, 10, &rng)
        let wh = try XCTUnwrap(try Whitening(InputGram(n: 10, gram: Matrix.identity(10).data.map(Double.init), tokens: 10)))
        for method in [SVDMethod.exact, .randomized] {
            let o = LowRankOptions(rank: .fixed(4), svd: method)
            let a = try LowRankStage.factor(w, options: o, whitening: wh).op.dense()
            let b = try LowRankStage.factor(w, options: o).op.dense()
            XCTAssertLessThan(relativeError(a, b), 1e-5, "\(method)")
        }
    }

    /// The triangular solve undoes the whitening, and an all-zero Gram (an expert no token
    /// reached) has no whitening.
    func testWhitenUnwhitenRoundTrip() throws {
        var rng = SplitMix64(seed: 5)
        let x = inputs(8, 30, &rng), v = randomMatrix(3, 8, &rng)
        let wh = try XCTUnwrap(try Whitening(gram(x)))
        XCTAssertLessThan(relativeError(wh.unwhiten(wh.whiten(v)), v), 1e-5)
        XCTAssertNil(try Whitening(InputGram(n: 4, gram: [Double](repeating: 0, count: 16), tokens: 0)))
    }

    /// On a trained fixture layer (merged to 4 groups), the output objective gives a lower
    /// held-out layer output error than weight SVD at ranks 8, 16 and 32.
    func testOutputObjectiveBeatsWeightOnHeldOut() throws {
        let model = try CheckpointReader(fixture("trained-mixtral.h5"))
        let calib = try CalibrationReader(fixture("trained-mixtral.calib.h5"))
        let heldout = try CalibrationReader(fixture("trained-mixtral.heldout.h5"))
        let name = model.layers[1].name
        let merge = try MergeStage(model: model, calibration: calib, stats: nil,
                                   settings: MergeSettings(groups: 4, layers: [name]))
        let original = try model.readLayer(name)
        let merged = try merge.process(source: LayerSource(original), progress: nil).output
        for rank in [8, 16, 32] {
            var errors: [LowRankObjective: Double] = [:]
            for objective in LowRankObjective.allCases {
                let o = LowRankOptions(rank: .fixed(rank), objective: objective)
                let (layer, _) = try LowRankStage.compressLayer(merged, options: o,
                                                               whitenOn: objective == .output ? calib.tokenBlocks(name) : nil)
                var acc = try EvaluationAccumulator(original: original, compressed: layer)
                try heldout.forEachBlock(name) { _, x in try acc.add(x) }
                errors[objective] = acc.result(bytesBefore: 1, bytesAfter: 1).relativeError
            }
            XCTAssertLessThan(errors[.output]!, errors[.weight]!, "rank \(rank)")
        }
    }

    /// Llama-4 routing (topk_sigmoid_input) scales the expert input: the expert runs on σ(z)·x and
    /// its output enters with weight 1. The Grams are those of the explicitly pre-scaled rows (for
    /// down: the hidden activations of the scaled rows, not the routing-weighted hidden of the
    /// unscaled ones), the factored down equals the one whitened with that explicit Gram, and its
    /// output error on the scaled tokens is no larger than with the unscaled-input Gram.
    func testInputScalingRouterWhitensTheScaledInputs() throws {
        var rng = SplitMix64(seed: 24)
        var layer = randomLayer(&rng, type: .glu, router: .topk_sigmoid_input, E: 3, k: 1, d: 10, f: 16)
        for g in layer.experts.indices { layer.experts[g].up = .dense(randomMatrix(16, 10, &rng, scale: 1.5)) }
        let x = inputs(10, 240, &rng).transposed()
        let blocks: TokenBlocks = { body in try body(x) }
        let disp = layer.dispatch(layer.route(x))
        let g = try XCTUnwrap(disp.indices.max { disp[$0].tokens.count < disp[$1].tokens.count })
        XCTAssertTrue(Set(disp[g].weights.map { ($0 * 100).rounded() }).count > 3, "σ(z) varies over the expert's tokens")
        var scaled = x.gatherRows(disp[g].tokens)
        for (r, w) in disp[g].weights.enumerated() { for j in 0..<10 { scaled.data[r * 10 + j] *= w } }
        let h = layer.experts[g].hidden(scaled, activation: layer.config.activation)
        // Known answers: XᵀX of the scaled rows and HᵀH of their hidden activations.
        for (hidden, rows) in [(false, scaled), (true, h)] {
            let want = BLAS.matmul(rows, transA: true, rows).data.map(Double.init)
            let got = try LowRankStage.inputGram(layer, expert: g, tokens: blocks, hidden: hidden)
            XCTAssertEqual(got.tokens, disp[g].tokens.count)
            let scale = want.map(abs).max()!
            // float32 products summed in float64 in another order: 1e-5 of the largest entry.
            for (a, b) in zip(got.gram, want) { XCTAssertEqual(a, b, accuracy: 1e-5 * scale, "hidden \(hidden)") }
        }
        // The old reading (hidden of the unscaled rows, weighted by σ(z)) is a different input:
        // 3% apart here (float32 rounding would be ~1e-7), so the checks below can tell them apart.
        let hUnscaled = layer.experts[g].hidden(x.gatherRows(disp[g].tokens), activation: layer.config.activation)
        var hWeighted = hUnscaled
        for (r, w) in disp[g].weights.enumerated() { for j in 0..<16 { hWeighted.data[r * 16 + j] *= w } }
        XCTAssertGreaterThan(relativeError(hWeighted, h), 0.01)
        // Down at rank 3 through the stage equals the factor whitened with the explicit Gram.
        var o = LowRankOptions(rank: .fixed(3), objective: .output)
        o.svd = .exact
        o.matrices = [.down]
        let (factored, _) = try LowRankStage.compressLayer(layer, options: o, whitenOn: blocks)
        let down = layer.experts[g].down.dense()
        let explicit = try XCTUnwrap(try Whitening(gram(h.transposed()), relativeRidge: o.whiteningRidge))
        let want = try LowRankStage.factor(down, options: o, whitening: explicit).op.dense()
        XCTAssertLessThan(relativeError(factored.experts[g].down.dense(), want), 1e-4)
        let old = try XCTUnwrap(try Whitening(gram(hWeighted.transposed()), relativeRidge: o.whiteningRidge))
        let oldOp = try LowRankStage.factor(down, options: o, whitening: old).op
        let newErr = outputErrorSq(down, factored.experts[g].down, h.transposed())
        XCTAssertLessThanOrEqual(newErr, outputErrorSq(down, oldOp, h.transposed()) * (1 + 1e-4))
        // At full rank the factorisation is exact on the scaled tokens.
        o.rank = .fixed(10)
        let full = try LowRankStage.compressLayer(layer, options: o, whitenOn: blocks).0
        XCTAssertLessThan(outputErrorSq(down, full.experts[g].down, h.transposed()), 1e-8 * outputErrorSq(down, .dense(Matrix(rows: 10, cols: 16)), h.transposed()))
    }
}
