import Foundation
import SMoECompress

/// `align` of a Switch-base-32-shaped model (issue 29): 2 MoE layers of 32 mlp experts of
/// 768 × 3072 (synth weights), every expert aligned to expert 0 (31 pairs per layer) as the stage
/// does it (pairs in parallel, one BLAS thread each). Prints the wall and CPU time, the
/// cost-matrix products' CPU seconds and rate per CPU second, and beside it the machine's own
/// `sgemm` rate at the same shape ([f, d]·[d, f]) with one thread (what each pair's worker gets;
/// also per CPU second, the figure to compare on a loaded machine) and with all threads. Then the MC-SMoE authors' alignment (PyTorch products + SciPy's
/// `linear_sum_assignment`, `tools/bench_align_authors.py`) on the same weights in the same run,
/// the ratio of the two wall times (and of their CPU seconds) and how many pairs got the same
/// permutation; skipped, saying
/// why, where python3 cannot import torch, numpy and scipy (`--no-authors` skips it too).
/// Options: `--layers N --experts N --d-model N --d-ff N --no-authors`.
func alignBench(_ args: [String]) throws {
    func value(_ name: String, _ def: Int) -> Int {
        guard let i = args.firstIndex(of: name), i + 1 < args.count, let v = Int(args[i + 1]), v > 0 else { return def }
        return v
    }
    let layers = value("--layers", 2), e = value("--experts", 32), d = value("--d-model", 768), f = value("--d-ff", 3072)
    let spec = SyntheticSpec(
        architecture: "bench-switch-base-32", numLayers: layers, numExperts: e, families: e, topK: 1, dModel: d, dFF: f,
        expertType: .mlp, activation: .relu, routerType: .softmax_topk, noise: 0.05, tokens: 16, seed: 29)
    try spec.validate()
    print("align: \(layers) layers × \(e - 1) expert pairs, mlp experts of \(d)×\(f); CPU \(cpuName()); load \(loadAverage())")
    let saved = BLAS.threads
    BLAS.setThreads(1)
    let one = sgemmRate(m: f, n: f, k: d, transB: true), oneCPU = sgemmRate(m: f, n: f, k: d, transB: true, threadCPU: true)
    BLAS.setThreads(saved)
    let all = sgemmRate(m: f, n: f, k: d, transB: true)
    printRow(String(format: "machine sgemm [%d×%d]·[%d×%d]ᵀ: %.0f GFLOP/s with 1 thread (%.0f per CPU second), %.0f with %d threads",
                    f, d, f, d, one, oneCPU, all, saved))
    // The authors' side reads the same weights from raw files written here (outside any timing).
    let authors = !args.contains("--no-authors")
    let dir = NSTemporaryDirectory() + "smoe-bench-align-\(getpid())"
    if authors { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
    defer { if authors { try? FileManager.default.removeItem(atPath: dir) } }
    var wall = 0.0, cpu = 0.0, product = 0.0, solver = 0.0
    var perms: [Int32] = []
    for l in 0..<layers {
        let (layer, _, _) = SyntheticGenerator.makeLayer(spec, index: l)
        let c0 = processCPUSeconds()
        let (res, s) = try timed { try Alignment.alignLayer(layer, reference: 0) }
        cpu += processCPUSeconds() - c0
        wall += s
        product += res.report.productSeconds
        solver += res.report.solverSeconds
        perms += res.report.experts.flatMap { $0.permutation.map(Int32.init) }
        if authors { try writeRaw(layer, to: dir + "/layer\(l).f32") }
    }
    let flops = Double(layers * (e - 1)) * 2 * 2 * Double(f) * Double(f) * Double(d)
    printRow(String(format: "align wall %.2f s, %.2f CPU s; cost products %.2f CPU s (%.0f GFLOP/s per CPU second), assignment %.2f CPU s; load %@",
                    wall, cpu, product, flops / product / 1e9, solver, loadAverage() as NSString))
    guard authors else { return }
    guard let script = repositoryFile("tools/bench_align_authors.py") else {
        return printRow("authors' alignment: skipped (tools/bench_align_authors.py not found; run from the repository root)")
    }
    let permPath = dir + "/perms.i32"
    try perms.withUnsafeBytes { try Data($0).write(to: URL(fileURLWithPath: permPath)) }
    let r = runPython([script, "--weights", dir, "--layers", "\(layers)", "--experts", "\(e)", "--d-model", "\(d)", "--d-ff", "\(f)",
                       "--compare-perms", permPath])
    if r.status == 3 {
        return printRow("authors' alignment: skipped (python3 \(r.err.trimmingCharacters(in: .whitespacesAndNewlines)); it needs torch, numpy and scipy)")
    }
    guard r.status == 0, let doc = try? JSONValue.parse(r.out), let secs = doc["seconds"]?.doubleValue,
          let ps = doc["product_seconds"]?.doubleValue, let ss = doc["solver_seconds"]?.doubleValue else {
        throw SMoEError("bench_align_authors.py failed (exit \(r.status)): \(r.err.trimmingCharacters(in: .whitespacesAndNewlines)) \(r.out)")
    }
    let same = doc["same_perms"]?.doubleValue.map { Int($0) } ?? -1
    let threads = doc["torch_threads"]?.doubleValue.map { Int($0) } ?? 0
    let theirCPU = doc["cpu_seconds"]?.doubleValue ?? .nan
    printRow(String(format: "authors' alignment (PyTorch %@ with %d threads + SciPy %@): wall %.2f s, %.2f CPU s (products %.2f s wall at %.0f GFLOP/s, assignment %.2f s wall)",
                    (doc["torch"]?.stringValue ?? "?") as NSString, threads, (doc["scipy"]?.stringValue ?? "?") as NSString,
                    secs, theirCPU, ps, flops / ps / 1e9, ss))
    printRow(String(format: "ratio: ours %.2f× faster than the authors' in wall time (%.2f s vs %.2f s), %.2f× in CPU seconds; same permutation on %d of %d pairs; load %@",
                    secs / wall, wall, secs, theirCPU / cpu, same, layers * (e - 1), loadAverage() as NSString))
}

/// The E up matrices [E, f, d] and then the E down matrices [E, d, f] of an mlp layer, raw
/// float32 little-endian (the format `tools/bench_align_authors.py --weights` reads).
private func writeRaw(_ layer: MoELayer, to path: String) throws {
    var data = Data()
    for part in 0..<2 {
        for x in layer.experts {
            guard case .dense(let m) = part == 0 ? x.up : x.down else { throw SMoEError("align bench: expected dense experts") }
            m.data.withUnsafeBytes { data.append(contentsOf: $0) }
        }
    }
    try data.write(to: URL(fileURLWithPath: path))
}

/// A file of the repository: under the current directory, or beside the sources this was built from.
func repositoryFile(_ relative: String) -> String? {
    let fromSource = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent(relative).path
    return [relative, fromSource].first { FileManager.default.fileExists(atPath: $0) }
}

/// Runs `python3 arguments` and returns its exit status, stdout and stderr.
func runPython(_ arguments: [String]) -> (status: Int32, out: String, err: String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = ["python3"] + arguments
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    do { try p.run() } catch { return (-1, "", "\(error)") }
    let o = out.fileHandleForReading.readDataToEndOfFile(), e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
}
