import Foundation
import XCTest
@testable import SMoECompress

/// The float32 first try of `--svd auto`'s leading eigenpairs (`largestSymmetricEigenpairsFloat32`,
/// `ssyevr` on the float64 Gram rounded to float32; ALGORITHM.md §4) against `dsyevr` on
/// matrices with a known spectrum, its slack, and the a-posteriori checks that keep or reject it.
final class GramSVDFloat32Tests: XCTestCase {
    /// G = Q·diag(λ)·Qᵀ in float64 (row-major, both triangles) with Q the orthonormal basis of a
    /// seeded Gaussian [n, n] (float32, orthonormal to ~1e-7, so G's spectrum is λ to that relative).
    func knownSpectrum(_ lambda: [Double], seed: UInt64) throws -> [Double] {
        let n = lambda.count
        var rng = SplitMix64(seed: seed)
        let q = try randomMatrix(n, n, &rng).orthonormalColumns()
        var a = [Double](repeating: 0, count: n * n)  // Q·diag(√λ)
        for i in 0..<n { for j in 0..<n { a[i * n + j] = Double(q.data[i * n + j]) * lambda[j].squareRoot() } }
        var g = [Double](repeating: 0, count: n * n)
        BLAS.dgemmAccumulate(m: n, n: n, k: n, a: a, transA: false, lda: n, b: a, transB: true, ldb: n, into: &g)
        return g
    }

    /// Σ_j v_jᵀ·G·v_j in float64 for the rows v_j of `vectors` (the energy they capture).
    func captured(_ g: [Double], _ vectors: Matrix) -> Double {
        let n = vectors.cols, r = vectors.rows
        let v = vectors.data.map(Double.init)
        var gv = [Double](repeating: 0, count: r * n)  // V·G [r, n]
        BLAS.dgemmAccumulate(m: r, n: n, k: n, a: v, transA: false, lda: n, b: g, transB: false, ldb: n, into: &gv)
        var s = 0.0
        for t in 0..<(r * n) { s += gv[t] * v[t] }
        return s
    }

    /// Decaying, flat-topped and clustered spectra (the cluster straddles the rank boundary, where
    /// any basis of it is optimal): the float32 eigenvalues agree with the known ones and with
    /// `dsyevr`'s, their sum lies below the true one by at most the slack (and above it by at most
    /// the same amount), and the float32 vectors capture the optimum's energy to within the
    /// slack plus the float32 vectors' non-orthonormality (~1e-6 of the captured energy).
    func testAgreesWithDsyevrOnKnownSpectra() throws {
        func clustered(_ i: Int) -> Double {
            if i < 48 { return 2 - Double(i) / 48 }
            if i < 96 { return 0.3 }
            return 0.1 / (1 + Double(i - 96) / 32)
        }
        let n = 256, r = 64
        let spectra: [(String, [Double])] = [
            ("decaying 1/(1+i/16)^2", (0..<n).map { (i: Int) -> Double in 1 / pow(1 + Double(i) / 16, 2) }),
            ("flat 1 with a 0.5 floor past 2r", (0..<n).map { (i: Int) -> Double in i < 2 * r ? 1 : 0.5 }),
            ("cluster 0.3 over ranks 48..<96", (0..<n).map(clustered)),
        ]
        for (k, (label, lambda)) in spectra.enumerated() {
            let g = try knownSpectrum(lambda, seed: 3000 + UInt64(k))
            let f32 = try largestSymmetricEigenpairsFloat32(g, n: n, count: r)
            var copy = g
            let f64 = try largestSymmetricEigenpairs(&copy, n: n, count: r)
            let known = lambda.sorted(by: >)
            XCTAssertGreaterThan(f32.slack, 0, label)
            // Each eigenvalue to ~1e-7·λ_max (float32 rounding of G and `ssyevr`); 1e-5 for margin.
            for j in 0..<r {
                XCTAssertEqual(f32.values[j], f64.values[j], accuracy: 1e-5 * known[0], "\(label) λ_\(j) vs dsyevr")
                XCTAssertEqual(f32.values[j], known[j], accuracy: 1e-5 * known[0], "\(label) λ_\(j) vs known")
            }
            let sum32 = f32.values.reduce(0, +), sum64 = f64.values.reduce(0, +)
            XCTAssertLessThanOrEqual(sum64 - sum32, f32.slack, "\(label): the slack bounds the shortfall")
            XCTAssertLessThanOrEqual(sum32 - sum64, f32.slack, label)
            let c = captured(g, f32.vectors)
            XCTAssertEqual(c, sum64, accuracy: f32.slack + 1e-6 * sum64, "\(label): captured energy")
        }
    }

