import XCTest
@testable import SMoECompress

/// The committed planted fixtures are exactly what the generator writes today.
final class FixtureTests: XCTestCase {
    func testGeneratorReproducesCommittedFixtures() throws {
        let dir = temporaryDirectory(self)
        for (name, spec) in [("planted-switch", SyntheticSpec.switchFixture), ("planted-mixtral", SyntheticSpec.mixtralFixture)] {
            let truth = try SyntheticGenerator.write(spec, model: dir + "/\(name).h5", calibration: dir + "/\(name).calib.h5")
            let fresh = try CheckpointReader(dir + "/\(name).h5")
            let committed = try CheckpointReader(fixture("\(name).h5"))
            XCTAssertEqual(fresh.layers, committed.layers, name)
            XCTAssertEqual(fresh.history, committed.history, name)
            let fc = try CalibrationReader(dir + "/\(name).calib.h5")
            let cc = try CalibrationReader(fixture("\(name).calib.h5"))
            for (l, t) in zip(committed.layers, truth) {
                XCTAssertEqual(try fresh.readLayer(l.name), try committed.readLayer(l.name), "\(name) \(l.name): weights differ")
                XCTAssertEqual(try SyntheticGenerator.readPlanted(committed, layer: l.name), t, "\(name) \(l.name): planted truth differs")
                XCTAssertEqual(try fc.hiddenStates(l.name), try cc.hiddenStates(l.name), "\(name) \(l.name): tokens differ")
                XCTAssertLessThan(relativeError(try fc.output(l.name), try cc.output(l.name)), 1e-6, "\(name) \(l.name): outputs differ")
            }
        }
    }

    /// The planted fixtures are built so each family's leader is among the most used slots:
    /// the P most used slots are exactly one per family (what merging to P groups relies on).
    func testPlantedLeadersAreTheMostUsedSlots() throws {
        for name in ["planted-switch.h5", "planted-mixtral.h5"] {
            let r = try CheckpointReader(fixture(name))
            for l in r.layers {
                let t = try XCTUnwrap(try SyntheticGenerator.readPlanted(r, layer: l.name))
                let P = Set(t.family).count
                let top = (0..<l.numExperts).sorted { t.counts[$0] != t.counts[$1] ? t.counts[$0] > t.counts[$1] : $0 < $1 }.prefix(P)
                XCTAssertEqual(Set(top.map { t.family[$0] }).count, P, "\(name) \(l.name): \(t.counts) \(t.family)")
            }
        }
    }

    /// `synth --dtype bf16` stores bfloat16 weights and computes the capture on them: the
    /// stored model reproduces the capture's outputs (the same layer, streamed expert by expert).
    func testSynthStoresTheAskedTypeAndItsCaptureMatches() throws {
        let dir = temporaryDirectory(self)
        let r = try runCLI(["synth", "--layers", "2", "--experts", "4", "--families", "2", "--top-k", "2", "--d-model", "16",
                            "--d-ff", "24", "--expert-type", "glu", "--activation", "silu", "--tokens", "300", "--dtype", "bf16",
                            "-o", dir + "/m.h5", "--calib", dir + "/c.h5", "--quiet"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let model = try CheckpointReader(dir + "/m.h5")
        XCTAssertEqual(try model.expertStorage(), .bf16)
        let ev = try Evaluation.run(original: model, compressed: model, calibration: try CalibrationReader(dir + "/c.h5"))
        for l in ev.layers { XCTAssertLessThan(try XCTUnwrap(l.capturedOutputError), 1e-6, l.name) }
    }

    /// `synth` makes a DeepSeek-V3-style layer (sigmoid, renormalised, 4 expert groups of which 2
    /// are eligible, a selection bias, scaling 2.5): stored with those settings, the capture
    /// matches the stored layer, and it round-trips through `compress --groups 8` with the E-slot
    /// router and with `--router compact` (8 experts in the 4 groups, the bias refitted).
    func testSynthGroupedSigmoidLayerRoundTripsThroughCompress() throws {
        let dir = temporaryDirectory(self)
        let r = try runCLI(["synth", "--layers", "1", "--experts", "16", "--families", "4", "--top-k", "4", "--d-model", "32",
                            "--d-ff", "24", "--expert-type", "glu", "--activation", "silu", "--tokens", "400", "--dtype", "bf16",
                            "--router-type", "sigmoid_topk_norm", "--expert-groups", "4", "--topk-groups", "2", "--selection-bias",
                            "--routed-scaling-factor", "2.5", "-o", dir + "/m.h5", "--calib", dir + "/c.h5", "--quiet"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let model = try CheckpointReader(dir + "/m.h5")
        let c = try XCTUnwrap(model.layers.first)
        XCTAssertEqual(c.routerType, .sigmoid_topk_norm)
        XCTAssertEqual([c.numGroups, c.topKGroups], [4, 2])
        XCTAssertEqual(c.routedScalingFactor, 2.5)
        XCTAssertEqual(try model.readLayer(c.name).selectionBias?.count, 16)
        let calib = try CalibrationReader(dir + "/c.h5")
        let ev = try Evaluation.run(original: model, compressed: model, calibration: calib)
        for l in ev.layers { XCTAssertLessThan(try XCTUnwrap(l.capturedOutputError), 1e-6, l.name) }
        for extra in [[], ["--router", "compact"]] {
            let out = dir + "/c\(extra.count).h5"
            let res = try runCLI(["compress", dir + "/m.h5", "--calib", dir + "/c.h5", "--groups", "8", "-o", out, "--quiet"] + extra)
            XCTAssertEqual(res.status, 0, res.stderr)
            let compressed = try CheckpointReader(out)
            let layer = try compressed.readLayer(c.name)
            XCTAssertEqual(layer.numStored, 8)
            XCTAssertEqual(layer.config.numExperts, extra.isEmpty ? 16 : 8)
            XCTAssertEqual(layer.config.numGroups, 4)
            XCTAssertEqual(layer.selectionBias?.count, layer.config.numExperts)
            let e = try Evaluation.run(original: model, compressed: compressed, calibration: calib)
            for l in e.layers { XCTAssertLessThan(l.relativeError, 1, "\(l.name) \(extra)") }
        }
        let bad = try runCLI(["compress", dir + "/m.h5", "--calib", dir + "/c.h5", "--groups", "6", "--router", "compact",
                              "-o", dir + "/bad.h5"])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.stderr.contains("use 8, 12, 16"), bad.stderr)
    }
}
