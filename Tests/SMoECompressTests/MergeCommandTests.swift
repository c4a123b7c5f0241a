import XCTest
@testable import SMoECompress

final class MergeCommandTests: XCTestCase {
    /// Merging the planted fixtures to their number of families finds the planted groups
    /// (ARI 1) with every similarity base that can see them, and the output barely moves.
    func testPlantedGroupsFoundByEverySimilarityThatSeesThem() throws {
        let dir = temporaryDirectory(self)
        for name in ["planted-switch", "planted-mixtral"] {
            let model = fixture(name + ".h5"), calib = fixture(name + ".calib.h5")
            let r = try CheckpointReader(model)
            let P = try XCTUnwrap(try SyntheticGenerator.readPlanted(r, layer: r.layers[0].name)).family.max()! + 1
            // `feature` (mean routed input) sees the families of the top-2 fixture only: in the top-1
            // fixture a follower's few tokens are the ones its own random router direction wins.
            var cases = [("router-logits", "dominant"), ("expert-output", "dominant"), ("expert-output", "hierarchical"),
                         ("router-logits", "hierarchical")]
            if name == "planted-mixtral" { cases.append(("feature", "dominant")) }
            for (similarity, method) in cases {
                for mergeMethod in ["frequency", "regmean+refit"] {
                    let out = dir + "/\(name)-\(similarity)-\(method)-\(mergeMethod).h5"
                    let res = try runCLI(["merge", model, "--calib", calib, "--groups", "\(P)", "--similarity", similarity,
                                          "--method", method, "--merge-method", mergeMethod, "-o", out, "--quiet"])
                    XCTAssertEqual(res.status, 0, res.stderr)
                    let m = try CheckpointReader(out)
                    let c = try CalibrationReader(calib)
                    for cfg in r.layers {
                        let truth = try XCTUnwrap(try SyntheticGenerator.readPlanted(r, layer: cfg.name))
                        let merged = try m.readLayer(cfg.name)
                        let label = "\(name) \(cfg.name) \(similarity)/\(method)/\(mergeMethod)"
                        XCTAssertEqual(Grouping.adjustedRandIndex(merged.expertMap!, truth.family), 1, label)
                        let x = try c.hiddenStates(cfg.name)
                        let err = relativeError(merged.forward(x), try r.readLayer(cfg.name).forward(x))
                        XCTAssertLessThan(err, 0.05, label)
                    }
                    XCTAssertEqual(m.history.last?["stage"], "merge")
                }
            }
        }
    }

    /// --groups E reproduces the original model exactly; merging to a quarter stores a quarter
    /// of the expert bytes.
    func testGroupsEqualToEIsExactAndBytesDrop() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-switch.h5"), calib = fixture("trained-switch.calib.h5")
        XCTAssertEqual(try runCLI(["merge", model, "--calib", calib, "--groups", "8", "-o", dir + "/same.h5"]).status, 0)
        let a = try CheckpointReader(model), b = try CheckpointReader(dir + "/same.h5")
        for l in a.layers { XCTAssertEqual(try b.readLayer(l.name), try a.readLayer(l.name), l.name) }
        XCTAssertEqual(try runCLI(["merge", model, "--calib", calib, "--groups", "2", "-o", dir + "/q.h5"]).status, 0)
        let q = try CheckpointReader(dir + "/q.h5")
        for l in a.layers {
            XCTAssertEqual(try q.summary(l.name).expertFileBytes * 4, try a.summary(l.name).expertFileBytes, l.name)
        }
        // /dense is copied verbatim.
        XCTAssertEqual(try q.denseSummary().parameters, try a.denseSummary().parameters)
    }

    func testBadMergeInputs() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-switch.h5"), calib = fixture("trained-switch.calib.h5")
        for (args, mention) in [
            (["--groups", "0"], "--groups"), (["--groups", "9"], "--groups"), (["--groups", "2", "--layers", "nope"], "nope"),
            (["--groups", "2", "--similarity", "cosmic"], "--similarity"),
        ] {
            let r = try runCLI(["merge", model, "--calib", calib, "-o", dir + "/x.h5"] + args)
            XCTAssertEqual(r.status == 0, false, "\(args)")
            XCTAssertTrue(r.stderr.hasPrefix("error: ") && r.stderr.contains(mention) && r.stderr.split(separator: "\n").count == 1, "\(args): \(r.stderr)")
        }
        let wrong = try runCLI(["merge", model, "--calib", fixture("trained-mixtral.calib.h5"), "--groups", "2", "-o", dir + "/x.h5"])
        XCTAssertEqual(wrong.status, 1)
        XCTAssertTrue(wrong.stderr.contains("encoder.block.1.layer.1.mlp"), wrong.stderr)
        let nocalib = try runCLI(["merge", model, "--groups", "2", "-o", dir + "/x.h5"])
        XCTAssertEqual(nocalib.status, 1)
        XCTAssertTrue(nocalib.stderr.contains("--calib"), nocalib.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/x.h5"))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [])
    }
}