    /// The Gram route under `auto` (min(out, in) ≥ 1024): "gram-float32", with the exact
    /// factorisation's error (to 1e-5 here, the float32 storage of A·V) and within the 1 % bound;
    /// `--svd gram` stays float64 `dsyevr` ("gram").
    func testAutoGramRouteTakesFloat32() throws {
        var rng = SplitMix64(seed: 3010)
        var w = randomMatrix(1100, 1024, &rng)
        for i in 0..<1100 { for j in 0..<1024 { w.data[i * 1024 + j] /= Float(1 + Double(j) / 128) } }
        let options = LowRankOptions(rank: .fixed(300))
        let auto = try LowRankStage.factor(w, options: options).report
        let gram = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(300), svd: .gram)).report
        XCTAssertEqual(auto.svd, "gram-float32")
        XCTAssertEqual(gram.svd, "gram")
        XCTAssertEqual(auto.relativeError, gram.relativeError, accuracy: 1e-5 * gram.relativeError)
        XCTAssertLessThanOrEqual(auto.relativeError, gram.relativeError * 1.01)
    }

    /// The check rejects a float32 result whose slack or captured energy is wrong: a good result
    /// passes; the same with an eigenvalue slack of half the tail (the optimum could then be half
    /// as large) fails, as does one whose factors capture 3 % of the tail less than the eigenvalues
    /// promise (poor vectors).
    func testCheckRejectsBadFloat32Result() throws {
        var rng = SplitMix64(seed: 3020)
        let w = randomMatrix(300, 256, &rng)
        let good = try w.gramTruncatedSVD(rank: 64, float32First: { _ in true })
        XCTAssertEqual(good.eigensolver, "ssyevr")
        XCTAssertTrue(LowRankStage.gramPassesCheck(good))
        let tail = good.normSquared - good.eigenvalueSum
        var slack = good
        slack.eigenvalueSlack = 0.5 * tail
        XCTAssertFalse(LowRankStage.gramPassesCheck(slack))
        var poor = good
        poor.capturedSum -= 0.03 * tail
        XCTAssertFalse(LowRankStage.gramPassesCheck(poor))
        var nan = good
        nan.eigenvalueSlack = .nan
        XCTAssertFalse(LowRankStage.gramPassesCheck(nan))
        // Rejected by the caller: `dsyevr` from the kept float64 Gram, the same error.
        let again = try w.gramTruncatedSVD(rank: 64, float32First: { _ in false })
        XCTAssertEqual(again.eigensolver, "dsyevr")
        XCTAssertEqual(again.eigenvalueSlack, 0)
        XCTAssertEqual(again.capturedSum, good.capturedSum, accuracy: 1e-5 * good.normSquared)
    }

    /// A matrix of rank 300 asked for rank 400 under `auto`: the float32 try fails the check
    /// (optimum 0), so does `dsyevr`, and the matrix goes to `sgesdd`.
    func testRankDeficientFallsBackThroughBoth() throws {
        var rng = SplitMix64(seed: 3030)
        let low = BLAS.matmul(randomMatrix(1100, 300, &rng), randomMatrix(300, 1024, &rng))
        let rep = try LowRankStage.factor(low, options: LowRankOptions(rank: .fixed(400))).report
        XCTAssertEqual(rep.svd, "exact (gram check failed)")
        XCTAssertLessThan(rep.relativeError, 1e-5)
    }

    /// The output-Gram route (down-shaped, out = 1024 < in) under `auto`: "output-gram-float32",
    /// with `dsyevr`'s output error (`--svd gram` on the same P) to 1e-5 relative; a rank-deficient
    /// P (fewer tokens than the rank, no ridge) fails the float32 try's check and takes `dsyevr`.
    func testOutputGramRouteTakesFloat32() throws {
        var rng = SplitMix64(seed: 3040)
        let out = 1024, inn = 1100, t = 1500
        let w = randomMatrix(out, inn, &rng, scale: 0.03)
        var x = randomMatrix(t, inn, &rng)
        for i in 0..<t { for j in 0..<inn { x.data[i * inn + j] /= Float(1 + Double(j) / 256) } }
        let weights = (0..<t).map { _ in Float(0.2 + 0.8 * rng.nextDouble()) }
        var acc = OutputGramAccumulator(matrix: w)
        acc.add(x, weights: weights)
        let og = acc.finish(relativeRidge: 1e-2)
        let auto = try XCTUnwrap(try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(256)), outputGram: og)).report
        let ref = try XCTUnwrap(try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(256), svd: .gram), outputGram: og)).report
        XCTAssertEqual(auto.svd, "output-gram-float32")
        XCTAssertEqual(ref.svd, "output-gram")
        XCTAssertEqual(auto.outputError!, ref.outputError!, accuracy: 1e-5 * ref.outputError!)
        // 200 tokens, no ridge: P has rank 200 < 256 and an optimum of 0, so only the 1e-6·tr P
        // float32 slack separates the routes: whichever is kept reconstructs W·L to ~1e-3.
        var acc2 = OutputGramAccumulator(matrix: w)
        acc2.add(x.rowBlock(0, 200), weights: Array(weights.prefix(200)))
        let og2 = acc2.finish(relativeRidge: 0)
        let low = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(256)), outputGram: og2)
        let kept = try XCTUnwrap(low, "dsyevr's factors pass where the float32 ones do not")
        XCTAssertLessThan(kept.report.outputError!, 1e-3, kept.report.svd)
    }
}
