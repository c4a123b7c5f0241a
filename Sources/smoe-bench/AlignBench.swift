import Foundation
import SMoECompress

/// `align` of a Switch-base-32-shaped model (issue 29): 2 MoE layers of 32 mlp experts of
/// 768 × 3072 (synth weights), every expert aligned to expert 0 (31 pairs per layer) as the stage
/// does it (pairs in parallel, one BLAS thread each). Prints the wall time, the cost-matrix
/// products' share and rate, and beside it the machine's own `sgemm` rate at the same shape
/// ([f, d]·[d, f]) with one thread (what each pair's worker gets) and with all threads.
/// Options: `--layers N --experts N --d-model N --d-ff N`.
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
    let one = sgemmRate(m: f, n: f, k: d, transB: true)
    BLAS.setThreads(saved)
    let all = sgemmRate(m: f, n: f, k: d, transB: true)
    printRow(String(format: "machine sgemm [%d×%d]·[%d×%d]ᵀ: %.0f GFLOP/s with 1 thread, %.0f with %d threads", f, d, f, d, one, all, saved))
    var wall = 0.0, product = 0.0, solver = 0.0
    for l in 0..<layers {
        let (layer, _, _) = SyntheticGenerator.makeLayer(spec, index: l)
        let (res, s) = try timed { try Alignment.alignLayer(layer, reference: 0) }
        wall += s
        product += res.report.productSeconds
        solver += res.report.solverSeconds
    }
    let workers = Double(min(ProcessInfo.processInfo.activeProcessorCount, e - 1))
    let flops = Double(layers * (e - 1)) * 2 * 2 * Double(f) * Double(f) * Double(d)
    printRow(String(format: "align wall %.2f s; cost products %.2f worker-s (%.0f GFLOP/s per worker, %.0f on %.0f workers), assignment %.2f worker-s; load %@",
                    wall, product, flops / product / 1e9, workers * flops / product / 1e9, workers, solver, loadAverage() as NSString))
}
