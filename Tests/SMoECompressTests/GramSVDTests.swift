import Foundation
import XCTest
@testable import SMoECompress

/// The Gram-eigendecomposition truncated SVD (`--svd gram`, and `auto` at high rank on large
/// matrices; ALGORITHM.md §4) against the Eckart–Young optimum from `sgesdd`'s singular values.
final class GramSVDTests: XCTestCase {
    func frobenius(_ m: Matrix) -> Double { m.data.reduce(0.0) { $0 + Double($1) * Double($1) }.squareRoot() }

    /// ‖W − U·V‖/‖W‖ with the optimum √(Σ_{i>r} σ_i² / Σ σ_i²), tall and wide, small and full ranks.
    /// The Gram is float64, so the subspace is that of the exact SVD up to float32 rounding of W and
    /// of the factors: the 1e-4 tolerance is that of the exact path's own Eckart–Young test.
    func testGramErrorIsEckartYoungOptimum() throws {
        var rng = SplitMix64(seed: 2901)
        for (rows, cols) in [(90, 40), (40, 110), (64, 64)] {
            let w = randomMatrix(rows, cols, &rng)
            let s = try w.singularValues().map(Double.init)
            let total = s.reduce(0) { $0 + $1 * $1 }
            for r in [1, 7, 20, min(rows, cols)] {
                let label = "\(rows)x\(cols) rank \(r)"
                let (op, rep) = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(r), svd: .gram))
                XCTAssertEqual(rep.svd, "gram", label)
                let optimum = (s[r...].reduce(0) { $0 + $1 * $1 } / total).squareRoot()
                XCTAssertEqual(rep.relativeError, optimum, accuracy: 1e-4, label)
                var resid = w
                if case .factored(let f) = op { BLAS.gemm(f.u, f.v, alpha: -1, beta: 1, into: &resid) } else { continue }
                XCTAssertEqual(frobenius(resid) / frobenius(w), optimum, accuracy: 1e-4, label)
            }
        }
    }

    /// The singular values it returns are those of `sgesdd` (relative 1e-4: float32 products).
    func testGramSingularValuesMatchExact() throws {
        var rng = SplitMix64(seed: 2902)
        for (rows, cols) in [(120, 50), (50, 120)] {
            let w = randomMatrix(rows, cols, &rng)
            let exact = try w.singularValues()
            let g = try w.gramTruncatedSVD(rank: 10)
            for j in 0..<10 { XCTAssertEqual(g.svd.s[j], exact[j], accuracy: 1e-4 * exact[0], "\(rows)x\(cols) σ_\(j)") }
            XCTAssertEqual(g.svd.u.rows, rows)
            XCTAssertEqual(g.svd.vt.cols, cols)
            // U·diag(σ)·Vᵀ captures what the eigenvalues promise (the a-posteriori check's measure).
            XCTAssertEqual(g.capturedSum, g.eigenvalueSum, accuracy: 1e-5 * g.normSquared)
        }
    }

    /// A matrix of rank 3 asked for rank 6: the zero σ leave zero vectors and W is reconstructed;
    /// under `auto` the check sees an optimum of 0 and hands the matrix to `sgesdd`.
    func testRankDeficientMatrix() throws {
        var rng = SplitMix64(seed: 2903)
        let w = BLAS.matmul(randomMatrix(70, 3, &rng), randomMatrix(3, 50, &rng))
        let (op, rep) = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(6), svd: .gram))
        XCTAssertEqual(rep.svd, "gram")
        XCTAssertLessThan(rep.relativeError, 1e-5)
        XCTAssertTrue(op.isFactored)
        let g = try w.gramTruncatedSVD(rank: 6)
        XCTAssertFalse(LowRankStage.gramPassesCheck(g), "optimum 0: the check cannot resolve 1 % of it")
    }

    /// `auto`: randomized at small ranks, Gram (float32 eigenpairs first, checked) at high rank once min(out, in) ≥ 1024,
    /// `sgesdd` below that size; the Gram's error within 1 % of the exact one (here to 1e-4).
    func testAutoTakesGramAtHighRankOnLargeMatrices() throws {
        var rng = SplitMix64(seed: 2904)
        let w = randomMatrix(1100, 1024, &rng)
        let r = 400
        let auto = LowRankOptions(rank: .fixed(r))
        XCTAssertTrue(auto.prefersGram(rank: r, rows: 1100, cols: 1024))
        XCTAssertFalse(auto.prefersGram(rank: r, rows: 1100, cols: 1000), "below gramMinDimension: sgesdd")
        XCTAssertFalse(auto.prefersGram(rank: 32, rows: 1100, cols: 1024), "small rank: randomized")
        XCTAssertFalse(LowRankOptions(rank: .fixed(r), svd: .exact).prefersGram(rank: r, rows: 1100, cols: 1024))
        let gram = try LowRankStage.factor(w, options: auto).report
        let exact = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(r), svd: .exact)).report
        XCTAssertEqual(gram.svd, "gram-float32", "auto: float32 ssyevr first, kept by the check")
        XCTAssertEqual(exact.svd, "exact")
        XCTAssertLessThanOrEqual(gram.relativeError, exact.relativeError * 1.01)
        XCTAssertEqual(gram.relativeError, exact.relativeError, accuracy: 1e-4)
        // The same matrix of rank 300 at rank 400: optimum 0, so the checked path falls back.
        let low = BLAS.matmul(randomMatrix(1100, 300, &rng), randomMatrix(300, 1024, &rng))
        let fallback = try LowRankStage.factor(low, options: auto).report
        XCTAssertEqual(fallback.svd, "exact (gram check failed)")
        XCTAssertLessThan(fallback.relativeError, 1e-5)
    }

    /// Whitened (output objective): the Gram path hands the same minimiser back as `sgesdd`.
    func testWhitenedGramMatchesExact() throws {
        var rng = SplitMix64(seed: 2905)
        let w = randomMatrix(60, 40, &rng), x = randomMatrix(200, 40, &rng)
        var gram = [Double](repeating: 0, count: 40 * 40)
        for t in 0..<200 { for i in 0..<40 { for j in 0..<40 { gram[i * 40 + j] += Double(x[t, i]) * Double(x[t, j]) } } }
        func run(_ svd: SVDMethod) throws -> MatrixLowRankReport {
            let wh = try Whitening(InputGram(n: 40, gram: gram, tokens: 200))
            return try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(8), svd: svd), whitening: wh).report
        }
        let g = try run(.gram), e = try run(.exact)
        XCTAssertEqual(g.outputError!, e.outputError!, accuracy: 1e-4)
    }

    /// `symmetricEigenvalues` (dsyevd, no vectors): a known answer, and a seeded Gram against the
    /// eigenvalues `dsyevr` gives with vectors. Both are float64 LAPACK on the same matrix, backward
    /// stable to ~n·ε₆₄·‖G‖₂ per eigenvalue, so 1e-12·λ_max (n = 30, ε₆₄ = 2.2e-16) is the bound.
    func testSymmetricEigenvaluesWithoutVectors() throws {
        var two: [Double] = [2, 1, 1, 2]
        let known = try symmetricEigenvalues(&two, n: 2)
        XCTAssertEqual(known[0], 3, accuracy: 1e-14)
        XCTAssertEqual(known[1], 1, accuracy: 1e-14)
        var rng = SplitMix64(seed: 61)
        let a = randomMatrix(20, 30, &rng)  // rank 20: ten eigenvalues are 0 up to rounding
        var g = [Double](repeating: 0, count: 30 * 30)
        accumulateGramFloat64(a, into: &g)
        for i in 0..<30 { for j in 0..<i { g[i * 30 + j] = g[j * 30 + i] } }
        var g1 = g, g2 = g
        let values = try symmetricEigenvalues(&g1, n: 30)
        let reference = try largestSymmetricEigenpairs(&g2, n: 30, count: 30).values
        XCTAssertEqual(values.count, 30)
        for k in 0..<30 { XCTAssertEqual(values[k], reference[k], accuracy: 1e-12 * reference[0], "eigenvalue \(k)") }
        for k in 1..<30 { XCTAssertGreaterThanOrEqual(values[k - 1], values[k], "largest first") }
        XCTAssertEqual(values.reduce(0, +), (0..<30).reduce(0.0) { $0 + g[$1 * 30 + $1] }, accuracy: 1e-10 * reference[0], "trace")
    }
}
