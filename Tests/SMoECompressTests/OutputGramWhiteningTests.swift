import Foundation
import XCTest
@testable import SMoECompress

/// The whitened factoring of down (out < in) through its output Gram P = W·(G + λI)·Wᵀ instead of
/// the input Gram G (ALGORITHM.md §4.1, issue 29), against the input Gram's exact path.
final class OutputGramWhiteningTests: XCTestCase {
    /// Token rows [T, d] with correlated, unevenly scaled features (so whitening matters).
    func tokens(_ d: Int, _ t: Int, _ rng: inout SplitMix64) -> Matrix {
        var mix = randomMatrix(d, d, &rng)
        for i in 0..<d { for j in 0..<d { mix.data[i * d + j] *= Float(1 + 3 * j) / Float(d) } }
        return BLAS.matmul(randomMatrix(t, d, &rng), mix)
    }

    /// ‖(W − W′)·L‖_F / ‖W·L‖_F with L from the explicit input Gram (float64 sums of products).
    func whitenedError(_ w: Matrix, _ approx: Matrix, _ wh: Whitening) -> Double {
        Double(wh.whiten(w - approx).frobeniusNorm) / Double(wh.whiten(w).frobeniusNorm)
    }

    /// down alone through `compressLayer` with `svd`, the report and the factored layer.
    func downOnly(_ layer: MoELayer, _ blocks: @escaping TokenBlocks, rank: RankRule, svd: SVDMethod) throws
        -> (MoELayer, [MatrixLowRankReport]) {
        var o = LowRankOptions(rank: rank, svd: svd, objective: .output)
        o.matrices = [.down]
        let (out, report) = try LowRankStage.compressLayer(layer, options: o, whitenOn: blocks)
        return (out, report.matrices)
    }

    /// The comparison of the two paths on every reached expert of `layer`: the output Gram path's
    /// report says "output-gram" (the exact one "exact"), its whitened output error equals the exact
    /// path's and the one computed directly with L from the explicit Gram, and U·V is the same.
    ///
    /// Tolerances: the data are float32 and the inputs of both paths' float64 sums (W·L by `strmm`
    /// on one side, Y = X·Wᵀ by `sgemm` on the other) carry float32 rounding of about 1e-7 relative
    /// per entry, accumulated over in ≤ 40 terms: at most ~1e-6 relative in the d × d Grams whose
    /// eigenvalues both paths truncate. The output errors (ratios 0.27–0.45 here) then agree to
    /// ~1e-7 (measured ≤ 2e-8 on these seeds); 1e-6 absolute is the bound, and the same for the
    /// weight errors. U·V moves with the r-dimensional subspace, by ~‖ΔP‖/gap (gap = σ_r² −
    /// σ_{r+1}² relative to σ_1², ≥ 0.5 % on these seeds, checked below), so ≤ ~2e-4 relative in
    /// the worst case; measured ≤ 2.4e-6, bound 1e-4.
    func assertPathsAgree(_ layer: MoELayer, _ blocks: @escaping TokenBlocks, rank: RankRule,
                          file: StaticString = #filePath, line: UInt = #line) throws {
        let (fast, fastReports) = try downOnly(layer, blocks, rank: rank, svd: .auto)
        let (exact, exactReports) = try downOnly(layer, blocks, rank: rank, svd: .exact)
        var compared = 0
        for g in 0..<layer.numStored {
            let gram = try LowRankStage.inputGram(layer, expert: g, tokens: blocks, hidden: true)
            guard gram.tokens > 0 else { continue }
            let wh = try XCTUnwrap(try Whitening(gram, relativeRidge: Whitening.defaultRelativeRidge), file: file, line: line)
            let fr = fastReports[g], er = exactReports[g]
            XCTAssertEqual(fr.svd, "output-gram", "expert \(g)", file: file, line: line)
            XCTAssertEqual(er.svd, "exact", "expert \(g)", file: file, line: line)
            XCTAssertTrue(fr.whitened && fr.activationAware, "expert \(g)", file: file, line: line)
            XCTAssertEqual(fr.rank, er.rank, "expert \(g)", file: file, line: line)
            let w = layer.experts[g].down.dense()
            let (uvFast, uvExact) = (fast.experts[g].down.dense(), exact.experts[g].down.dense())
            let direct = whitenedError(w, uvFast, wh)
            XCTAssertEqual(try XCTUnwrap(fr.outputError), try XCTUnwrap(er.outputError), accuracy: 1e-6, "expert \(g)", file: file, line: line)
            XCTAssertEqual(try XCTUnwrap(fr.outputError), direct, accuracy: 1e-6, "expert \(g)", file: file, line: line)
            XCTAssertEqual(direct, whitenedError(w, uvExact, wh), accuracy: 1e-6, "expert \(g)", file: file, line: line)
            XCTAssertLessThan(relativeError(uvFast, uvExact), 1e-4, "expert \(g)", file: file, line: line)
            XCTAssertEqual(fr.relativeError, er.relativeError, accuracy: 1e-6, "expert \(g)", file: file, line: line)
            // The gap the U·V tolerance assumes.
            let s = try wh.whiten(w).singularValues().map { Double($0) * Double($0) }
            XCTAssertGreaterThan((s[fr.rank - 1] - s[fr.rank]) / s[0], 0.005, "expert \(g): eigengap", file: file, line: line)
            compared += 1
        }
        XCTAssertGreaterThan(compared, 1, "experts reached", file: file, line: line)
    }

