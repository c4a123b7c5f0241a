import Foundation
@testable import SMoECompress

/// A seeded mutation fuzzer for the command line (issue 14): it damages HDF5 inputs (the planted
/// fixtures and files the tool writes from them) and safetensors folders with their config.json,
/// runs `smoe-compress` on each as a subprocess with a time limit, and classifies the outcome.
/// `FuzzTests` runs a short fixed-seed campaign; `make fuzz` a long one.
struct Fuzzer {
    enum Outcome: String, CaseIterable {
        case cleanError = "clean error", success, uncleanError = "error without one error: line", crash, hang
        case nonFinite = "exit 0 with nan/inf", invalidOutput = "exit 0 with an invalid output"
    }

    struct Failure { var outcome: Outcome; var command: String; var detail: String }

    let binary: String
    let work: String
    var timeout: TimeInterval = 30
    var counts: [Outcome: Int] = [:]
    var leftovers = 0
    var failures: [Failure] = []
    var cases = 0

    init(binary: String, work: String) {
        self.binary = binary
        self.work = work
    }

    /// Runs the binary; nil status means it was killed at the time-out.
    func run(_ args: [String], cwd: String) -> (status: Int32?, signaled: Bool, out: String, err: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = args
        p.currentDirectoryURL = URL(fileURLWithPath: cwd)
        let outURL = URL(fileURLWithPath: cwd + "/.fuzz-stdout"), errURL = URL(fileURLWithPath: cwd + "/.fuzz-stderr")
        _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
        _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
        let out = try! FileHandle(forWritingTo: outURL), err = try! FileHandle(forWritingTo: errURL)
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        let done = DispatchSemaphore(value: 0)
        p.terminationHandler = { _ in done.signal() }
        try! p.run()
        let timedOut = done.wait(timeout: .now() + timeout) == .timedOut
        if timedOut { kill(p.processIdentifier, SIGKILL); done.wait() }
        try? out.close(); try? err.close()
        let o = (try? String(contentsOf: outURL, encoding: .utf8)) ?? "", e = (try? String(contentsOf: errURL, encoding: .utf8)) ?? ""
        unlink(outURL.path); unlink(errURL.path)
        if timedOut { return (nil, false, o, e) }
        return (p.terminationStatus, p.terminationReason == .uncaughtSignal, o, e)
    }

    static func printsNonFinite(_ text: String) -> Bool {
        text.range(of: #"(?i)(^|[^a-z])-?(nan|inf)([^a-z]|$)"#, options: .regularExpression) != nil
    }

    /// Runs one case in the fresh folder `cwd`; a checkpoint written to `cwd/out.h5` on success
    /// must pass `inspect --check`.
    mutating func classify(_ args: [String], cwd: String) {
        cases += 1
        let r = run(args, cwd: cwd)
        let command = args.joined(separator: " ")
        let errors = r.err.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("error: ") }
        var outcome: Outcome
        if r.status == nil { outcome = .hang } else if r.signaled { outcome = .crash } else if r.status != 0 {
            outcome = errors.count == 1 ? .cleanError : .uncleanError
        } else if Self.printsNonFinite(r.out) || Self.printsNonFinite(r.err) {
            outcome = .nonFinite
        } else {
            outcome = .success
            if FileManager.default.fileExists(atPath: cwd + "/out.h5") {
                let c = run(["inspect", "out.h5", "--check"], cwd: cwd)
                if c.status != 0 || c.signaled || Self.printsNonFinite(c.out) { outcome = .invalidOutput }
            }
        }
        counts[outcome, default: 0] += 1
        if outcome != .cleanError && outcome != .success {
            failures.append(Failure(outcome: outcome, command: command, detail: String((r.err + r.out).prefix(300))))
        }
        let left = ((try? FileManager.default.contentsOfDirectory(atPath: cwd)) ?? []).filter { $0.contains(".tmp-") }
        if !left.isEmpty {
            leftovers += 1
            failures.append(Failure(outcome: outcome, command: command, detail: "left \(left)"))
        }
    }

    // MARK: mutations

