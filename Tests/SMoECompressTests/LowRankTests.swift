import Foundation
import XCTest
@testable import SMoECompress

/// Low-rank plus sparse compression (ALGORITHM.md §4), `lowrank` and `expand`.
final class LowRankTests: XCTestCase {
    /// A [rows, cols] matrix with singular values σ_i = exp(−i/decay) + floor.
    func decaying(_ rows: Int, _ cols: Int, decay: Double, floor: Double = 0.01, seed: UInt64) throws -> Matrix {
        var rng = SplitMix64(seed: seed)
        let p = min(rows, cols)
        let a = try randomMatrix(rows, p, &rng).orthonormalColumns()
        var b = try randomMatrix(cols, p, &rng).orthonormalColumns()
        for i in 0..<cols { for j in 0..<p { b.data[i * p + j] *= Float(exp(-Double(j) / decay) + floor) } }
        return BLAS.matmul(a, b, transB: true)
    }

    func lowRankMatrix(_ rows: Int, _ cols: Int, rank: Int, seed: UInt64) -> Matrix {
        var rng = SplitMix64(seed: seed)
        return BLAS.matmul(randomMatrix(rows, rank, &rng), randomMatrix(rank, cols, &rng))
    }

    func factored(_ op: LinearOp, _ label: String, file: StaticString = #filePath, line: UInt = #line) -> LowRankSparse? {
        guard case .factored(let f) = op else { XCTFail("\(label): kept dense", file: file, line: line); return nil }
        return f
    }

    // MARK: one matrix

