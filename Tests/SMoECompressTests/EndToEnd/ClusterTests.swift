import Foundation
import XCTest
@testable import SMoECompress

/// The repository root.
private let repositoryRoot = URL(fileURLWithPath: fixturesDir).deletingLastPathComponent().path

/// Runs `command` (a path, or a name looked up on PATH) with `env` added to this process's
/// environment; returns status and output, killing it after `timeout` seconds.
private func runTool(_ command: [String], env: [String: String] = [:], cwd: String? = nil,
                     timeout: Double = 120) throws -> CLIResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = command
    p.environment = ProcessInfo.processInfo.environment.merging(env) { $1 }
    if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
    // Output to files (no pipe to drain while waiting with a time limit).
    let base = NSTemporaryDirectory() + "smoe-run-" + UUID().uuidString
    _ = FileManager.default.createFile(atPath: base + ".out", contents: nil)
    _ = FileManager.default.createFile(atPath: base + ".err", contents: nil)
    defer { try? FileManager.default.removeItem(atPath: base + ".out"); try? FileManager.default.removeItem(atPath: base + ".err") }
    p.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: base + ".out"))
    p.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: base + ".err"))
    try p.run()
    let deadline = Date().addingTimeInterval(timeout)
    while p.isRunning && Date() < deadline { usleep(50_000) }
    if p.isRunning { p.terminate() }
    p.waitUntilExit()
    return CLIResult(status: p.terminationStatus, stdout: (try? String(contentsOfFile: base + ".out", encoding: .utf8)) ?? "",
                     stderr: (try? String(contentsOfFile: base + ".err", encoding: .utf8)) ?? "")
}

/// The scale-out scripts run for real: `tools/slurm/` on a single-node Slurm (started by
/// `make test` through tools/slurm/with-local-cluster.sh), the Kubernetes manifests' commands
/// per index. Both must give exactly the single-process result.
final class ClusterTests: XCTestCase {
    let model = fixture("trained-mixtral.h5"), calib = fixture("trained-mixtral.calib.h5")
    var binDir: String { productsDirectory.path }
    /// The shard tasks' BLAS threads; OpenBLAS results may depend on the thread count, so the
    /// single-process reference runs with the same number.
    let threads = "1"

    /// Submits tools/slurm/submit.sh unchanged (4 shards, adaptive with rank), waits for the
    /// three jobs, and compares the assembled checkpoint with a single `compress`.
    func testSlurmJobArrayAssemblesBitIdentical() throws {
        guard let conf = ProcessInfo.processInfo.environment["SLURM_CONF"] else {
            throw XCTSkip("no Slurm cluster: SLURM_CONF is not set (`make test` or `make test-slurm` start one)")
        }
        let marker = URL(fileURLWithPath: conf).deletingLastPathComponent().appendingPathComponent("unavailable").path
        if let why = try? String(contentsOfFile: marker, encoding: .utf8) {
            throw XCTSkip("no Slurm cluster: " + why.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        let sinfo = try runTool(["sinfo", "-h", "-o", "%t"], timeout: 20)
        guard sinfo.status == 0 else { throw XCTSkip("no Slurm cluster: sinfo failed: \(sinfo.stderr)") }
        let dir = temporaryDirectory(self)
        let options = ["--groups", "4", "--adaptive", "--rank", "16"]
        let submit = try runTool([repositoryRoot + "/tools/slurm/submit.sh", model, calib, dir, "4"] + options,
                             env: ["SMOE": binDir + "/smoe-compress", "SMOE_CPUS": threads], cwd: dir, timeout: 60)
        XCTAssertEqual(submit.status, 0, submit.stderr)
        let ids = submit.stdout.split(whereSeparator: { $0.isWhitespace }).compactMap { Int($0) }.map(String.init)
        XCTAssertEqual(ids.count, 3, submit.stdout)
        // Wait until none of the jobs is queued or running (time limit: 5 minutes).
        let deadline = Date().addingTimeInterval(300)
        var queued = ""
        repeat {
            usleep(500_000)
            queued = try runTool(["squeue", "-h", "-j", ids.joined(separator: ","), "-o", "%i %T %r"], timeout: 20).stdout
        } while !queued.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty && Date() < deadline
        let logs = (try? FileManager.default.contentsOfDirectory(atPath: dir + "/logs"))?.sorted().map { name in
            "== \(name)\n" + ((try? String(contentsOfFile: dir + "/logs/" + name, encoding: .utf8)) ?? "")
        }.joined(separator: "\n") ?? "no logs"
        XCTAssertTrue(queued.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty, "jobs still queued after 5 minutes: \(queued)\n\(logs)")
        if queued.contains(where: { !$0.isWhitespace }) { _ = try runTool(["scancel"] + ids, timeout: 20) }
        let assembled = dir + "/compressed.h5"
        guard FileManager.default.fileExists(atPath: assembled) else { return XCTFail("no \(assembled):\n\(logs)") }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir + "/shards").filter { $0.hasSuffix(".h5") }.count, 4)
        let single = dir + "/single.h5"
        let r = try runTool([binDir + "/smoe-compress", "compress", model, "--calib", calib, "--stats", dir + "/stats.h5"] + options
                        + ["-o", single, "--quiet"], env: ["OPENBLAS_NUM_THREADS": threads])
        XCTAssertEqual(r.status, 0, r.stderr)
        try assertSameContents(single, assembled)
        XCTAssertEqual(try CheckpointReader(assembled).history.last?["shards"]?.arrayValue?.count, 4)
    }

