import Foundation
import XCTest
@testable import SMoECompress

/// Resume (issue 15, item 4; docs/FORMAT.md §6): a killed multi-layer run continues with
/// `--resume` after its last finished layer and writes the file an uninterrupted run writes,
/// history included; a run whose inputs or settings differ starts over and says why.
final class ResumeTests: XCTestCase {
    let mixtral = fixture("trained-mixtral.h5"), mixtralCalib = fixture("trained-mixtral.calib.h5")
    let switchModel = fixture("trained-switch.h5"), switchCalib = fixture("trained-switch.calib.h5")

    func cli(_ args: [String], environment: [String: String?] = [:], file: StaticString = #filePath,
             line: UInt = #line) throws -> CLIResult {
        let r = try runCLI(args, environment: environment)
        XCTAssertEqual(r.status, 0, "smoe-compress \(args.joined(separator: " ")): \(r.stderr)", file: file, line: line)
        return r
    }

    /// Runs `args` with `SMOE_KILL_AFTER_SAVED_LAYERS=n`: the tool kills itself (SIGKILL) right
    /// after saving its n-th finished layer.
    func killedAfter(_ n: Int, _ args: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try runCLI(args, environment: ["SMOE_KILL_AFTER_SAVED_LAYERS": "\(n)"])
        XCTAssertEqual(r.status, SIGKILL, "expected to be killed: \(r.stderr)", file: file, line: line)
    }

    /// The same objects, attributes (the history too) and bytes.
    func assertIdentical(_ a: String, _ b: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let x = try h5Contents(a, skipping: []), y = try h5Contents(b, skipping: [])
        let differing = Set(x.keys).union(y.keys).filter { x[$0] != y[$0] }.sorted()
        XCTAssertTrue(differing.isEmpty, "\(a) and \(b) differ in \(differing.prefix(5))", file: file, line: line)
        XCTAssertGreaterThan(x.count, 10, file: file, line: line)
    }