    /// Damages `bytes` in one of five ways: truncate, flip bits, zero a range, overwrite with
    /// random bytes, swap two blocks. Half the offsets fall in the first or last 16 KiB, where
    /// HDF5 keeps most metadata (and safetensors its header).
    static func mutate(_ bytes: [UInt8], _ rng: inout SplitMix64, headerBytes: Int = 16384) -> [UInt8] {
        var b = bytes
        let n = b.count
        guard n > 16 else { return b }
        func offset() -> Int {
            switch rng.nextInt(below: 4) {
            case 0: return rng.nextInt(below: min(headerBytes, n))
            case 1: return n - 1 - rng.nextInt(below: min(headerBytes, n))
            default: return rng.nextInt(below: n)
            }
        }
        for _ in 0..<(1 + rng.nextInt(below: 3)) {
            switch rng.nextInt(below: 5) {
            case 0:
                b = Array(b.prefix(max(1, offset())))
                return b
            case 1:
                for _ in 0..<(1 + rng.nextInt(below: 16)) { let o = offset(); b[o] ^= UInt8(1 << rng.nextInt(below: 8)) }
            case 2:
                let o = offset(), len = min(1 + rng.nextInt(below: 512), n - o)
                for i in o..<(o + len) { b[i] = 0 }
            case 3:
                let o = offset(), len = min(1 + rng.nextInt(below: 64), n - o)
                for i in o..<(o + len) { b[i] = UInt8(truncatingIfNeeded: rng.next()) }
            default:
                let len = 1 + rng.nextInt(below: min(4096, n / 4))
                let a = rng.nextInt(below: n - len), c = rng.nextInt(below: n - len)
                let block = Array(b[a..<(a + len)])
                b.replaceSubrange(a..<(a + len), with: b[c..<(c + len)])
                b.replaceSubrange(c..<(c + len), with: block)
            }
        }
        return b
    }

    /// Edits config.json text: a number replaced by an extreme or ill-typed value, a key
    /// dropped or repeated, or the text truncated.
    static func mutateConfig(_ text: String, _ rng: inout SplitMix64) -> String {
        let extremes = ["0", "-1", "8.5", "\"8\"", "null", "1e300", "9223372036854775808", "-9223372036854775809", "true", "[]", "{}", "2147483648"]
        var lines = text.components(separatedBy: "\n")
        let numeric = lines.indices.filter { lines[$0].contains(":") }
        guard !numeric.isEmpty else { return text }
        let i = numeric[rng.nextInt(below: numeric.count)]
        switch rng.nextInt(below: 4) {
        case 0, 1:
            if let colon = lines[i].firstIndex(of: ":") {
                let comma = lines[i].hasSuffix(",") ? "," : ""
                lines[i] = String(lines[i][...colon]) + " " + extremes[rng.nextInt(below: extremes.count)] + comma
            }
        case 2:
            let dup = lines[i].hasSuffix(",") ? lines[i] : lines[i] + ","
            lines.insert(dup, at: i)
        default:
            return String(text.prefix(rng.nextInt(below: max(text.count, 1))))
        }
        return lines.joined(separator: "\n")
    }

    // MARK: campaigns

    /// Builds the HDF5 seeds in `work/seeds`: the planted fixtures plus a merged, a rank-8 and a
    /// stats file the tool writes from them.
    func hdf5Seeds(fixtures: String) -> (model: String, calib: String, seeds: [(path: String, kind: String)]) {
        let dir = work + "/seeds"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let model = fixtures + "/planted-mixtral.h5", calib = fixtures + "/planted-mixtral.calib.h5"
        _ = run(["merge", model, "--calib", calib, "--groups", "4", "-o", dir + "/merged.h5"], cwd: dir)
        _ = run(["lowrank", model, "--rank", "8", "--sparsity", "0.01", "-o", dir + "/rank8.h5"], cwd: dir)
        _ = run(["stats", model, "--calib", calib, "-o", dir + "/stats.h5"], cwd: dir)
        let seeds = [(model, "model"), (fixtures + "/planted-switch.h5", "switch"), (calib, "calib"),
                     (dir + "/merged.h5", "model"), (dir + "/rank8.h5", "model"), (dir + "/stats.h5", "stats")]
        return (model, calib, seeds.filter { FileManager.default.fileExists(atPath: $0.0) })
    }

