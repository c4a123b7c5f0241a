import Foundation
import XCTest
@testable import SMoECompress

/// Issue 14: damaged inputs end in one `error:` line (never a crash or a hang), outputs stay
/// atomic on a full disk and on SIGINT/SIGTERM, and a short fixed-seed fuzz run stays clean.
final class ReliabilityTests: XCTestCase {
    let repro = fixturesDir + "/reliability"

    func temporaryFiles(_ dir: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.contains(".tmp-") }
    }

    func expectCleanError(_ args: [String], cwd: String, mentions: String, seconds: Double = 15, line: UInt = #line) throws {
        let start = Date()
        let r = try runCLI(args, cwd: cwd)
        let errors = r.stderr.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("error: ") }
        XCTAssertNotEqual(r.status, 0, "\(args)", line: line)
        XCTAssertLessThan(r.status, 128, "\(args) died of a signal: \(r.stderr)", line: line)
        XCTAssertEqual(errors.count, 1, "\(args): \(r.stderr)", line: line)
        XCTAssertTrue(r.stderr.contains(mentions), "\(args): \(r.stderr)", line: line)
        XCTAssertEqual(temporaryFiles(cwd), [], line: line)
        XCTAssertLessThan(Date().timeIntervalSince(start), seconds, line: line)
    }

    /// Every reproducer of ../shared/reliability (copied into Fixtures/reliability).
    func testReproducersEndInOneErrorLine() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("planted-mixtral.h5"), calib = fixture("planted-mixtral.calib.h5")
        try expectCleanError(["stats", repro + "/a1-global-heap.h5", "--calib", calib, "-o", "out.h5"], cwd: dir, mentions: "a1-global-heap.h5")
        try expectCleanError(["merge", model, "--calib", repro + "/a2-attr-exists.calib.h5", "--groups", "4", "-o", "out.h5"], cwd: dir,
                             mentions: "a2-attr-exists.calib.h5")
        try expectCleanError(["lowrank", repro + "/b-ocopy.h5", "--rank", "8", "-o", "out.h5"], cwd: dir, mentions: "b-ocopy.h5")
        try expectCleanError(["inspect", repro + "/c-csr-validator.h5", "--check"], cwd: dir, mentions: "c-csr-validator.h5")
        try expectCleanError(["inspect", repro + "/d-summary-overflow.h5", "--check"], cwd: dir, mentions: "d-summary-overflow.h5")
        try expectCleanError(["eval", model, repro + "/e-dense-summary.h5", "--calib", calib], cwd: dir, mentions: "e-dense-summary.h5")
        try expectCleanError(["eval", model, repro + "/f-huge-alloc.h5", "--calib", calib], cwd: dir, mentions: "f-huge-alloc.h5")
        try expectCleanError(["inspect", repro + "/hang-calib.h5", "--check"], cwd: dir, mentions: "timed out")
    }

    /// The tool's own checks, without the child-process walk (SMOE_INPUT_CHECK=off is honoured
    /// by the CLI): the reproducers of its own traps still end in one error line.
    func testOwnChecksWithoutIsolation() throws {
        setenv("SMOE_INPUT_CHECK", "off", 1)
        defer { unsetenv("SMOE_INPUT_CHECK") }
        let dir = temporaryDirectory(self)
        try expectCleanError(["inspect", repro + "/c-csr-validator.h5", "--check"], cwd: dir, mentions: "invalid CSR")
        try expectCleanError(["inspect", repro + "/d-summary-overflow.h5", "--check"], cwd: dir, mentions: "overflows")
        try expectCleanError(["eval", fixture("planted-mixtral.h5"), repro + "/f-huge-alloc.h5", "--calib", fixture("planted-mixtral.calib.h5")],
                             cwd: dir, mentions: "more bytes than")
    }

    func testOverflowCheckedProducts() {
        XCTAssertEqual(checkedProduct([3, 4, 5]), 60)
        XCTAssertNil(checkedProduct([Int.max, 2]))
        XCTAssertNil(checkedProduct(-1, 2))
        XCTAssertEqual(saturatingSum(Int.max, 1), Int.max)
        let bad = CSRMatrix(rows: 2, cols: 2, indptr: [0, 5, 1], indices: [0], values: [1])
        XCTAssertNotNil(bad.validationError())
    }

    func testOutputPathAndSpecialFilesAreRefusedUpFront() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("planted-mixtral.h5")
        try expectCleanError(["lowrank", model, "--rank", "4", "-o", ""], cwd: dir, mentions: "empty")
        try expectCleanError(["lowrank", model, "--rank", "4", "-o", "newdir/"], cwd: dir, mentions: "folder")
        try expectCleanError(["lowrank", model, "--rank", "4", "-o", "missing/out.h5"], cwd: dir, mentions: "does not exist")
        try expectCleanError(["lowrank", model, "--rank", "4", "-o", "/dev/null"], cwd: dir, mentions: "not a regular file")
        try expectCleanError(["lowrank", model, "--rank", "4", "--layers", "", "-o", "out.h5"], cwd: dir, mentions: "--layers")
        XCTAssertEqual(mkfifo(dir + "/fifo.h5", 0o600), 0)
        try expectCleanError(["inspect", dir + "/fifo.h5"], cwd: dir, mentions: "not a regular file", seconds: 5)
        // A FIFO standing as a model folder's config.json is refused, not read (it would block).
        let folder = dir + "/fifo-model"
        let (tensors, config) = fakeModel(.mixtral, dtype: .F32)
        try writeFakeModel(folder, tensors, config: config)
        try FileManager.default.removeItem(atPath: folder + "/config.json")
        XCTAssertEqual(mkfifo(folder + "/config.json", 0o600), 0)
        try expectCleanError(["import", folder, "-o", "imported.h5"], cwd: dir, mentions: "config.json", seconds: 5)
        // A 244-character name: the temporary name is shortened to fit NAME_MAX.
        let long = String(repeating: "x", count: 241) + ".h5"
        let r = try runCLI(["lowrank", model, "--rank", "4", "-o", long], cwd: dir)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/" + long))
        XCTAssertEqual(temporaryFiles(dir), [])
    }

    /// Fills a 256 KiB tmpfs during `compress`: the existing target stays as it was, no temporary
    /// file is left, one error line. Needs root (mount); skipped otherwise.
    func testFullDiskLeavesTargetUntouched() throws {
        let mnt = temporaryDirectory(self) + "/small"
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        let m = Process()
        m.executableURL = URL(fileURLWithPath: "/bin/mount")
        m.arguments = ["-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt]
        m.standardError = FileHandle.nullDevice
        try m.run()
        m.waitUntilExit()
        guard m.terminationStatus == 0 else { throw XCTSkip("cannot mount a tmpfs here (needs root): full-disk test skipped") }
        defer {
            let u = Process()
            u.executableURL = URL(fileURLWithPath: "/bin/umount")
            u.arguments = [mnt]
            try? u.run()
            u.waitUntilExit()
        }
        let target = mnt + "/out.h5"
        let old = Data("an existing, valid target".utf8)
        _ = FileManager.default.createFile(atPath: target, contents: old)
        for args in [["compress", fixture("trained-mixtral.h5"), "--calib", fixture("trained-mixtral.calib.h5"), "--groups", "4", "-o", target],
                     ["lowrank", fixture("trained-mixtral.h5"), "--rank", "8", "-o", target]] {
            try expectCleanError(args, cwd: mnt, mentions: "out.h5", seconds: 120)
            XCTAssertEqual(FileManager.default.contents(atPath: target), old, "\(args[0]) replaced the target")
        }
    }

    /// SIGINT and SIGTERM mid-write: exit 128 + signal, temporary file removed, target unchanged.
    func testSignalsRemoveTemporaryFiles() throws {
        let dir = temporaryDirectory(self)
        let target = dir + "/out.h5"
        let old = Data("existing".utf8)
        for sig in [SIGINT, SIGTERM] {
            _ = FileManager.default.createFile(atPath: target, contents: old)
            let p = Process()
            p.executableURL = productsDirectory.appendingPathComponent("smoe-compress")
            p.arguments = ["synth", "--layers", "4", "--experts", "16", "--d-model", "512", "--d-ff", "1024", "--tokens", "4096",
                           "-o", target, "--calib", dir + "/out.calib.h5"]
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            try p.run()
            // Wait until a temporary file exists, then signal.
            let deadline = Date().addingTimeInterval(60)
            while temporaryFiles(dir).isEmpty && p.isRunning && Date() < deadline { usleep(2000) }
            guard p.isRunning else { XCTFail("synth finished before it could be interrupted; make it larger"); return }
            usleep(50_000)
            kill(p.processIdentifier, sig)
            p.waitUntilExit()
            XCTAssertEqual(p.terminationStatus, 128 + sig)
            XCTAssertEqual(temporaryFiles(dir), [], "signal \(sig)")
            XCTAssertEqual(FileManager.default.contents(atPath: target), old)
        }
    }

    /// A short fixed-seed fuzz campaign (the long one is `make fuzz`): no crash, hang, unclean
    /// error or leftover temporary file.
    func testShortFuzzRun() throws {
        try fuzzCampaign(seed: 14, hdf5Cases: 160, safetensorsCases: 100)
    }

    /// `make fuzz` (FUZZ_SEED, FUZZ_CASES, FUZZ_ST_CASES; skipped unless SMOE_FUZZ_LONG=1).
    func testLongFuzzRun() throws {
        let env = ProcessInfo.processInfo.environment
        guard env["SMOE_FUZZ_LONG"] == "1" else { throw XCTSkip("long fuzz run: make fuzz") }
        try fuzzCampaign(seed: UInt64(env["FUZZ_SEED"] ?? "") ?? 1, hdf5Cases: Int(env["FUZZ_CASES"] ?? "") ?? 5000,
                         safetensorsCases: Int(env["FUZZ_ST_CASES"] ?? "") ?? 3000, binary: env["SMOE_FUZZ_BINARY"])
    }

    func fuzzCampaign(seed: UInt64, hdf5Cases: Int, safetensorsCases: Int, binary: String? = nil) throws {
        let work = temporaryDirectory(self)
        let exe = binary ?? productsDirectory.appendingPathComponent("smoe-compress").path
        let folder = work + "/seed-model"
        let (tensors, config) = fakeModel(.mixtral, dtype: .F32)
        try writeFakeModel(folder, tensors, config: config)
        let start = Date()
        // Two HDF5 halves (seeds `seed` and `seed + 1`) and the safetensors campaign run side by side.
        nonisolated(unsafe) var h = Fuzzer(binary: exe, work: work + "/h")
        nonisolated(unsafe) var h2 = Fuzzer(binary: exe, work: work + "/h2")
        nonisolated(unsafe) var s = Fuzzer(binary: exe, work: work + "/s")
        DispatchQueue.concurrentPerform(iterations: 3) { i in
            switch i {
            case 0: h.fuzzHDF5(count: (hdf5Cases + 1) / 2, seed: seed, fixtures: fixturesDir)
            case 1: h2.fuzzHDF5(count: hdf5Cases / 2, seed: seed &+ 1, fixtures: fixturesDir)
            default: s.fuzzSafetensors(count: safetensorsCases, seed: seed, folder: folder)
            }
        }
        h.merge(h2)
        let wall = Date().timeIntervalSince(start)
        print("fuzz seed \(seed): HDF5 \(h.summary)")
        print("fuzz seed \(seed): safetensors \(s.summary)")
        print(String(format: "fuzz wall time %.0f s", wall))
        for f in (h.hardFailures + s.hardFailures).prefix(40) { print("  \(f.outcome.rawValue): \(f.command) :: \(f.detail.prefix(200))") }
        XCTAssertEqual((h.hardFailures + s.hardFailures).count, 0, "see the failures printed above")
    }
}