    func parts(_ output: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: ResumeWork.directory(for: output))) ?? [])
            .filter { $0.hasPrefix("layer-") }.sorted()
    }

    /// Nothing but `keep` in `dir`: no work directory, no temporary file.
    func assertClean(_ dir: String, keep: Set<String>, file: StaticString = #filePath, line: UInt = #line) throws {
        let names = Set(try FileManager.default.contentsOfDirectory(atPath: dir))
        XCTAssertEqual(names, keep, "leftovers in \(dir)", file: file, line: line)
    }

    /// The issue's acceptance test: a multi-layer compress killed from outside (SIGKILL, as soon as
    /// its first layer's progress line appears) and rerun with --resume reuses the finished layers
    /// and writes a file bit-identical to the uninterrupted run's, history included.
    func testKilledCompressResumesBitIdentical() throws {
        let dir = temporaryDirectory(self)
        let args = ["compress", mixtral, "--calib", mixtralCalib, "--groups", "4", "--rank", "16"]
        let full = dir + "/full.h5", out = dir + "/out.h5"
        _ = try cli(args + ["-o", full, "--quiet"])
        try assertClean(dir, keep: ["full.h5"])

        // Killed from outside once the first finished layer is reported (progress prints one line
        // per finished layer when stderr is not a terminal).
        let p = Process()
        p.executableURL = productsDirectory.appendingPathComponent("smoe-compress")
        p.arguments = args + ["-o", out]
        var env = ProcessInfo.processInfo.environment
        env["OPENBLAS_CORETYPE"] = env["OPENBLAS_CORETYPE"] ?? BLAS.coreName
        p.environment = env
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        var seen = ""
        while !seen.contains("compress: layer 1/4") {
            let d = err.fileHandleForReading.availableData
            if d.isEmpty { break }
            seen += String(decoding: d, as: UTF8.self)
        }
        kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        XCTAssertEqual(p.terminationReason, .uncaughtSignal, "the run ended before it was killed: \(seen)")
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        let finished = parts(out)
        XCTAssertGreaterThanOrEqual(finished.count, 1, "a finished layer is on disk when its progress line is printed")
        XCTAssertLessThan(finished.count, 4)

        let r = try cli(args + ["-o", out, "--resume", "--json"])
        XCTAssertTrue(r.stderr.contains("removed \(dir)/.out.h5.tmp-\(p.processIdentifier)-"), r.stderr)
        XCTAssertTrue(r.stderr.contains("note: --resume: reusing \(finished.count) finished layer"), r.stderr)
        let json = try JSONValue.parse(r.stdout)
        XCTAssertEqual(json["reused"]?["layers"]?.arrayValue?.count, finished.count)
        XCTAssertEqual(json["report"]?["layers"]?.arrayValue?.count, 4 - finished.count, "only the layers computed now")
        try assertIdentical(full, out)
        try assertClean(dir, keep: ["full.h5", "out.h5"])
    }

    /// A run killed after its last layer was saved (before the commit) and resumed reuses every
    /// layer: it computes nothing, and still states the output's expert bytes, as written, beside
    /// the model's (it used to report 0 → 0).
    func testCompressResumingEveryLayerReportsTheOutputsBytes() throws {
        let dir = temporaryDirectory(self)
        let args = ["compress", mixtral, "--calib", mixtralCalib, "--groups", "4", "--rank", "16", "--quiet"]
        let out = dir + "/out.h5"
        try killedAfter(4, args + ["-o", out])
        XCTAssertEqual(parts(out).count, 4)
        let r = try cli(args + ["-o", out, "--resume", "--json"])
        let json = try JSONValue.parse(r.stdout)
        XCTAssertEqual(json["report"]?["layers"]?.arrayValue?.count, 0)
        XCTAssertEqual(json["reused"]?["layers"]?.arrayValue?.count, 4)
        let totals = { (path: String) throws -> Int? in
            try JSONValue.parse(try self.cli(["inspect", path, "--json"]).stdout)["totals"]?["expert_bytes"]?.intValue
        }
        let original = try XCTUnwrap(try totals(mixtral)), written = try XCTUnwrap(try totals(out))
        XCTAssertGreaterThan(original, written)
        XCTAssertEqual(json["output_expert_bytes"]?["original"]?.intValue, original)
        XCTAssertEqual(json["output_expert_bytes"]?["final"]?.intValue, written)
        try killedAfter(4, args + ["-o", dir + "/t.h5"])
        let text = try cli(args + ["-o", dir + "/t.h5", "--resume"]).stdout
        XCTAssertTrue(text.contains("reused 4 finished layers from"), text)
        XCTAssertTrue(text.contains("expert bytes of the output: "), text)
    }

    /// A resume whose settings or inputs differ starts over, says why in one line, and writes what
    /// a fresh run with the new settings writes; a second --resume when nothing is left just runs.
    func testChangedSettingOrCalibrationStartsOverAndSaysWhy() throws {
        let dir = temporaryDirectory(self)
        let calib = dir + "/calib.h5"
        try FileManager.default.copyItem(atPath: mixtralCalib, toPath: calib)
        let base = ["compress", mixtral, "--calib", calib, "--rank", "16", "--quiet"]
        let out = dir + "/out.h5"
        try killedAfter(2, base + ["--groups", "4", "-o", out])
        XCTAssertEqual(parts(out).count, 2)

        // Another --groups: started over, the line names the setting; the result is the fresh run's.
        var r = try cli(base + ["--groups", "3", "-o", out, "--resume"])
        let notes = r.stderr.split(separator: "\n").filter { $0.contains("--resume") }
        XCTAssertEqual(notes.count, 1, r.stderr)
        XCTAssertTrue(notes[0].hasPrefix("note: --resume: starting over") && notes[0].contains("merge.groups was 4, now 3"), r.stderr)
        _ = try cli(base + ["--groups", "3", "-o", dir + "/fresh3.h5"])
        try assertIdentical(out, dir + "/fresh3.h5")
        try assertClean(dir, keep: ["calib.h5", "out.h5", "fresh3.h5"])

        // The calibration file rewritten in place (same path, same settings): started over.
        try killedAfter(1, base + ["--groups", "4", "-o", out])
        XCTAssertEqual(parts(out).count, 1)
        try FileManager.default.setAttributes([.modificationDate: Date(timeIntervalSinceNow: 60)], ofItemAtPath: calib)
        r = try cli(base + ["--groups", "4", "-o", out, "--resume"])
        XCTAssertTrue(r.stderr.contains("note: --resume: starting over") && r.stderr.contains("--calib \(calib) was modified since"), r.stderr)
        _ = try cli(base + ["--groups", "4", "-o", dir + "/fresh4.h5"])
        try assertIdentical(out, dir + "/fresh4.h5")

        // Nothing to resume: it says so and runs.
        r = try cli(base + ["--groups", "4", "-o", dir + "/again.h5", "--resume"])
        XCTAssertTrue(r.stderr.contains("note: --resume: no finished layers of an interrupted run"), r.stderr)
        try assertIdentical(dir + "/again.h5", dir + "/fresh4.h5")
    }

    /// merge (with --router compact, whose history holds per-layer router figures) and lowrank
    /// (with --calib) resume too, bit-identically.
    func testMergeAndLowrankResumeBitIdentical() throws {
        let dir = temporaryDirectory(self)
        for (name, args) in [("merge", ["merge", switchModel, "--calib", switchCalib, "--groups", "4", "--router", "compact"]),
                             ("merge-freq", ["merge", mixtral, "--calib", mixtralCalib, "--groups", "4", "--merge-method", "frequency", "--dtype", "f32"]),
                             ("lowrank", ["lowrank", switchModel, "--calib", switchCalib, "--rank", "8", "--sparsity", "0.02"])] {
            let full = "\(dir)/\(name).full.h5", out = "\(dir)/\(name).h5"
            _ = try cli(args + ["-o", full, "--quiet"])
            try killedAfter(2, args + ["-o", out, "--quiet"])
            XCTAssertEqual(parts(out).count, 2, name)
            let r = try cli(args + ["-o", out, "--resume"])
            XCTAssertTrue(r.stderr.contains("note: --resume: reusing 2 finished layers"), r.stderr)
            XCTAssertTrue(r.stdout.contains("reused 2 finished layers from"), r.stdout)
            try assertIdentical(full, out)
            XCTAssertFalse(FileManager.default.fileExists(atPath: ResumeWork.directory(for: out)), name)
        }
    }

    /// A run that fails writing (here a file size limit, as a full disk would) keeps its finished
    /// layers and says so; --resume then reuses every layer and writes the uninterrupted file.
    func testWriteFailureKeepsFinishedLayers() throws {
        let dir = temporaryDirectory(self)
        let args = ["compress", mixtral, "--calib", mixtralCalib, "--groups", "4", "--rank", "16", "--quiet"]
        _ = try cli(args + ["-o", dir + "/full.h5"])
        let out = dir + "/out.h5"
        let exe = productsDirectory.appendingPathComponent("smoe-compress").path
        let limited = Process()
        limited.executableURL = URL(fileURLWithPath: "/bin/bash")
        // 400 KiB per file: each part fits, the whole output (680 KB) does not.
        limited.arguments = ["-c", "ulimit -f 400; trap '' XFSZ; exec \"$0\" \"$@\" 2>\"$SMOE_ERR\"", exe] + args + ["-o", out]
        var env = ProcessInfo.processInfo.environment
        env["OPENBLAS_CORETYPE"] = env["OPENBLAS_CORETYPE"] ?? BLAS.coreName
        env["SMOE_ERR"] = dir + "/err.txt"
        limited.environment = env
        try limited.run()
        limited.waitUntilExit()
        let err = try String(contentsOfFile: dir + "/err.txt", encoding: .utf8)
        XCTAssertEqual(limited.terminationStatus, 1, err)
        XCTAssertTrue(err.contains("note: kept 4 finished layers in \(ResumeWork.directory(for: out))"), err)
        XCTAssertTrue(err.hasSuffix("error: \(out): cannot be written completely (disk full?)\n"), err)
        let r = try cli(args + ["-o", out, "--resume"])
        XCTAssertTrue(r.stderr.contains("reusing 4 finished layers"), r.stderr)
        try assertIdentical(dir + "/full.h5", out)
    }

    /// A sharded run resumes per shard: the shard file equals the uninterrupted shard's.
    func testShardResumes() throws {
        let dir = temporaryDirectory(self)
        let args = ["compress", mixtral, "--calib", mixtralCalib, "--groups", "4", "--shard", "0/2", "--quiet"]
        _ = try cli(args + ["-o", dir + "/full.0.h5"])
        try killedAfter(1, args + ["-o", dir + "/s.0.h5"])
        let r = try cli(args + ["-o", dir + "/s.0.h5", "--resume"])
        XCTAssertTrue(r.stderr.contains("reusing 1 finished layer from"), r.stderr)
        try assertIdentical(dir + "/full.0.h5", dir + "/s.0.h5")
        // Another shard of the same output name is another run.
        try killedAfter(1, args + ["-o", dir + "/s.1.h5"])
        let other = try cli(["compress", mixtral, "--calib", mixtralCalib, "--groups", "4", "--shard", "1/2", "--quiet",
                             "-o", dir + "/s.1.h5", "--resume"])
        XCTAssertTrue(other.stderr.contains("note: --resume: starting over") && other.stderr.contains("now \"1/2\""), other.stderr)
    }

    /// Without --resume, what a killed run left is reported and removed: its temporary output
    /// (its process is gone) and its work directory. A temporary file of a live process that is not
    /// smoe-compress (a reused pid) counts as left behind too.
    func testLeftoversOfDeadRunsAreReportedAndRemoved() throws {
        let dir = temporaryDirectory(self)
        let out = dir + "/out.h5"
        let args = ["lowrank", switchModel, "--rank", "8", "-o", out, "--quiet"]
        try killedAfter(1, args)
        let leftover = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasPrefix(".out.h5.tmp-") }
        XCTAssertEqual(leftover.count, 1)
        let sleeper = Process()
        sleeper.executableURL = URL(fileURLWithPath: "/bin/sleep")
        sleeper.arguments = ["30"]
        try sleeper.run()
        defer { sleeper.terminate() }
        let foreign = "\(dir)/.out.h5.tmp-\(sleeper.processIdentifier)-abc"
        _ = FileManager.default.createFile(atPath: foreign, contents: Data([1, 2, 3]))
        let unrelated = dir + "/.other.h5.tmp-1-abc"  // another output's: not ours to judge
        _ = FileManager.default.createFile(atPath: unrelated, contents: Data())

        let r = try cli(args)
        XCTAssertTrue(r.stderr.contains("note: removed \(dir)/\(leftover[0]), left by an interrupted run"), r.stderr)
        XCTAssertTrue(r.stderr.contains("note: removed \(foreign)"), r.stderr)
        XCTAssertTrue(r.stderr.contains("note: removed \(ResumeWork.directory(for: out)): 1 finished layer of an interrupted run"), r.stderr)
        try assertClean(dir, keep: ["out.h5", ".other.h5.tmp-1-abc"])
    }

    /// Failures: bad settings leave nothing behind; a work directory held by a live run, or a path
    /// taken by something else, is one error line naming it; a failure that would recur on a
    /// resume (bad data in a later layer) leaves nothing either, though layers were finished.
    func testErrorsAndWhatFailuresLeave() throws {
        let dir = temporaryDirectory(self)
        let out = dir + "/out.h5"
        var r = try runCLI(["compress", mixtral, "--calib", mixtralCalib, "--groups", "40", "-o", out, "--resume"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.hasPrefix("error: --groups"), r.stderr)
        try assertClean(dir, keep: [])

        r = try runCLI(["compress", mixtral, "--calib", mixtralCalib, "--target-size", "0.5", "--plan-only", "--resume", "-o", out])
        XCTAssertEqual(r.status, 64)
        XCTAssertTrue(r.stderr.hasPrefix("error: --plan-only writes nothing"), r.stderr)

        _ = FileManager.default.createFile(atPath: out + ".resume", contents: Data())
        r = try runCLI(["lowrank", switchModel, "--rank", "8", "-o", out])
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr, "error: \(out).resume: exists and is not a work directory of smoe-compress (it would hold the finished layers of \(out)): move it away\n")
        try FileManager.default.removeItem(atPath: out + ".resume")

        // Held by a live run (its lock): refused, the directory untouched.
        try killedAfter(1, ["lowrank", switchModel, "--rank", "8", "-o", out, "--quiet"])
        let lock = open(ResumeWork.directory(for: out) + "/lock", O_RDWR)
        XCTAssertEqual(flock(lock, LOCK_EX | LOCK_NB), 0)
        r = try runCLI(["lowrank", switchModel, "--rank", "8", "-o", out, "--resume"])
        Foundation.close(lock)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("error: \(ResumeWork.directory(for: out)): is in use by another smoe-compress run"), r.stderr)
        XCTAssertEqual(parts(out).count, 1)

        // A failure after finished layers (a NaN in the third layer): nothing kept.
        let bad = dir + "/bad.h5"
        try FileManager.default.copyItem(atPath: switchModel, toPath: bad)
        try poison(bad, layer: "decoder.block.1.layer.2.mlp")
        r = try runCLI(["lowrank", bad, "--rank", "4", "-o", dir + "/bad.out.h5"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("lowrank: layer 2/4"), r.stderr)
        XCTAssertFalse(r.stderr.contains("note:"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/bad.out.h5.resume"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/bad.out.h5"))
        XCTAssertTrue(r.stderr.hasSuffix("error: \(bad): /moe_layers/decoder.block.1.layer.2.mlp/experts/up: contains NaN at flat index 0\n"), r.stderr)
    }

    /// Writes a NaN into one expert weight of `layer` (the file stays a valid checkpoint).
    func poison(_ path: String, layer: String) throws {
        let f = try H5File.open(path, writable: true)
        let d = try f.root.openGroup("moe_layers/\(layer)/experts").openDataset("up")
        var v = try d.readFloats(rows: 0..<1)
        v[0] = .nan
        try d.write(floats: v, rows: 0..<1)
        f.close()
    }

    // MARK: the history entry from one-layer entries

    /// Every stage's `historyEntry(combining:)` of its one-layer entries (written and read back as
    /// part files keep them) equals `historyEntry(reports)`, and the loop records it when layers
    /// are reused: merge (compact router), lowrank (--calib), compress (merge + rank, and a
    /// --target-size plan).
    func testHistoryCombinedFromLayerEntriesEqualsTheRunsEntry() throws {
        let model = try CheckpointReader(switchModel), calib = try CalibrationReader(switchCalib)
        try check(MergeStage(model: model, calibration: calib, stats: nil, settings: MergeSettings(groups: 4, router: .compact)), model)
        try check(LowRankStage(model: model, calibration: calib, options: LowRankOptions(rank: .fixed(8), sparsity: 0.01)), model)
        try check(CompressStage(model: model, calibration: calib, stats: nil,
                                settings: CompressSettings(merge: MergeSettings(groups: 4), lowRank: LowRankOptions(rank: .fixed(8))),
                                storage: .f16), model)
        var planned = CompressSettings(merge: MergeSettings(groups: 1), lowRank: nil)
        var planner = PlannerSettings(target: .fraction(0.5), groupCandidates: [4])
        planner.levels = 4
        planned.target = planner
        try check(CompressStage(model: model, calibration: calib, stats: nil, settings: planned, storage: .f16), model)
    }

    func check<S: LayerStage>(_ stage: S, _ model: CheckpointReader, file: StaticString = #filePath, line: UInt = #line) throws {
        // Run once saving every layer's entry (exact JSON text, as a part file holds it).
        var saved: [String: String] = [:]
        let hook = LayerResume<S.Output>(finished: [], reuse: { _ in XCTFail("nothing to reuse"); return .null },
                                         save: { name, _, entry in saved[name] = entry.serializedExactly() })
        let full = try stage.run(model: model, resume: hook) { _ in }
        let expected = stage.historyEntry(full.reports).serialized()
        XCTAssertEqual(full.history.serialized(), expected, file: file, line: line)
        XCTAssertEqual(saved.count, stage.layers.count, file: file, line: line)
        let entries = try stage.layers.map { try JSONValue.parse(saved[$0]!) }
        XCTAssertEqual(try stage.historyEntry(combining: entries).serialized(), expected, file: file, line: line)
        // Then resumed: the first two layers reused, the others computed.
        let reuse = Set(stage.layers.prefix(2))
        let resumed = try stage.run(model: model, resume: LayerResume<S.Output>(finished: reuse, reuse: { try JSONValue.parse(saved[$0]!) },
                                                                              save: { _, _, _ in })) { _ in }
        XCTAssertEqual(resumed.reused, Array(stage.layers.prefix(2)), file: file, line: line)
        XCTAssertEqual(resumed.reports.count, stage.layers.count - 2, file: file, line: line)
        XCTAssertEqual(resumed.history.serialized(), expected, file: file, line: line)
    }
}
