import Foundation
import SMoECompress

/// A matrix [rows, cols] with singular values σ_i = exp(−i / decay) + 0.02 (a decaying head over
/// a flat noise floor, like trained expert weights), built as Q_1·diag(σ)·Q_2ᵀ from random
/// orthonormal factors.
func decayingSpectrumMatrix(rows: Int, cols: Int, decay: Double, seed: UInt64) throws -> Matrix {
    var rng = SplitMix64(seed: seed)
    let p = min(rows, cols)
    let a = try Matrix(rows: rows, cols: p, data: (0..<(rows * p)).map { _ in Float(rng.nextGaussian()) }).orthonormalColumns()
    let b = try Matrix(rows: cols, cols: p, data: (0..<(cols * p)).map { _ in Float(rng.nextGaussian()) }).orthonormalColumns()
    var scaled = a
    for i in 0..<rows { for j in 0..<p { scaled.data[i * p + j] *= Float(exp(-Double(j) / decay) + 0.02) } }
    return BLAS.matmul(scaled, b, transB: true)
}

func lowRankBench(_ args: [String]) throws {
    let quick = args.contains("--quick")
    var shapes: [(Int, Int, [Int])] = [(3072, 768, [32, 64, 128, 192]), (768, 3072, [32, 64, 128, 192])]
    if !quick { shapes.append((14336, 4096, [64, 128])) }
    print("rank-r factorisation (sparsity 0), decaying spectrum σ_i = exp(-i/40) + 0.02; randomized: oversampling 10, 2 power iterations")
    print("exact s: one sgesdd of the whole matrix (its spectrum serves every rank); rand s: one randomized factorisation")
    print("shape          rank   exact s   rand s  speed-up   exact err    rand err   within 1%  auto picks")
    for (rows, cols, ranks) in shapes {
        let w = try decayingSpectrumMatrix(rows: rows, cols: cols, decay: 40, seed: UInt64(rows &* 31 &+ cols))
        // One exact SVD serves every rank (sgesdd computes the whole spectrum anyway), timed once.
        var exactOptions = LowRankOptions(rank: .fixed(1), svd: .exact)
        let (_, exactTime) = try timed { try LowRankStage.factor(w, options: exactOptions) }
        for r in ranks {
            exactOptions.rank = .fixed(r)
            let (exact, _) = try timed { try LowRankStage.factor(w, options: exactOptions) }
            let randOptions = LowRankOptions(rank: .fixed(r), svd: .randomized)
            let (rand, randTime) = try timed { try LowRankStage.factor(w, options: randOptions) }
            let e = exact.report.relativeError, q = rand.report.relativeError
            let ok = q <= e * 1.01
            let auto = LowRankOptions(rank: .fixed(r)).prefersRandomized(rank: r, rows: rows, cols: cols) ? "randomized" : "exact"
            printRow(String(format: "%-13@ %5d  %8.3f %8.3f  %7.1f×  %10.6f  %10.6f   %@  %@",
                            "\(rows)x\(cols)" as NSString, r, exactTime, randTime, exactTime / randTime, e, q,
                            (ok ? "yes" : "NO ") as NSString, auto as NSString))
        }
    }
}
