import XCTest
@testable import SMoECompress

final class AlignmentTests: XCTestCase {
    /// align recovers every planted permutation exactly, relative to the reference's own.
    func testRecoversPlantedPermutations() throws {
        for name in ["planted-switch.h5", "planted-mixtral.h5"] {
            let r = try CheckpointReader(fixture(name))
            for cfg in r.layers {
                let layer = try r.readLayer(cfg.name)
                let truth = try XCTUnwrap(try SyntheticGenerator.readPlanted(r, layer: cfg.name))
                for reference in [0, 3] {
                    let (_, report) = try Alignment.alignLayer(layer, reference: reference)
                    for e in 0..<cfg.numExperts where truth.family[e] == truth.family[reference] {
                        // Reference neuron i is prototype neuron pa[i]; expert e's neuron j is pb[j].
                        let pa = truth.permutation[reference], pb = truth.permutation[e]
                        var inv = [Int](repeating: 0, count: pb.count)
                        for (j, p) in pb.enumerated() { inv[p] = j }
                        let expected = pa.map { inv[$0] }
                        XCTAssertEqual(report.experts[e].permutation, expected, "\(name) \(cfg.name) expert \(e) → \(reference)")
                        XCTAssertGreaterThan(report.experts[e].cosineAfter, 0.99, "\(name) \(cfg.name) expert \(e)")
                    }
                }
            }
        }
    }

    /// The aligned layer computes the same function (relative error ≤ 1e-5) for both expert types.
    func testAlignedLayerComputesTheSameFunction() throws {
        for (model, calib) in [("trained-switch.h5", "trained-switch.calib.h5"), ("trained-mixtral.h5", "trained-mixtral.calib.h5"),
                               ("planted-mixtral.h5", "planted-mixtral.calib.h5")] {
            let r = try CheckpointReader(fixture(model))
            let c = try CalibrationReader(fixture(calib))
            for cfg in r.layers {
                let layer = try r.readLayer(cfg.name)
                let (aligned, report) = try Alignment.alignLayer(layer, reference: 1, parallelism: .blas)
                let x = try c.hiddenStates(cfg.name)
                XCTAssertLessThan(relativeError(aligned.forward(x), layer.forward(x)), 1e-5, "\(model) \(cfg.name)")
                XCTAssertGreaterThanOrEqual(report.meanCosineAfter, report.meanCosineBefore - 1e-12, "\(model) \(cfg.name)")
            }
        }
    }

    func testPermuteWithBiasesKeepsFunction() throws {
        var rng = SplitMix64(seed: 5)
        for type in ExpertType.allCases {
            let layer = randomLayer(&rng, type: type, router: .softmax_topk, activation: .gelu, E: 3, k: 1, biases: true)
            let perm = rng.permutation(layer.config.dFF)
            let e = try Alignment.permute(layer.experts[1], perm)
            let x = randomMatrix(9, layer.config.dModel, &rng)
            XCTAssertLessThan(relativeError(e.forward(x, activation: .gelu), layer.experts[1].forward(x, activation: .gelu)), 1e-6, "\(type)")
        }
    }

    /// The solver's permutation maximises Σ C[i, π(i)]: a random permutation never scores higher.
    func testCostMatrixMatchesDefinition() throws {
        var rng = SplitMix64(seed: 6)
        let layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 2, k: 1, d: 5, f: 7)
        let a = layer.experts[0], b = layer.experts[1]
        let c = try Alignment.costMatrix(reference: a, b)
        let ua = a.up.dense(), ub = b.up.dense(), ga = a.gate!.dense(), gb = b.gate!.dense(), da = a.down.dense(), db = b.down.dense()
        for i in 0..<7 { for j in 0..<7 {
            var s = 0.0
            for k in 0..<5 { s += Double(ua[i, k] * ub[j, k] + ga[i, k] * gb[j, k]) }
            for k in 0..<5 { s += Double(da[k, i] * db[k, j]) }
            XCTAssertEqual(Double(c[i, j]), s, accuracy: 1e-4, "C[\(i),\(j)]")
        } }
    }

    func testFactoredExpertsAreRefused() throws {
        var rng = SplitMix64(seed: 8)
        var layer = randomLayer(&rng, type: .mlp, router: .softmax_topk, E: 3, k: 1)
        let w = layer.experts[2].up.dense()
        layer.experts[2].up = .factored(LowRankSparse(u: w, v: .identity(w.cols), s: .empty(rows: w.rows, cols: w.cols)))
        XCTAssertThrowsError(try Alignment.alignLayer(layer, reference: 0)) { e in
            XCTAssertTrue("\(e)".contains("factored"), "\(e)")
        }
    }
}

final class AlignCommandTests: XCTestCase {
    func testAlignCommandKeepsFunctionAndUsesMostUsedReference() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("planted-mixtral.h5"), calib = fixture("planted-mixtral.calib.h5")
        XCTAssertEqual(try runCLI(["stats", model, "--calib", calib, "-o", dir + "/s.h5", "--quiet"]).status, 0)
        let res = try runCLI(["align", model, "--stats", dir + "/s.h5", "-o", dir + "/a.h5", "--json"])
        XCTAssertEqual(res.status, 0, res.stderr)
        let report = try JSONValue.parse(res.stdout)
        let r = try CheckpointReader(model), a = try CheckpointReader(dir + "/a.h5"), c = try CalibrationReader(calib)
        for (i, cfg) in r.layers.enumerated() {
            let truth = try XCTUnwrap(try SyntheticGenerator.readPlanted(r, layer: cfg.name))
            let mostUsed = Grouping.byUsage(truth.counts.map(Double.init))[0]
            XCTAssertEqual(report["layers"]?.arrayValue?[i]["reference"]?.intValue, mostUsed, cfg.name)
            let x = try c.hiddenStates(cfg.name)
            XCTAssertLessThan(relativeError(try a.readLayer(cfg.name).forward(x), try r.readLayer(cfg.name).forward(x)), 1e-5, cfg.name)
        }
        XCTAssertEqual(a.history.last?["stage"], "align")
    }

    func testAlignBadInputs() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-switch.h5")
        let r1 = try runCLI(["align", model, "--reference", "8", "-o", dir + "/x.h5"])
        XCTAssertEqual(r1.status, 1)
        XCTAssertTrue(r1.stderr.contains("--reference"), r1.stderr)
        let r2 = try runCLI(["align", model, "--reference", "most-used", "-o", dir + "/x.h5"])
        XCTAssertNotEqual(r2.status, 0)
        XCTAssertTrue(r2.stderr.contains("--stats"), r2.stderr)
        // A factored (compressed) input is refused with a clear error.
        let reader = try CheckpointReader(model)
        var layer = try reader.readLayer(reader.layers[0].name)
        let w = layer.experts[0].up.dense()
        layer.experts[0].up = .factored(LowRankSparse(u: w, v: .identity(w.cols), s: .empty(rows: w.rows, cols: w.cols)))
        let wr = try CheckpointWriter(destination: dir + "/f.h5", architecture: "t", history: [], entry: ["stage": "t"])
        try wr.write(layer)
        try wr.commit()
        let r3 = try runCLI(["align", dir + "/f.h5", "-o", dir + "/x.h5"])
        XCTAssertEqual(r3.status, 1)
        XCTAssertTrue(r3.stderr.contains("factored"), r3.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/x.h5"))
        // The output may not overwrite the input.
        let r4 = try runCLI(["align", model, "-o", model])
        XCTAssertEqual(r4.status, 1)
        XCTAssertTrue(r4.stderr.contains("overwrite"), r4.stderr)
    }
}