    func testExactRankMatrixIsReconstructed() throws {
        for (i, (rows, cols, r)) in [(60, 40, 3), (40, 90, 5), (128, 128, 8)].enumerated() {
            let w = lowRankMatrix(rows, cols, rank: r, seed: UInt64(10 + i))
            for svd in [SVDMethod.exact, .randomized] {
                let label = "\(rows)x\(cols) rank \(r) \(svd)"
                let (op, rep) = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(r), svd: svd))
                guard let f = factored(op, label) else { continue }
                XCTAssertEqual(f.rank, r, label)
                XCTAssertLessThan(relativeError(f.dense(), w), 1e-5, label)
                XCTAssertLessThan(rep.relativeError, 1e-5, label)
                XCTAssertEqual(rep.svd, svd.rawValue, label)
            }
        }
    }

    func testPureLowRankErrorIsEckartYoungOptimum() throws {
        var rng = SplitMix64(seed: 21)
        for (rows, cols) in [(50, 30), (30, 70), (64, 64)] {
            let w = randomMatrix(rows, cols, &rng)
            let s = try w.singularValues().map(Double.init)
            let total = s.reduce(0) { $0 + $1 * $1 }
            for r in [1, 5, 12] {
                let label = "\(rows)x\(cols) rank \(r)"
                let (op, rep) = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(r), svd: .exact))
                guard let f = factored(op, label) else { continue }
                let optimum = (s[r...].reduce(0) { $0 + $1 * $1 } / total).squareRoot()
                XCTAssertEqual(rep.relativeError, optimum, accuracy: 1e-4, label)
                XCTAssertEqual(relativeError(f.dense(), w), optimum, accuracy: 1e-4, label)
                XCTAssertEqual(f.s.nnz, 0, label)
            }
        }
    }

    /// Sparsity 1 keeps every residual entry: reconstruction exact. (The factored form is then
    /// larger than dense, so `factor` keeps W itself; the split underneath is exact too.)
    func testSparsityOneIsExact() throws {
        var rng = SplitMix64(seed: 31)
        let w = randomMatrix(40, 30, &rng)
        let (op, rep) = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(4), sparsity: 1))
        XCTAssertEqual(op, .dense(w))
        XCTAssertTrue(rep.keptDense)
        XCTAssertEqual(rep.relativeError, 0)
        let lr = try LowRankStage.truncatedSVD(w, rank: 4, options: LowRankOptions(rank: .fixed(4))).0
        var resid = w
        BLAS.gemm(lr.u, lr.v, alpha: -1, beta: 1, into: &resid)
        let (s, left) = LowRankStage.selectSparse(resid, budget: w.count, structure: .unstructured, norms: nil)
        XCTAssertEqual(s.nnz, w.count)
        XCTAssertEqual(left, 0)
        XCTAssertLessThan(relativeError(LowRankSparse(u: lr.u, v: lr.v, s: s).dense(), w), 1e-6)
    }

    /// The sparse part holds exactly round(P·out·in) entries (ties, including a matrix of
    /// integers full of them, go to the lower index), the largest ones, in a valid CSR; `row`
    /// keeps round(P·out) whole rows.
    func testSparseBudgetStructureAndCSR() throws {
        var rng = SplitMix64(seed: 41)
        let ints = Matrix(rows: 60, cols: 40, data: (0..<2400).map { _ in Float(rng.nextInt(below: 5)) - 2 })
        for (m, name) in [(randomMatrix(60, 40, &rng), "gaussian"), (ints, "integers")] {
            for p in [0.01, 0.05, 0.123, 0.2] {
                let label = "\(name) sparsity \(p)"
                let (op, _) = try LowRankStage.factor(m, options: LowRankOptions(rank: .fixed(2), sparsity: p))
                guard let f = factored(op, label) else { continue }
                XCTAssertNil(f.s.validationError(), label)
                XCTAssertEqual(f.s.nnz, Int((p * 2400).rounded()), label)
                // Kept entries are the largest of the residual.
                let resid = m - BLAS.matmul(f.u, f.v)
                var kept = Set<Int>()
                for i in 0..<60 { for k in f.s.indptr[i]..<f.s.indptr[i + 1] { kept.insert(i * 40 + Int(f.s.indices[k])) } }
                let minKept = kept.map { abs(resid.data[$0]) }.min()!
                let maxLeft = (0..<2400).filter { !kept.contains($0) }.map { abs(resid.data[$0]) }.max()!
                XCTAssertGreaterThanOrEqual(minKept, maxLeft, label)

                let (rop, _) = try LowRankStage.factor(m, options: LowRankOptions(rank: .fixed(2), sparsity: p, structure: .row))
                guard let rf = factored(rop, label + " row") else { continue }
                XCTAssertNil(rf.s.validationError(), label + " row")
                let rowsKept = Int((p * 60).rounded())
                XCTAssertEqual(rf.s.nnz, rowsKept * 40, label + " row")
                for i in 0..<60 { XCTAssertTrue([0, 40].contains(rf.s.indptr[i + 1] - rf.s.indptr[i]), label + " row \(i)") }
            }
        }
        // Ties go to the lower index: a residual of equal magnitudes keeps the first entries.
        let flat = Matrix(rows: 4, cols: 5, data: (0..<20).map { $0 % 2 == 0 ? 1 : -1 })
        let (s, _) = LowRankStage.selectSparse(flat, budget: 7, structure: .unstructured, norms: nil)
        XCTAssertEqual(s.indptr, [0, 5, 7, 7, 7])
        XCTAssertEqual(s.indices, [0, 1, 2, 3, 4, 0, 1])
    }

    func testRefinementNeverIncreasesError() throws {
        var rng = SplitMix64(seed: 51)
        let norms = (0..<48).map { _ in Float(rng.nextDouble() * 2) }
        for (i, structure) in [SparseStructure.unstructured, .row].enumerated() {
            for aware in [false, true] {
                let w = try decaying(64, 48, decay: 6, floor: 0.05, seed: UInt64(60 + i))
                    + randomMatrix(64, 48, &rng, scale: 0.02)
                let label = "\(structure) activation-aware \(aware)"
                var last = Double.infinity
                let base = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(4), sparsity: 0.1, structure: structure),
                                                   inputNorms: aware ? norms : nil).report.relativeError
                for k in [1, 2, 4] {
                    let (op, rep) = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(4), sparsity: 0.1, structure: structure, iterations: k),
                                                            inputNorms: aware ? norms : nil)
                    guard let f = factored(op, label) else { continue }
                    XCTAssertLessThanOrEqual(rep.relativeError, base * (1 + 1e-6), "\(label) iterations \(k)")
                    XCTAssertLessThanOrEqual(rep.relativeError, last * (1 + 1e-6), "\(label) iterations \(k)")
                    XCTAssertEqual(rep.relativeError, rep.errorHistory.min()!, accuracy: 1e-12, label)
                    XCTAssertEqual(relativeError(f.dense(), w), rep.relativeError, accuracy: 1e-5, label)
                    last = rep.relativeError
                }
                if !aware && structure == .unstructured { XCTAssertLessThan(last, base, "refinement should help: \(label)") }
            }
        }
    }

    func testKeptDenseWhenNotSmaller() throws {
        var rng = SplitMix64(seed: 71)
        let w = randomMatrix(8, 8, &rng)
        let (op, rep) = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(6)))
        XCTAssertEqual(op, .dense(w))
        XCTAssertTrue(rep.keptDense)
        XCTAssertNotNil(rep.reason)
        XCTAssertEqual(rep.bytesAfter, rep.bytesBefore)
        // Rank 1 of the same matrix is smaller and factored.
        XCTAssertTrue(try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(1))).op.isFactored)
    }

    func testRandomizedWithinOnePercentOfExact() throws {
        for (i, (rows, cols, r)) in [(400, 200, 20), (200, 500, 16)].enumerated() {
            let w = try decaying(rows, cols, decay: 15, seed: UInt64(80 + i))
            let exact = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(r), svd: .exact)).report
            let rand = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(r), svd: .randomized, seed: 3)).report
            XCTAssertEqual(rand.svd, "randomized")
            XCTAssertLessThanOrEqual(rand.relativeError, exact.relativeError * 1.01, "\(rows)x\(cols) rank \(r)")
            // auto picks randomized for these small ranks.
            XCTAssertEqual(try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(r))).report.svd, "randomized")
        }
    }

    func testEnergyPicksSmallestRank() throws {
        let w = try decaying(120, 80, decay: 8, seed: 90)
        let s = try w.singularValues().map { Double($0) * Double($0) }
        let total = s.reduce(0, +)
        for f in [0.3, 0.5, 0.8, 0.95, 0.999] {
            for svd in [SVDMethod.auto, .exact] {
                let rep = try LowRankStage.factor(w, options: LowRankOptions(rank: .energy(f), svd: svd)).report
                let label = "energy \(f) \(svd)"
                XCTAssertGreaterThanOrEqual(s[0..<rep.rank].reduce(0, +), f * total * (1 - 1e-6), label)
                XCTAssertLessThan(s[0..<(rep.rank - 1)].reduce(0, +), f * total, label)
            }
        }
        XCTAssertEqual(LowRankStage.rankForEnergy([3, 2, 1], fraction: 1), 3)
        XCTAssertEqual(LowRankStage.rankForEnergy([3, 2, 1], fraction: 9.0 / 14), 1)
    }

    func testBadInputsNameTheSetting() throws {
        var rng = SplitMix64(seed: 95)
        let w = randomMatrix(20, 10, &rng)
        // Values any matrix rejects: checked once, when a stage is made (`validate`).
        for (o, setting) in [(LowRankOptions(rank: .fixed(0)), Setting.rank), (LowRankOptions(rank: .energy(0)), .energy),
                             (LowRankOptions(rank: .energy(1.5)), .energy), (LowRankOptions(rank: .fixed(2), sparsity: -0.1), .sparsity),
                             (LowRankOptions(rank: .fixed(2), sparsity: 1.1), .sparsity), (LowRankOptions(rank: .fixed(2), iterations: -1), .iterations),
                             (LowRankOptions(rank: .fixed(2), matrices: []), .matrices)] {
            XCTAssertThrowsError(try o.validate()) { e in
                XCTAssertEqual((e as? SMoEError)?.setting, setting, "\(o): \(e)")
            }
        }
        // A rank larger than this matrix allows: `factor` names the setting and the matrix.
        XCTAssertThrowsError(try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(11)), name: "layer L expert 0 up")) { e in
            XCTAssertEqual((e as? SMoEError)?.setting, .rank, "\(e)")
        }
        XCTAssertThrowsError(try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(11)), name: "layer L expert 0 up")) {
            XCTAssertTrue("\($0)".contains("layer L expert 0 up"), "\($0)")
        }
        // An already-factored matrix.
        let layer = randomLayer(&rng, type: .glu, router: .softmax_topk, d: 24, f: 48)
        let (compressed, _) = try LowRankStage.compressLayer(layer, options: LowRankOptions(rank: .fixed(2), matrices: [.up]))
        XCTAssertThrowsError(try LowRankStage.compressLayer(compressed, options: LowRankOptions(rank: .fixed(2)))) {
            XCTAssertEqual("\($0)", "layer layers.0.moe expert 0 up is already factored; run expand first")
        }
        // Matrices not selected may stay factored.
        XCTAssertNoThrow(try LowRankStage.compressLayer(compressed, options: LowRankOptions(rank: .fixed(2), matrices: [.down])))
    }

    // MARK: one layer

    /// The factored forward equals the dense forward of U·V + S, for both expert types, with
    /// biases and a shared expert; activation-aware ranking included.
    func testFactoredForwardEqualsDenseForward() throws {
        var seed: UInt64 = 100
        for type in ExpertType.allCases {
            for (G, biases) in [(6, false), (4, true)] {
                seed += 1
                var rng = SplitMix64(seed: seed)
                let layer = randomLayer(&rng, type: type, router: .softmax_topk_norm, E: 6, G: G, d: 24, f: 48, biases: biases)
                let x = randomMatrix(200, 24, &rng)
                for aware in [false, true] {
                    let norms = aware ? try LowRankStage.inputNorms(layer, tokens: { try $0(x) }) : nil
                    let (c, report) = try LowRankStage.compressLayer(layer, options: LowRankOptions(rank: .fixed(4), sparsity: 0.05, iterations: 1),
                                                                     inputNorms: norms)
                    let label = "\(type) G \(G) aware \(aware)"
                    XCTAssertEqual(report.matrices.count, G * (type == .glu ? 3 : 2), label)
                    XCTAssertTrue(c.experts.allSatisfy { $0.namedMatrices.allSatisfy(\.op.isFactored) }, label)
                    XCTAssertTrue(report.matrices.allSatisfy { $0.activationAware == aware && $0.rank == 4 }, label)
                    let dense = ExpandStage.expand(c)
                    XCTAssertFalse(dense.experts.contains { $0.namedMatrices.contains(where: \.op.isFactored) }, label)
                    XCTAssertLessThanOrEqual(relativeError(c.forward(x), dense.forward(x)), 1e-5, label)
                    let perSlot = ExpandStage.expand(c, perSlot: true)
                    XCTAssertEqual(perSlot.numStored, 6, label)
                    XCTAssertNil(perSlot.expertMap, label)
                    XCTAssertLessThanOrEqual(relativeError(perSlot.forward(x), c.forward(x)), 1e-5, label)
                    XCTAssertLessThan(report.bytesAfter, report.bytesBefore, label)
                }
            }
        }
    }

    /// Input norms: per stored expert, over the tokens routed to it (a shared expert gets the
    /// tokens of all its slots), checked against a per-token loop.
    func testInputNormsFollowRouting() throws {
        var rng = SplitMix64(seed: 120)
        let layer = randomLayer(&rng, type: .glu, router: .softmax_topk, E: 6, G: 3, d: 12, f: 20)
        let x = randomMatrix(90, 12, &rng)
        let norms = try LowRankStage.inputNorms(layer, tokens: { body in try body(x.rowBlock(0, 50)); try body(x.rowBlock(50, 40)) })
        let routing = layer.route(x)
        for g in 0..<3 {
            var tokens: [Int] = []
            for t in 0..<90 where (0..<2).contains(where: { layer.storedIndex(slot: routing.slots[t * 2 + $0]) == g }) { tokens.append(t) }
            XCTAssertEqual(norms[g].tokens, tokens.count, "expert \(g)")
            let xg = x.gatherRows(tokens)
            let h = layer.experts[g].hidden(xg, activation: layer.config.activation)
            for j in 0..<12 {
                let ref = (0..<xg.rows).reduce(0.0) { $0 + Double(xg[$1, j]) * Double(xg[$1, j]) }.squareRoot()
                XCTAssertEqual(Double(norms[g].input[j]), ref, accuracy: 1e-4 * max(ref, 1), "expert \(g) input \(j)")
            }
            for j in 0..<20 {
                let ref = (0..<h.rows).reduce(0.0) { $0 + Double(h[$1, j]) * Double(h[$1, j]) }.squareRoot()
                XCTAssertEqual(Double(norms[g].hidden[j]), ref, accuracy: 1e-4 * max(ref, 1), "expert \(g) hidden \(j)")
            }
        }
        // Activation-aware ranking follows |S_ij|·‖X_j‖: a dominant column is kept whole.
        var w = randomMatrix(40, 30, &rng)
        var norm = [Float](repeating: 1, count: 30)
        norm[7] = 1e6
        for i in 0..<40 { w[i, 7] *= 0.01 }
        let (op, _) = try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(1), sparsity: 40.0 / 1200), inputNorms: norm)
        let f = try XCTUnwrap(factored(op, "activation-aware"))
        XCTAssertEqual(f.s.indices, [Int32](repeating: 7, count: 40))
    }

    // MARK: command line

    func testLowrankInspectExpandRoundTrip() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("planted-mixtral.h5"), calib = fixture("planted-mixtral.calib.h5")
        let compact = dir + "/compact.h5", dense = dir + "/dense.h5"
        let res = try runCLI(["lowrank", model, "--rank", "8", "--sparsity", "0.05", "--calib", calib, "--iterations", "1", "-o", compact, "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        XCTAssertTrue(res.stdout.contains("wrote \(compact)"), res.stdout)
        let ins = try runCLI(["inspect", compact])
        XCTAssertEqual(ins.status, 0, ins.stderr)
        XCTAssertTrue(ins.stdout.contains("up:8-8 gate:8-8 down:8-8"), ins.stdout)
        let c = try CheckpointReader(compact)
        XCTAssertEqual(c.history.last?["stage"], "lowrank")
        XCTAssertEqual(c.history.last?["rank"], 8)
        XCTAssertEqual(c.history.last?["activation_aware"], .bool(true))
        XCTAssertEqual(try c.denseSummary().parameters, try CheckpointReader(model).denseSummary().parameters)
        let exp = try runCLI(["expand", compact, "-o", dense, "--quiet"])
        XCTAssertEqual(exp.status, 0, exp.stderr)
        let d = try CheckpointReader(dense), cal = try CalibrationReader(calib)
        for l in c.layers {
            XCTAssertFalse(try d.summary(l.name).isCompressed, l.name)
            XCTAssertTrue(try c.summary(l.name).isCompressed, l.name)
            let x = try cal.hiddenStates(l.name)
            XCTAssertLessThanOrEqual(relativeError(try d.readLayer(l.name).forward(x), try c.readLayer(l.name).forward(x)), 1e-5, l.name)
        }
        XCTAssertEqual(d.history.last?["stage"], "expand")
        // --json is one document; --layers leaves the other layer dense.
        let one = try runCLI(["lowrank", model, "--energy", "0.5", "--layers", c.layers[1].name, "--matrices", "down", "-o", dir + "/one.h5", "--json"])
        XCTAssertEqual(one.status, 0, one.stderr)
        let json = try JSONValue.parse(one.stdout)
        XCTAssertEqual(json["layers"]?.arrayValue?.count, 1)
        let o = try CheckpointReader(dir + "/one.h5")
        XCTAssertFalse(try o.summary(c.layers[0].name).isCompressed)
        XCTAssertEqual(try o.summary(c.layers[1].name).matrices.map { $0.ranks != nil }, [false, false, true])
    }

    func testExpandPerSlotOnMergedFile() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("planted-mixtral.h5"), calib = fixture("planted-mixtral.calib.h5")
        let merged = dir + "/merged.h5", compact = dir + "/compact.h5", slots = dir + "/slots.h5"
        XCTAssertEqual(try runCLI(["merge", model, "--calib", calib, "--groups", "4", "-o", merged, "--quiet"]).status, 0)
        XCTAssertEqual(try runCLI(["lowrank", merged, "--rank", "6", "--sparsity", "0.02", "-o", compact, "--quiet"]).status, 0)
        for (input, label) in [(merged, "merged"), (compact, "merged + lowrank")] {
            let r = try runCLI(["expand", input, "--per-slot", "-o", slots, "--quiet"])
            XCTAssertEqual(r.status, 0, r.stderr)
            let a = try CheckpointReader(input), b = try CheckpointReader(slots), cal = try CalibrationReader(calib)
            for l in a.layers {
                let s = try b.summary(l.name)
                XCTAssertEqual(s.numStored, l.numExperts, "\(label) \(l.name)")
                XCTAssertFalse(s.hasExpertMap, "\(label) \(l.name)")
                XCTAssertEqual(try a.summary(l.name).numStored, 4, "\(label) \(l.name)")
                let x = try cal.hiddenStates(l.name)
                XCTAssertLessThanOrEqual(relativeError(try b.readLayer(l.name).forward(x), try a.readLayer(l.name).forward(x)), 1e-5, "\(label) \(l.name)")
            }
        }
    }

    func testBadLowrankCLIOptions() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("planted-mixtral.h5")
        let compact = dir + "/compact.h5"
        XCTAssertEqual(try runCLI(["lowrank", model, "--rank", "4", "-o", compact]).status, 0)
        let out = dir + "/x.h5"
        for (args, mention) in [
            ([model], "--rank"), ([model, "--rank", "0"], "--rank"), ([model, "--rank", "33"], "--rank"),
            ([model, "--rank", "2", "--energy", "0.5"], "--energy"), ([model, "--energy", "0"], "--energy"),
            ([model, "--energy", "1.5"], "--energy"), ([model, "--rank", "2", "--sparsity", "2"], "--sparsity"),
            ([model, "--rank", "2", "--sparse-structure", "column"], "--sparse-structure"),
            ([model, "--rank", "2", "--matrices", "up,wo"], "--matrices"), ([model, "--rank", "2", "--svd", "fast"], "--svd"),
            ([model, "--rank", "2", "--iterations", "-1"], "--iterations"), ([model, "--rank", "2", "--layers", "nope"], "nope"),
            // A negative value after a space is the option's own mistake, not a missing value.
            ([model, "--rank", "-1"], "--rank: must be at least 1"), ([model, "--rank", "2", "--sparsity", "-0.1"], "--sparsity: must be in"),
            ([model, "--energy", "-0.5"], "--energy"),
            ([model, "--rank", "2", "--calib", fixture("trained-switch.calib.h5")], "model.layers.0.block_sparse_moe"),
            ([compact, "--rank", "2"], "already factored; run expand first"),
        ] {
            let r = try runCLI(["lowrank"] + args + ["-o", out])
            XCTAssertNotEqual(r.status, 0, "\(args)")
            XCTAssertTrue(r.stderr.hasPrefix("error: ") && r.stderr.contains(mention) && r.stderr.split(separator: "\n").count == 1,
                          "\(args): \(r.stderr)")
        }
        let e = try runCLI(["expand", dir + "/missing.h5", "-o", out])
        XCTAssertNotEqual(e.status, 0)
        XCTAssertEqual(e.stderr.split(separator: "\n").count, 1, e.stderr)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["compact.h5"])
    }
}