    /// softmax top-2 (weights p_t on the output) on a d_ff > d_model layer, fixed rank.
    func testOutputGramMatchesExactPath() throws {
        var rng = SplitMix64(seed: 29)
        let layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 4, k: 2, d: 12, f: 40)
        let x = tokens(12, 300, &rng)
        try assertPathsAgree(layer, { body in try body(x) }, rank: .fixed(4))
    }

    /// Two token blocks give the same factors as one (P is accumulated block by block), and the
    /// energy rule picks the same rank from P's eigenvalues as from the whitened singular values.
    func testBlocksAndEnergyRule() throws {
        var rng = SplitMix64(seed: 30)
        let layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 3, k: 2, d: 12, f: 32)
        let x = tokens(12, 240, &rng)
        let split: TokenBlocks = { body in try body(x.rowBlock(0, 100)); try body(x.rowBlock(100, 140)) }
        let whole: TokenBlocks = { body in try body(x) }
        let (a, _) = try downOnly(layer, split, rank: .fixed(5), svd: .auto)
        let (b, _) = try downOnly(layer, whole, rank: .fixed(5), svd: .auto)
        for g in 0..<3 {
            // float64 sums of the same products in another grouping: ~1e-15 relative in P, far
            // below float32 storage of the factors (1e-6 allows for eigenvector sign-free rounding).
            XCTAssertLessThan(relativeError(a.experts[g].down.dense(), b.experts[g].down.dense()), 1e-5, "expert \(g)")
        }
        try assertPathsAgree(layer, whole, rank: .energy(0.8))
    }

    /// Llama-4 routing (topk_sigmoid_input): the expert runs on p_t·x_t with output weight 1; the
    /// output Gram must take down's outputs on the hidden activations of the scaled rows.
    func testSigmoidInputRouter() throws {
        var rng = SplitMix64(seed: 24)
        var layer = randomLayer(&rng, type: .glu, router: .topk_sigmoid_input, E: 3, k: 1, d: 10, f: 24)
        for g in layer.experts.indices { layer.experts[g].up = .dense(randomMatrix(24, 10, &rng, scale: 1.5)) }
        let x = tokens(10, 300, &rng)
        try assertPathsAgree(layer, { body in try body(x) }, rank: .fixed(3))
    }

    /// An expert no token reached is factored by weight, as on the input Gram path: the same
    /// factors as the plain SVD, no output error, not activation-aware.
    func testUnreachedExpertFactorsByWeight() throws {
        var rng = SplitMix64(seed: 31)
        var layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 4, k: 2, d: 12, f: 40, biases: true)
        layer.routerBias![2] = -1000
        let x = tokens(12, 200, &rng)
        let blocks: TokenBlocks = { body in try body(x) }
        XCTAssertEqual(try LowRankStage.inputGram(layer, expert: 2, tokens: blocks, hidden: true).tokens, 0)
        let (out, reports) = try downOnly(layer, blocks, rank: .fixed(4), svd: .auto)
        let (old, oldReports) = try downOnly(layer, blocks, rank: .fixed(4), svd: .exact)
        XCTAssertFalse(reports[2].whitened)
        XCTAssertFalse(reports[2].activationAware)
        XCTAssertNil(reports[2].outputError)
        XCTAssertEqual(reports[2].svd, oldReports[2].svd)
        XCTAssertEqual(out.experts[2].down, old.experts[2].down)  // the same weight SVD
        let plain = try LowRankStage.factor(layer.experts[2].down.dense(), options: LowRankOptions(rank: .fixed(4))).op
        XCTAssertEqual(out.experts[2].down, plain)
        XCTAssertEqual(reports[0].svd, "output-gram")
    }

    /// The path is taken only where it applies: up/gate (out > in) keep the input Gram, and a
    /// sparse part or `--svd exact` keeps down on it too.
    func testWhereThePathApplies() throws {
        let o = LowRankOptions(rank: .fixed(4))
        XCTAssertTrue(o.factorsByOutputGram(rows: 12, cols: 40))
        XCTAssertFalse(o.factorsByOutputGram(rows: 40, cols: 12))
        XCTAssertFalse(o.factorsByOutputGram(rows: 12, cols: 12))
        XCTAssertFalse(LowRankOptions(rank: .fixed(4), sparsity: 0.01).factorsByOutputGram(rows: 12, cols: 40))
        XCTAssertFalse(LowRankOptions(rank: .fixed(4), svd: .exact).factorsByOutputGram(rows: 12, cols: 40))
        XCTAssertTrue(LowRankOptions(rank: .energy(0.9), svd: .randomized).factorsByOutputGram(rows: 12, cols: 40))
        var rng = SplitMix64(seed: 32)
        let layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 3, k: 2, d: 12, f: 40)
        let x = tokens(12, 200, &rng)
        let (_, report) = try LowRankStage.compressLayer(layer, options: LowRankOptions(rank: .fixed(4), svd: .auto),
                                                         whitenOn: { body in try body(x) })
        for m in report.matrices {
            // up/gate [40, 12]: min dimension 12 < 1024, so `auto` takes sgesdd on W·L.
            XCTAssertEqual(m.svd, m.matrix == "down" ? "output-gram" : "exact", "\(m.matrix) \(m.expert)")
        }
        var sparse = LowRankOptions(rank: .fixed(4), sparsity: 0.05)
        sparse.matrices = [.down]
        let (_, sr) = try LowRankStage.compressLayer(layer, options: sparse, whitenOn: { body in try body(x) })
        XCTAssertTrue(sr.matrices.allSatisfy { $0.svd == "exact" })
    }

    /// The check rejects an output Gram it cannot trust (the caller then falls back): one that is
    /// not positive semidefinite (an eigenvalue of −tr P), and one with a NaN.
    func testCheckRejectsUntrustworthyGram() throws {
        var rng = SplitMix64(seed: 33)
        let w = randomMatrix(6, 20, &rng)
        var p = [Double](repeating: 0, count: 36)
        for i in 0..<6 { p[i * 6 + i] = 1 }
        p[0] = -3  // eigenvalues 1 (×5) and −3: trace 2 > 0, but P is not a Gram
        let bad = OutputGram(n: 6, gram: p, trace: 2, ridge: 0, columnNorms: [Float](repeating: 1, count: 20), inputEnergy: 20, tokens: 5)
        // rank 6: all eigenvalues, including −3, are taken
        XCTAssertNil(try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(6)), outputGram: bad))
        var nan = bad
        nan.gram[7] = .nan
        XCTAssertNil(try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(2)), outputGram: nan))
        // A consistent P (W·Wᵀ: inputs X = I, no ridge) passes, and gives the plain SVD's U·V.
        var good = bad
        good.gram = BLAS.matmul(w, w, transB: true).data.map(Double.init)
        good.trace = (0..<6).reduce(0.0) { $0 + good.gram[$1 * 7] }
        let (op, rep) = try XCTUnwrap(try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(2)), outputGram: good))
        XCTAssertEqual(rep.svd, "output-gram")
        let plain = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(2), svd: .exact)).op
        XCTAssertLessThan(relativeError(op.dense(), plain.dense()), 1e-4)
        XCTAssertEqual(try XCTUnwrap(rep.outputError), rep.relativeError, accuracy: 1e-5)  // X = I: output error = weight error
    }

    /// The size planner's spectra (`whitenedSpectra`): down (d_ff > d_model) from its output Gram's
    /// eigenvalues equals the input Gram route, the singular values of W·L with L from the explicit
    /// hidden Gram; up and gate keep that route bit for bit; an unreached expert gives the weights'
    /// own singular values, as before.
    ///
    /// Tolerance: both routes start from float32 data. The input Gram route rounds L to float32,
    /// forms W·L by `strmm` in float32 and takes its singular values by float32 LAPACK (absolute
    /// error ~ε₃₂·σ₁ times modest multiples of the sizes); the P route sums float32 outputs
    /// Y = X·Wᵀ (rounded ~1e-7 relative) in float64, so P = A·Aᵀ is within ~1e-6·σ₁² and its
    /// eigenvalues likewise (Weyl), i.e. σ_k² agrees to ~1e-6·σ₁². The comparison is on σ_k²
    /// with 1e-5·σ₁² absolute (10× that); measured worst on this seed 6.2e-7·σ₁² (printed).
    func testPlannerSpectraFromTheOutputGram() throws {
        var rng = SplitMix64(seed: 62)
        var layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 4, k: 2, d: 12, f: 40, biases: true)
        layer.routerBias![3] = -1000  // expert 3: no token
        let x = tokens(12, 300, &rng)
        let blocks: TokenBlocks = { body in try body(x.rowBlock(0, 128)); try body(x.rowBlock(128, 172)) }
        var o = LowRankOptions(rank: .fixed(4))
        o.matrices = Set(ExpertMatrixName.allCases)
        let spectra = try LowRankStage.whitenedSpectra(layer, options: o, tokens: blocks)
        XCTAssertEqual(spectra.map(\.key), ExpertMatrixName.allCases.flatMap { m in (0..<4).map { LowRankOptions.rankKey(m, expert: $0) } })
        var worst = 0.0
        for (k, (key, cand)) in spectra.enumerated() {
            let m = ExpertMatrixName.allCases[k / 4], g = k % 4
            let w = layer.experts[g][matrix: m.rawValue]!.dense()
            XCTAssertEqual(cand.rows, w.rows, key)
            XCTAssertEqual(cand.cols, w.cols, key)
            let gram = try LowRankStage.inputGram(layer, expert: g, tokens: blocks, hidden: m == .down)
            XCTAssertEqual(gram.tokens > 0, g != 3, key)
            let wh = try Whitening(gram, relativeRidge: o.whiteningRidge)
            let reference = try (wh?.whiten(w) ?? w).singularValues().map(Double.init)
            XCTAssertEqual(cand.singularValues.count, min(w.rows, w.cols), key)
            if m != .down || g == 3 {
                XCTAssertEqual(cand.singularValues, reference, key)  // the input Gram route or the weights, unchanged
                continue
            }
            let s1 = reference[0] * reference[0]
            for (a, b) in zip(cand.singularValues, reference) {
                worst = max(worst, abs(a * a - b * b) / s1)
                XCTAssertEqual(a * a, b * b, accuracy: 1e-5 * s1, "\(key): σ² from P against the whitened SVD")
            }
        }
        XCTAssertGreaterThan(worst, 0, "the two routes are different computations")
        print("whitenedSpectra: down σ² from P vs input Gram route, worst |Δσ²|/σ₁² = \(worst)")
    }
}