    /// `count` damaged HDF5 inputs, each run through a command that reads that kind of file.
    mutating func fuzzHDF5(count: Int, seed: UInt64, fixtures: String) {
        let (model, calib, seeds) = hdf5Seeds(fixtures: fixtures)
        let data = seeds.map { try! [UInt8](Data(contentsOf: URL(fileURLWithPath: $0.path))) }
        var rng = SplitMix64(seed: seed)
        for c in 0..<count {
            let s = rng.nextInt(below: seeds.count)
            let cwd = work + "/h\(c)"
            try? FileManager.default.createDirectory(atPath: cwd, withIntermediateDirectories: true)
            let bad = cwd + "/in.h5"
            _ = FileManager.default.createFile(atPath: bad, contents: Data(Self.mutate(data[s], &rng)))
            let switchCalib = fixtures + "/planted-switch.calib.h5"
            let commands: [[String]]
            switch seeds[s].kind {
            case "calib":
                commands = [["stats", model, "--calib", bad, "-o", "out.h5"], ["merge", model, "--calib", bad, "--groups", "4", "-o", "out.h5"],
                            ["eval", model, model, "--calib", bad], ["inspect", bad, "--check"]]
            case "stats":
                commands = [["merge", model, "--calib", calib, "--stats", bad, "--groups", "4", "-o", "out.h5"], ["inspect", bad, "--check"]]
            case "switch":
                commands = [["inspect", bad, "--check"], ["stats", bad, "--calib", switchCalib, "-o", "out.h5"],
                            ["lowrank", bad, "--rank", "4", "-o", "out.h5"]]
            default:
                commands = [["inspect", bad, "--check"], ["stats", bad, "--calib", calib, "-o", "out.h5"],
                            ["merge", bad, "--calib", calib, "--groups", "2", "-o", "out.h5"], ["lowrank", bad, "--rank", "8", "-o", "out.h5"],
                            ["eval", model, bad, "--calib", calib], ["compress", bad, "--calib", calib, "--groups", "2", "--rank", "4", "-o", "out.h5"]]
            }
            classify(commands[rng.nextInt(below: commands.count)], cwd: cwd)
            try? FileManager.default.removeItem(atPath: cwd)
        }
    }

    /// `count` damaged safetensors folders (the file or config.json), each imported.
    mutating func fuzzSafetensors(count: Int, seed: UInt64, folder: String) {
        let st = try! [UInt8](Data(contentsOf: URL(fileURLWithPath: folder + "/model.safetensors")))
        let config = try! String(contentsOfFile: folder + "/config.json", encoding: .utf8)
        var rng = SplitMix64(seed: seed)
        for c in 0..<count {
            let cwd = work + "/s\(c)", dir = cwd + "/model"
            try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let which = rng.nextInt(below: 3)
            let headerBytes = 8 + Int(st[0]) + Int(st[1]) << 8 + Int(st[2]) << 16
            let stBytes = which == 1 ? st : Self.mutate(st, &rng, headerBytes: headerBytes)
            let cfg = which == 0 ? config : Self.mutateConfig(config, &rng)
            _ = FileManager.default.createFile(atPath: dir + "/model.safetensors", contents: Data(stBytes))
            _ = FileManager.default.createFile(atPath: dir + "/config.json", contents: Data(cfg.utf8))
            classify(["import", dir, "-o", "out.h5"], cwd: cwd)
            try? FileManager.default.removeItem(atPath: cwd)
        }
    }

    /// Adds another campaign's counts and failures to this one's.
    mutating func merge(_ other: Fuzzer) {
        cases += other.cases
        leftovers += other.leftovers
        failures += other.failures
        for (k, v) in other.counts { counts[k, default: 0] += v }
    }

    var summary: String {
        let parts = Outcome.allCases.map { "\($0.rawValue) \(counts[$0, default: 0])" }
        return "\(cases) cases: " + parts.joined(separator: ", ") + ", leftover temporary files \(leftovers)"
    }

    /// Bad outcomes: crashes, hangs, unclean errors, non-finite or invalid outputs, leftovers.
    var hardFailures: [Failure] { failures }
}
