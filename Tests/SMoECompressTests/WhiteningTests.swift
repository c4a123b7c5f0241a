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
}
