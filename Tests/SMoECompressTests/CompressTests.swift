import Foundation
import XCTest
@testable import SMoECompress

final class CompressTests: XCTestCase {
    /// `compress` equals `merge` then `lowrank` run separately (same layers, bit for bit), leaves
    /// nothing but its output behind, and its report agrees with `eval` of the result.
    func testCompressEqualsMergeThenLowrankAndLeavesNoIntermediateFiles() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-mixtral.h5"), calib = fixture("trained-mixtral.calib.h5")
        let held = fixture("trained-mixtral.heldout.h5")
        let out = dir + "/c.h5"
        var res = try runCLI(["compress", model, "--calib", calib, "--eval-calib", held, "--groups", "4", "--rank", "24",
                              "--sparsity", "0.02", "-o", out, "--json", "--quiet"])
        // compress rounds the merged layer to the output type (float16 here) before factoring, as
        // merge writing a float16 file and lowrank reading it do.
        XCTAssertEqual(res.status, 0, res.stderr)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["c.h5"])
        let report = try XCTUnwrap(try JSONValue.parse(res.stdout)["report"])
        res = try runCLI(["merge", model, "--calib", calib, "--groups", "4", "-o", dir + "/m.h5", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        // compress factors for the output error on the calibration tokens: lowrank does with --calib.
        res = try runCLI(["lowrank", dir + "/m.h5", "--calib", calib, "--rank", "24", "--sparsity", "0.02", "-o", dir + "/l.h5", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        let a = try CheckpointReader(out), b = try CheckpointReader(dir + "/l.h5")
        for c in a.layers {
            XCTAssertTrue(try a.readLayer(c.name) == b.readLayer(c.name), "\(c.name): compress differs from merge + lowrank")
        }
        res = try runCLI(["eval", model, out, "--calib", held, "--json", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        let ev = try XCTUnwrap(try JSONValue.parse(res.stdout)["evaluation"])
        XCTAssertEqual(ev["expert_bytes_after"]?.intValue, report["expert_bytes_final"]?.intValue)
        XCTAssertEqual(ev["mean_relative_error"]?.doubleValue ?? -1, report["mean_relative_error_final"]?.doubleValue ?? 1, accuracy: 1e-9)
        XCTAssertEqual(a.history.last?["stage"], "compress")
        // Sizes shrink stage by stage; the merged error is below the final one.
        XCTAssertGreaterThan(report["expert_bytes_original"]!.intValue!, report["expert_bytes_merged"]!.intValue!)
        XCTAssertGreaterThan(report["expert_bytes_merged"]!.intValue!, report["expert_bytes_final"]!.intValue!)
        XCTAssertLessThan(report["mean_relative_error_merged"]!.doubleValue!, report["mean_relative_error_final"]!.doubleValue!)
    }

    /// `compress --layers X --rank R` merges and factors X only: every other layer is copied
    /// unchanged, bit for bit (it used to factor every layer), and the report lists X alone.
    func testLayersLimitsFactoringToTheNamedLayer() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-mixtral.h5")
        let original = try CheckpointReader(model)
        let chosen = original.layers[1].name
        let res = try runCLI(["compress", model, "--calib", fixture("trained-mixtral.calib.h5"), "--groups", "4", "--rank", "32",
                              "--layers", chosen, "-o", dir + "/c.h5", "--json", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        let report = try XCTUnwrap(try JSONValue.parse(res.stdout)["report"])
        XCTAssertEqual(report["layers"]?.arrayValue?.compactMap { $0["name"]?.stringValue }, [chosen])
        let out = try CheckpointReader(dir + "/c.h5")
        for c in original.layers {
            let s = try out.summary(c.name)
            if c.name == chosen {
                XCTAssertEqual(s.numStored, 4, c.name)
                XCTAssertTrue(s.isCompressed, "\(c.name) is factored")
            } else {
                XCTAssertFalse(s.isCompressed, "\(c.name) was not named: not factored")
                XCTAssertEqual(try out.readLayer(c.name), try original.readLayer(c.name), "\(c.name) copied unchanged")
            }
        }
    }

    /// `--target-size` validates the merge settings before planning (a zero block size used to
    /// loop for ever in the planner), and with `--router compact` it plans one G for every layer
    /// and writes compact layers (the plan path used to skip the router fit).
    func testTargetSizeSettingsAndCompactRouter() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("planted-mixtral.h5"), c = fixture("planted-mixtral.calib.h5")
        for (args, named) in [(["--block-size", "0"], "--block-size"), (["--router", "compact"], "--uniform-groups"),
                              (["--groups", "9"], "--groups")] {
            let r = try runCLI(["compress", m, "--calib", c, "--target-size", "0.5", "-o", dir + "/x.h5", "--quiet"] + args)
            XCTAssertEqual(r.status, 1, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix("error: ") && r.stderr.contains(named) && r.stderr.split(separator: "\n").count == 1,
                          "\(args): \(r.stderr)")
        }
        let r = try runCLI(["compress", m, "--calib", c, "--target-size", "0.5", "--router", "compact", "--uniform-groups",
                            "-o", dir + "/c.h5", "--quiet"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let out = try CheckpointReader(dir + "/c.h5")
        let counts = try out.layers.map { try out.readLayer($0.name) }.map { ($0.config.numExperts, $0.expertMap == nil) }
        XCTAssertEqual(Set(counts.map(\.0)).count, 1, "one G in every layer: \(counts)")
        XCTAssertTrue(counts.allSatisfy { $0.1 && $0.0 < 8 }, "compact layers: \(counts)")
    }

    /// Without --rank, compress is merge plus its evaluation; --groups E with frequency merging
    /// reproduces the model.
    func testMergeOnlyAndIdentity() throws {
        let dir = temporaryDirectory(self)
        let res = try runCLI(["compress", fixture("planted-switch.h5"), "--calib", fixture("planted-switch.calib.h5"),
                              "--groups", "8", "--merge-method", "frequency", "-o", dir + "/c.h5", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        XCTAssertTrue(res.stdout.contains("0.0000"), res.stdout)
        let a = try CheckpointReader(fixture("planted-switch.h5")), b = try CheckpointReader(dir + "/c.h5")
        for c in a.layers { XCTAssertEqual(try a.readLayer(c.name).experts, try b.readLayer(c.name).experts, c.name) }
    }

    func testCompressBadInputs() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("trained-switch.h5"), c = fixture("trained-switch.calib.h5")
        let cases: [([String], String)] = [
            (["compress", m, "--calib", c, "--groups", "0", "-o", dir + "/x.h5"], "--groups"),
            (["compress", m, "--calib", c, "--groups", "9", "-o", dir + "/x.h5"], "--groups"),
            (["compress", m, "--calib", c, "--groups", "4", "--rank", "0", "-o", dir + "/x.h5"], "--rank"),
            (["compress", m, "--calib", c, "--groups", "4", "--rank", "8", "--sparsity", "1.5", "-o", dir + "/x.h5"], "--sparsity"),
            (["compress", m, "--calib", c, "--groups", "4", "--rank", "4096", "-o", dir + "/x.h5"], "rank"),
            (["compress", m, "--calib", fixture("trained-mixtral.calib.h5"), "--groups", "4", "-o", dir + "/x.h5"], "trained-mixtral.calib.h5"),
            (["compress", m, "--calib", c, "--eval-calib", fixture("planted-switch.calib.h5"), "--groups", "4", "-o", dir + "/x.h5"], "planted-switch.calib.h5"),
            (["compress", m, "--calib", c, "--groups", "4", "--activation-aware", "-o", dir + "/x.h5"], "--sparsity"),
            (["compress", m, "--calib", c, "--groups", "4", "-o", m], "trained-switch.h5"),
        ]
        for (args, named) in cases {
            let res = try runCLI(args + ["--quiet"])
            XCTAssertNotEqual(res.status, 0, "\(args)")
            XCTAssertEqual(res.stderr.split(separator: "\n").count, 1, "one line: \(res.stderr)")
            XCTAssertTrue(res.stderr.contains(named), "\(args): \(res.stderr)")
            XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/x.h5"), "\(args) left an output")
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [], "no temporary files left")
    }

    /// The merge stage's per-group fallback warnings (too few routed tokens for RegMean) are
    /// `warning:` lines on stderr, the same as `merge` prints, in every mode: with --json stdout
    /// stays one JSON document, and --quiet silences progress only.
    func testMergeFallbackWarningsOnStderr() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("trained-switch.h5"), c = fixture("trained-switch.calib.h5")
        let common = ["--calib", c, "--groups", "4", "--max-tokens", "40"]
        let merged = try runCLI(["merge", m] + common + ["-o", dir + "/m.h5", "--json"])
        XCTAssertEqual(merged.status, 0, merged.stderr)
        // Besides warnings, stderr (not a terminal here) has one progress line per finished layer
        // unless --quiet.
        func warnings(_ text: String, quiet: Bool, _ what: String) -> [String] {
            let lines = text.split(separator: "\n").map(String.init)
            let progress = lines.filter { !$0.hasPrefix("warning: ") }
            XCTAssertTrue(progress.allSatisfy { $0.contains(": layer ") && $0.contains(" done in ") }, "\(what): \(text)")
            XCTAssertEqual(progress.count, quiet ? 0 : 4, "\(what): one progress line per layer unless --quiet: \(text)")
            return lines.filter { $0.hasPrefix("warning: ") }
        }
        let expected = warnings(merged.stderr, quiet: false, "merge")
        XCTAssertFalse(expected.isEmpty, "merge printed no warnings")
        // As many lines as groups whose report carries a warning, each naming its layer.
        let mergeDoc = try JSONValue.parse(merged.stdout)
        var warned: [String] = []
        for l in mergeDoc["layers"]!.arrayValue! {
            for g in l["members"]!.arrayValue! where g["warning"] != nil { warned.append(l["name"]!.stringValue!) }
        }
        XCTAssertEqual(expected.count, warned.count, merged.stderr)
        for (line, layer) in zip(expected, warned) {
            XCTAssertTrue(line.hasPrefix("warning: \(layer): group of expert "), line)
            XCTAssertTrue(line.contains("routed tokens (< 64): fell back to the frequency-weighted average"), line)
        }
        for (i, mode) in [["--json"], ["--json", "--quiet"], ["--quiet"], []].enumerated() {
            let res = try runCLI(["compress", m] + common + ["-o", dir + "/c\(i).h5"] + mode)
            XCTAssertEqual(res.status, 0, "\(mode): \(res.stderr)")
            XCTAssertEqual(warnings(res.stderr, quiet: mode.contains("--quiet"), "\(mode)"), expected, "\(mode)")
            if mode.contains("--json") {
                let doc = try JSONValue.parse(res.stdout)
                let layers = try XCTUnwrap(doc["report"]?["layers"]?.arrayValue, "\(mode)")
                let n = layers.reduce(0) { $0 + $1["merge"]!["members"]!.arrayValue!.filter { $0["warning"] != nil }.count }
                XCTAssertEqual(n, expected.count, "\(mode): the JSON report keeps the warnings too")
            } else {
                XCTAssertFalse(res.stdout.contains("warning"), "\(mode): warnings belong on stderr")
                XCTAssertTrue(res.stdout.contains("wrote \(dir)/c\(i).h5"), res.stdout)
            }
        }
        // merge's text mode prints the same lines on stderr and marks the groups in its table.
        let text = try runCLI(["merge", m] + common + ["-o", dir + "/t.h5", "--quiet"])
        XCTAssertEqual(text.stderr.split(separator: "\n").map(String.init), expected)
        XCTAssertEqual(text.stdout.components(separatedBy: "(fallback: see warning)").count - 1, expected.count, text.stdout)
    }

    /// compress on a factored checkpoint: one error line naming the file and layer (not
    /// alignment), with or without --no-align, and no output.
    func testFactoredCheckpointIsOneErrorNamingTheLayer() throws {
        let dir = temporaryDirectory(self)
        let factored = try factoredCheckpoint(dir)
        let layer = try CheckpointReader(factored).layers[0].name
        for extra in [[], ["--no-align"], ["--rank", "4"], ["--no-align", "--merge-method", "frequency", "--rank", "4"]] {
            let res = try runCLI(["compress", factored, "--calib", fixture("planted-mixtral.calib.h5"), "--groups", "4",
                                  "-o", dir + "/x.h5", "--json"] + extra)
            assertFactoredError(res, file: factored, layer: layer, "\(extra)")
            XCTAssertEqual(res.stdout, "", "\(extra): no report")
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["l.h5"], "\(extra): no output left")
        }
    }
}