    /// One Job manifest of tools/k8s: its container command (a one-line JSON array) and the
    /// values of `completions:` and the container's env.
    struct Manifest {
        var command: [String]
        var completions: Int?
        var env: [String: String]

        init(_ path: String) throws {
            let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map(String.init)
            func value(_ line: String) -> String {
                let v = line.split(separator: ":", maxSplits: 1).last.map(String.init)?.trimmingCharacters(in: .whitespaces) ?? ""
                return v.hasPrefix("\"") && v.hasSuffix("\"") ? String(v.dropFirst().dropLast()) : v
            }
            let trimmed = lines.map { $0.trimmingCharacters(in: .whitespaces) }
            guard let c = trimmed.first(where: { $0.hasPrefix("command:") }),
                  let parsed = try JSONValue.parse(String(c.dropFirst("command:".count))).arrayValue?.compactMap(\.stringValue)
            else { throw SMoEError.file(path, "has no one-line JSON `command:`") }
            command = parsed
            completions = trimmed.first { $0.hasPrefix("completions:") }.flatMap { Int(value($0)) }
            env = [:]
            for (i, l) in trimmed.enumerated() where l.hasPrefix("- name:") && i + 1 < trimmed.count && trimmed[i + 1].hasPrefix("value:") {
                env[value(l)] = value(trimmed[i + 1])
            }
        }
    }

    /// Runs the Kubernetes Jobs' container commands locally in order (stats; the indexed shards
    /// once per JOB_COMPLETION_INDEX; assemble), the shared volume a temporary folder, and
    /// compares the result with a single `compress` run with the manifest's options.
    func testKubernetesManifestsRunLocallyAndAssemble() throws {
        let dir = temporaryDirectory(self)
        try FileManager.default.copyItem(atPath: model, toPath: dir + "/model.h5")
        try FileManager.default.copyItem(atPath: calib, toPath: dir + "/model.calib.h5")
        let k8s = repositoryRoot + "/tools/k8s/"
        let stats = try Manifest(k8s + "stats-job.yaml"), shards = try Manifest(k8s + "shards-job.yaml")
        let assemble = try Manifest(k8s + "assemble-job.yaml")
        XCTAssertTrue(try String(contentsOfFile: k8s + "shards-job.yaml", encoding: .utf8).contains("completionMode: Indexed"))
        let n = try XCTUnwrap(shards.completions)
        XCTAssertEqual(shards.env["SHARDS"], "\(n)", "SHARDS must equal completions")
        let path = binDir + ":" + (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin")
        func local(_ m: Manifest, _ extra: [String: String] = [:]) throws {
            let env = m.env.merging(["DATA": dir, "PATH": path, "OPENBLAS_NUM_THREADS": threads]) { $1 }.merging(extra) { $1 }
            let r = try runTool(m.command, env: env)
            XCTAssertEqual(r.status, 0, "\(m.command.last ?? ""): \(r.stderr)")
        }
        try local(stats)
        for i in 0..<n { try local(shards, ["JOB_COMPLETION_INDEX": "\(i)"]) }
        try local(assemble)
        // The single run: the shard command without --shard, writing single.h5.
        var single = try XCTUnwrap(shards.command.last)
        single = single.replacingOccurrences(of: #" --shard \S+"#, with: "", options: .regularExpression)
            .replacingOccurrences(of: #" -o \S+"#, with: " -o $DATA/single.h5", options: .regularExpression)
        XCTAssertFalse(single.contains("JOB_COMPLETION_INDEX"), single)
        var m = shards
        m.command[m.command.count - 1] = single
        try local(m)
        try assertSameContents(dir + "/single.h5", dir + "/compressed.h5")
    }
}
