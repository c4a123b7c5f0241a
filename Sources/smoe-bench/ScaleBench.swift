import Foundation
import SMoECompress
#if canImport(Glibc)
import Glibc
#endif

/// Wall time and peak RSS of each stage of the built `smoe-compress` (run as a subprocess) on one
/// Mixtral-8x7B-shaped layer written by its own `synth` (issue 15). Each stage is spawned and
/// reaped with wait4, whose rusage is that one child's (ru_maxrss, KiB on Linux), so a stage's
/// peak is never masked by an earlier, larger one. Before each stage the memory model below
/// predicts its peak; a stage predicted above `--max-rss` GiB is skipped with the reason, so the
/// benchmark cannot get the machine's processes killed for lack of memory.
/// Options: `--shape mixtral|qwen3-30b-a3b` (the defaults below, or 2048, 768, 128, top-8, bf16,
/// 16384 tokens), `--d-model D --d-ff F --experts E --top-k K --dtype f32|f16|bf16 --tokens T
/// --groups G` (default 4096, 14336, 8, 2, f32, 4096, E/2), `--rank R` (default d_model/4: 1024 at the Mixtral shape; the stages lowrank-R and
/// compress-R), `--stages a,b,…` (default all), `--max-rss GB` (default 20), `--dir PATH`
/// (default a temporary folder), `--keep` (keep the checkpoints), `--json`, `--binary PATH`.
func scaleBench(_ args: [String]) throws {
    func value(_ name: String) -> String? {
        guard let i = args.firstIndex(of: name), i + 1 < args.count else { return nil }
        return args[i + 1]
    }
    func int(_ name: String, _ def: Int) throws -> Int {
        guard let s = value(name) else { return def }
        guard let v = Int(s), v > 0 else { throw SMoEError("\(name): expected a positive integer, got '\(s)'") }
        return v
    }
    // The shape's defaults (each overridable): Mixtral-8x7B (float32), or Qwen3-30B-A3B (128
    // experts, top-8, d_model 2048, d_ff 768, bfloat16 weights, 16384 tokens, 64 groups).
    let shape = value("--shape") ?? "mixtral"
    let preset: (d: Int, f: Int, e: Int, topK: Int, tokens: Int, dtype: String)
    switch shape {
    case "mixtral": preset = (4096, 14336, 8, 2, 4096, "f32")
    case "qwen3-30b-a3b": preset = (2048, 768, 128, 8, 16384, "bf16")
    default: throw SMoEError("--shape: unknown shape '\(shape)' (known: mixtral, qwen3-30b-a3b)")
    }
    let d = try int("--d-model", preset.d), f = try int("--d-ff", preset.f), e = try int("--experts", preset.e)
    let topK = try int("--top-k", preset.topK), dtype = value("--dtype") ?? preset.dtype
    let tokens = try int("--tokens", preset.tokens), groups = try int("--groups", max(1, e / 2)), rank = try int("--rank", max(1, d / 4))
    let maxRSS = try Double(value("--max-rss") ?? "20").flatMap { $0 > 0 ? $0 : nil }
        ?? { throw SMoEError("--max-rss: expected a positive number of GiB") }()
    let json = args.contains("--json"), keep = args.contains("--keep")
    let model = ScaleMemoryModel(experts: e, dModel: d, dFF: f, tokens: tokens, groups: groups, topK: topK)
    let allStages = ["synth", "stats", "align", "merge-frequency", "merge-regmean+refit", "lowrank-\(rank)", "compress",
                     "compress-\(rank)"]
    let stages = value("--stages").map { $0.split(separator: ",").map { String($0) } } ?? allStages
    for s in stages where !allStages.contains(s) {
        throw SMoEError("--stages: unknown stage '\(s)' (known: \(allStages.joined(separator: ",")))")
    }
    let binary = value("--binary") ?? siblingSmoeCompress()
    guard FileManager.default.isExecutableFile(atPath: binary) else {
        throw SMoEError("no smoe-compress at \(binary) (build it: swift build -c release --product smoe-compress, or pass --binary)")
    }
    let madeDir = value("--dir") == nil
    let dir = value("--dir") ?? NSTemporaryDirectory() + "smoe-scale-\(getpid())"
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    func path(_ name: String) -> String { dir + "/" + name }
    let (m, c, st) = (path("mx.h5"), path("mx.calib.h5"), path("mx.stats.h5"))
    let mergeCommon = [m, "--calib", c, "--stats", st, "--groups", "\(groups)"]
    let commands: [String: (args: [String], outputs: [String], needs: [String])] = [
        "synth": (["synth", "--layers", "1", "--experts", "\(e)", "--families", "\(groups)", "--top-k", "\(topK)", "--dtype", dtype,
                   "--d-model", "\(d)", "--d-ff", "\(f)", "--expert-type", "glu", "--activation", "silu",
                   "--router-type", "softmax_topk_norm", "--tokens", "\(tokens)", "-o", m, "--calib", c], [m, c], []),
        "stats": (["stats", m, "--calib", c, "-o", st], [st], [m, c]),
        "align": (["align", m, "--stats", st, "-o", path("aligned.h5")], [path("aligned.h5")], [m, st]),
        "merge-frequency": (["merge"] + mergeCommon + ["--merge-method", "frequency", "-o", path("merged-frequency.h5")],
                            [path("merged-frequency.h5")], [m, c, st]),
        "merge-regmean+refit": (["merge"] + mergeCommon + ["--merge-method", "regmean+refit", "-o", path("merged-regmean.h5")],
                                [path("merged-regmean.h5")], [m, c, st]),
        "lowrank-\(rank)": (["lowrank", m, "--calib", c, "--rank", "\(rank)", "-o", path("lowrank.h5")],
                            [path("lowrank.h5")], [m, c]),
        "compress": (["compress"] + mergeCommon + ["-o", path("compressed.h5")], [path("compressed.h5")], [m, c, st]),
        "compress-\(rank)": (["compress"] + mergeCommon + ["--rank", "\(rank)", "-o", path("compressed-rank.h5")],
                             [path("compressed-rank.h5")], [m, c, st]),
    ]
    let gib = Double(1 << 30)
    print("shape \(shape): \(e) experts (glu, top-\(topK), stored \(dtype)) of \(d)×\(f), \(tokens) tokens, \(groups) groups, rank \(rank); layer in float32 "
          + String(format: "%.2f GiB", Double(model.layerBytes) / gib) + "; budget \(maxRSS) GiB; work folder \(dir)")
    print("smoe-compress: \(binary) (OPENBLAS_NUM_THREADS=\(ProcessInfo.processInfo.environment["OPENBLAS_NUM_THREADS"] ?? "unset"))")
    // The machine's own product rate, so a stage's time can be read against it on any CPU (a
    // square 4096³ product: 137 GFLOP, about a second).
    let savedThreads = BLAS.threads
    BLAS.setThreads(1)
    let oneThread = sgemmRate(m: 4096, n: 4096, k: 4096)
    BLAS.setThreads(savedThreads)
    let allThreads = sgemmRate(m: 4096, n: 4096, k: 4096)
    print("CPU \(cpuName()); machine sgemm [4096×4096]·[4096×4096]: "
          + String(format: "%.0f GFLOP/s with 1 thread, %.0f with %d threads", oneThread, allThreads, savedThreads))
    func pad(_ s: String, _ w: Int) -> String { s.count >= w ? s : String(repeating: " ", count: w - s.count) + s }
    printRow("stage                  wall s    CPU s   peak GiB   model GiB   output bytes  load (1 min) before → after  note")
    var rows: [JSONValue] = []
    for stage in stages {
        let cmd = commands[stage]!
        let predicted = model.predictedPeak(stage)
        var note = ""
        if let missing = cmd.needs.first(where: { !FileManager.default.fileExists(atPath: $0) }) {
            note = "skipped: needs \((missing as NSString).lastPathComponent) (run its stage first)"
        } else if Double(predicted) / gib > maxRSS {
            note = String(format: "skipped: the memory model predicts %.1f GiB > --max-rss %g", Double(predicted) / gib, maxRSS)
        }
        if !note.isEmpty {
            printRow(stage.padding(toLength: 20, withPad: " ", startingAt: 0) + pad("-", 9) + pad("-", 9) + pad("-", 11)
                     + pad(String(format: "%.2f", Double(predicted) / gib), 12) + pad("-", 15) + "  " + note)
            rows.append(.object([("stage", .string(stage)), ("skipped", .string(note)), ("model_peak_bytes", .int(predicted))]))
            continue
        }
        let log = path(stage + ".json")
        let loadBefore = loadAverage().split(separator: " ").first.map(String.init) ?? "?"
        let run = try spawnAndMeasure(binary, cmd.args + ["--json", "--quiet"], stdoutPath: log)
        let loadAfter = loadAverage().split(separator: " ").first.map(String.init) ?? "?"
        let bytes = cmd.outputs.reduce(0) { $0 + (((try? FileManager.default.attributesOfItem(atPath: $1))?[.size] as? Int) ?? 0) }
        if run.status != 0 { note = "FAILED (exit \(run.status)); see \(log)" }
        printRow(stage.padding(toLength: 20, withPad: " ", startingAt: 0) + pad(String(format: "%.1f", run.seconds), 9)
                 + pad(String(format: "%.1f", run.cpuSeconds), 9) + pad(String(format: "%.2f", Double(run.peakRSS) / gib), 11)
                 + pad(String(format: "%.2f", Double(predicted) / gib), 12) + pad("\(bytes)", 15)
                 + "  \(loadBefore) → \(loadAfter)" + (note.isEmpty ? "" : "  " + note))
        rows.append(.object([("stage", .string(stage)), ("seconds", .double(run.seconds)), ("cpu_seconds", .double(run.cpuSeconds)),
                             ("load_before", .string(loadBefore)), ("load_after", .string(loadAfter)), ("peak_rss_bytes", .int(run.peakRSS)),
                             ("model_peak_bytes", .int(predicted)), ("output_bytes", .int(bytes)), ("exit_status", .int(Int(run.status)))]))
    }
    if !keep {
        for cmd in commands.values { for o in cmd.outputs { try? FileManager.default.removeItem(atPath: o) } }
        if madeDir { try? FileManager.default.removeItem(atPath: dir) }
    }
    if json {
        printRow(JSONValue.object([
            ("shape", .object([("name", .string(shape)), ("top_k", .int(topK)), ("dtype", .string(dtype)), ("experts", .int(e)), ("d_model", .int(d)), ("d_ff", .int(f)), ("tokens", .int(tokens)),
                               ("groups", .int(groups)), ("rank", .int(rank))])),
            ("cpu", .string(cpuName())), ("sgemm_gflops_1_thread", .double(oneThread)), ("sgemm_gflops_all_threads", .double(allThreads)),
            ("max_rss_gib", .double(maxRSS)), ("stages", .array(rows)),
        ]).serialized(pretty: true))
    }
}

