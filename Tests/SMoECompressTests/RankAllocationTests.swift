import Foundation
import XCTest
@testable import SMoECompress

/// Per-matrix ranks from a byte budget (ALGORITHM.md §4.2).
final class RankAllocationTests: XCTestCase {
    /// W = Q₁·diag(s)·Q₂ᵀ with random orthonormal Q's: a matrix with exactly the spectrum s.
    func matrix(_ n: Int, spectrum s: [Float], seed: UInt64) throws -> Matrix {
        var rng = SplitMix64(seed: seed)
        let q1 = try randomMatrix(n, n, &rng).orthonormalColumns(), q2 = try randomMatrix(n, n, &rng).orthonormalColumns()
        var scaled = q1
        for i in 0..<n { for j in 0..<n { scaled.data[i * n + j] *= s[j] } }
        return BLAS.matmul(scaled, q2, transB: true)
    }

    func testNeverExceedsTheBudget() {
        var rng = SplitMix64(seed: 11)
        for trial in 0..<40 {
            let cands = (0..<(1 + trial % 7)).map { _ -> RankCandidate in
                let rows = 4 + Int(rng.next() % 40), cols = 4 + Int(rng.next() % 40)
                let s = (0..<min(rows, cols)).map { _ in Double(rng.nextGaussian()).magnitude }.sorted(by: >)
                return RankCandidate(rows: rows, cols: cols, singularValues: s)
            }
            let minimum = cands.reduce(0) { $0 + $1.bytes(rank: 1, floatBytes: 2) }
            let budget = minimum + Int(rng.next() % 20_000)
            let a = try! XCTUnwrap(RankAllocation.allocate(cands, budget: budget, floatBytes: 2))
            XCTAssertLessThanOrEqual(a.bytes, budget)
            XCTAssertEqual(a.bytes, zip(cands, a.ranks).reduce(0) { $0 + $1.0.bytes(rank: $1.1, floatBytes: 2) })
            XCTAssertTrue(zip(cands, a.ranks).allSatisfy { $1 >= 1 && $1 <= $0.maxRank(floatBytes: 2) })
            XCTAssertNil(RankAllocation.allocate(cands, budget: minimum - 1, floatBytes: 2))
        }
    }

    /// One easy matrix (fast-decaying spectrum) and one hard one (flat): at the bytes of rank 8
    /// each, the allocation gives the hard one most of the ranks and a lower total error, which
    /// the factored matrices confirm.
    func testBeatsUniformRanksOnEasyAndHardMatrices() throws {
        let n = 48
        let easy: [Float] = (0..<n).map { 10 * powf(0.5, Float($0)) }, hard: [Float] = (0..<n).map { 3 - Float($0) * 0.02 }
        let ws = [try matrix(n, spectrum: easy, seed: 1), try matrix(n, spectrum: hard, seed: 2)]
        let cands = try ws.map { RankCandidate(rows: n, cols: n, singularValues: try $0.singularValues().map(Double.init)) }
        let budget = cands.reduce(0) { $0 + $1.bytes(rank: 8, floatBytes: 4) }
        let a = try XCTUnwrap(RankAllocation.allocate(cands, budget: budget, floatBytes: 4))
        XCTAssertLessThanOrEqual(a.bytes, budget)
        XCTAssertGreaterThan(a.ranks[1], a.ranks[0])
        let uniform = cands.reduce(0.0) { $0 + $1.tailEnergy(rank: 8) }
        XCTAssertLessThan(a.errorEnergy, 0.97 * uniform)
        // The errors of the factored matrices are the predicted ones (Eckart–Young; float32
        // SVD: 1e-3 relative).
        func measured(_ ranks: [Int]) throws -> Double {
            try zip(ws, ranks).reduce(0.0) { acc, p in
                let op = try LowRankStage.factor(p.0, options: LowRankOptions(rank: .fixed(p.1), svd: .exact)).op
                let e = (p.0 - op.dense()).frobeniusNorm
                return acc + e * e
            }
        }
        XCTAssertEqual(try measured(a.ranks), a.errorEnergy, accuracy: 1e-3 * uniform)
        XCTAssertLessThan(try measured(a.ranks), try measured([8, 8]))
    }
}