/// The `smoe-compress` built beside this binary (same build folder, same configuration).
func siblingSmoeCompress() -> String {
    URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("smoe-compress").path
}

/// Runs `path args` with stdout to `stdoutPath` (stderr inherited) and reaps it with wait4: wall
/// seconds, exit status, and that child's own peak RSS in bytes (ru_maxrss is KiB on Linux).
/// The child's re-exec of itself (OPENBLAS_CORETYPE) keeps its pid, so it is measured too.
func spawnAndMeasure(_ path: String, _ args: [String], stdoutPath: String) throws -> (seconds: Double, status: Int32, peakRSS: Int, cpuSeconds: Double) {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 1, stdoutPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    let argv: [UnsafeMutablePointer<CChar>?] = ([path] + args).map { strdup($0) } + [nil]
    defer { for p in argv { free(p) } }
    var pid: pid_t = 0
    let t0 = DispatchTime.now().uptimeNanoseconds
    let rc = posix_spawn(&pid, path, &actions, nil, argv, environ)
    guard rc == 0 else { throw SMoEError("cannot start \(path): \(String(cString: strerror(rc)))") }
    var status: Int32 = 0
    var usage = rusage()
    while wait4(pid, &status, 0, &usage) < 0 {
        guard errno == EINTR else { throw SMoEError("wait4: \(String(cString: strerror(errno)))") }
    }
    let seconds = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
    let exit: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    func sec(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
    return (seconds, exit, Int(usage.ru_maxrss) * 1024, sec(usage.ru_utime) + sec(usage.ru_stime))
}

/// Predicted peak RSS per stage for one dense GLU layer: the library's `MemoryModel` (the one
/// `--max-memory` uses; docs/ALGORITHM.md, "Scale"), with the largest group of the planted
/// families (E/G experts each); synth holds one expert and one block.
struct ScaleMemoryModel {
    let experts, dModel, dFF, tokens, groups: Int
    var topK = 2
    var layerBytes: Int { experts * 3 * dModel * dFF * 4 }
    var config: LayerConfig {
        LayerConfig(name: "scale", index: 0, numExperts: experts, topK: topK, dModel: dModel, dFF: dFF, expertType: .glu,
                    activation: .silu, routerType: .softmax_topk_norm)
    }

    func predictedPeak(_ stage: String) -> Int {
        let largest = (experts + groups - 1) / groups
        let work: MemoryModel.Work
        switch stage {
        case "synth": return MemoryModel.base + 3 * dModel * dFF * 4 + tokens * (dModel + dFF) * 4
        case "stats": work = .statistics(readsExperts: false)
        case "align": work = .alignment(workers: ProcessInfo.processInfo.activeProcessorCount)
        case "merge-frequency": work = .merge(groups: groups, largestGroup: largest, outputAware: false, lowRank: false)
        case "merge-regmean+refit", "compress": work = .merge(groups: groups, largestGroup: largest, outputAware: true, lowRank: false)
        case _ where stage.hasPrefix("lowrank-"):
            // The stages run with the default options: down takes the output Gram (no d_ff² Gram).
            work = .lowRank(streams: true, rank: Int(stage.dropFirst("lowrank-".count)), sparsity: 0, largeGram: false)
        default: work = .merge(groups: groups, largestGroup: largest, outputAware: true, lowRank: true, largeGram: false)
        }
        return MemoryModel.peakBytes(work, layer: config, blockSize: min(tokens, TokenSettings.defaultBlockSize))
    }
}
