import Foundation
#if canImport(Glibc)
import Glibc
#endif
import SMoECompress

/// The machine's own `sgemm` rate in GFLOP/s for C [m, n] = A [m, k]·B [k, n] (transposes as
/// given), best of `repeats` after one warm-up: the yardstick a stage's products are compared to.
/// `threadCPU` times it in the calling thread's CPU seconds (for one BLAS thread on a loaded
/// machine: the rate per core busy, as the stages' CPU-second figures give it).
func sgemmRate(m: Int, n: Int, k: Int, transA: Bool = false, transB: Bool = false, repeats: Int = 3, threadCPU: Bool = false) -> Double {
    var rng = SplitMix64(seed: 7)
    let a = Matrix(rows: transA ? k : m, cols: transA ? m : k, data: (0..<(m * k)).map { _ in Float(rng.nextGaussian()) })
    let b = Matrix(rows: transB ? n : k, cols: transB ? k : n, data: (0..<(k * n)).map { _ in Float(rng.nextGaussian()) })
    var c = Matrix(rows: m, cols: n)
    BLAS.gemm(a, transA: transA, b, transB: transB, into: &c)
    var best = Double.infinity
    for _ in 0..<repeats {
        let t0 = threadCPUSeconds()
        let (_, wall) = timed { BLAS.gemm(a, transA: transA, b, transB: transB, into: &c) }
        let s = threadCPU ? threadCPUSeconds() - t0 : wall
        best = min(best, s)
    }
    return 2 * Double(m) * Double(n) * Double(k) / best / 1e9
}

/// CPU seconds of the calling thread.
func threadCPUSeconds() -> Double {
    var t = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
}

/// CPU seconds (user + system) of this process so far.
func processCPUSeconds() -> Double {
    var t = timespec()
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
}

/// The load average as `uptime` shows it (1, 5, 15 minutes), for every timing row.
func loadAverage() -> String {
    (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8))?.split(separator: " ").prefix(3).joined(separator: " ") ?? "?"
}

/// High-rank factorisation methods on one whitened-sized matrix (issue 29): the exact `sgesdd`
/// (which already reduces a tall matrix by QR first), the float64 Gram eigendecomposition
/// (`dsyrk` + `dsyevr` of the r largest pairs + one `sgemm`), and the randomized range finder
/// with 1 and 2 power iterations, each with its relative error against the exact one.
/// Options: `--rows M --cols N --rank R` (default 14336, 4096, 1024), `--no-randomized`,
/// `--no-exact` (no `sgesdd`: the float64 Gram is the reference), `--gaussian-only`; a last row
/// runs what `auto` does (`ssyevr` first, checked);
/// `--whitened-down [--rows d --cols f --rank R --tokens T] [--output-gram-only]` (default 4096,
/// 14336, 1024, 2048) times the whitened factoring of a down-shaped matrix instead.
/// With `--whitened-down`: `whitenedDownBench` instead.
func factorBench(_ args: [String]) throws {
    func int(_ name: String, _ def: Int) -> Int {
        guard let i = args.firstIndex(of: name), i + 1 < args.count, let v = Int(args[i + 1]), v > 0 else { return def }
        return v
    }
    if args.contains("--planner-spectra") {
        return try plannerSpectraBench(experts: int("--experts", 4), d: int("--d-model", 1024), f: int("--d-ff", 4096),
                                       tokens: int("--tokens", 4096))
    }
    if args.contains("--whitened-down") {
        return try whitenedDownBench(d: int("--rows", 4096), f: int("--cols", 14336), r: int("--rank", 1024), tokens: int("--tokens", 2048),
                                     inputGram: !args.contains("--output-gram-only"))
    }
    let m = int("--rows", 14336), n = int("--cols", 4096), r = int("--rank", 1024)
    let p = min(m, n)
    print("rank-\(r) factorisation of \(m)×\(n) float32 matrices; CPU \(cpuName()); load \(loadAverage())")
    printRow(String(format: "machine sgemm rate at the projection's shape [%d×%d]·[%d×%d]: %.0f GFLOP/s", m, n, n, r,
                    sgemmRate(m: m, n: r, k: n, transB: true)))
    var rng = SplitMix64(seed: 29)
    // Gaussian with column scales 1/(1 + j/256) (a whitened weight's slowly decaying spectrum), and
    // the decaying spectrum of `smoe-bench lowrank` (a fast head over a flat floor).
    var gauss = Matrix(rows: m, cols: n, data: (0..<(m * n)).map { _ in Float(rng.nextGaussian()) })
    for i in 0..<m { for j in 0..<n { gauss.data[i * n + j] /= Float(1 + Double(j) / 256) } }
    var inputs: [(String, Matrix)] = [("scaled gaussian", gauss)]
    if !args.contains("--gaussian-only") {
        inputs.append(("decaying exp(-i/40)+0.02", try decayingSpectrumMatrix(rows: m, cols: n, decay: 40, seed: 3)))
    }
    printRow("matrix                     method              wall s   cpu s   rel error    vs exact   load")
    for (label, w) in inputs {
        let normSq = Double(w.frobeniusNorm) * Double(w.frobeniusNorm)
        func relErr(_ s: SVDResult) -> Double {
            let f = LowRankStage.balancedFactors(s, rank: r)
            var resid = w
            BLAS.gemm(f.u, f.v, alpha: -1, beta: 1, into: &resid)
            return Double(resid.frobeniusNorm) / normSq.squareRoot()
        }
        func row(_ method: String, _ wall: Double, _ cpu: Double, _ err: Double, _ exactErr: Double?) {
            let vs = exactErr.map { String(format: "%+.2e", err / $0 - 1) } ?? "-"
            printRow(String(format: "%-26@ %-18@ %7.2f %7.2f  %10.6f  %9@   %@", label as NSString, method as NSString, wall, cpu, err,
                            vs as NSString, loadAverage() as NSString))
        }
        var e: Double? = nil
        if !args.contains("--no-exact") {
            let c0 = cpuSeconds()
            let (exact, te) = try timed { try w.thinSVD() }
            e = relErr(exact)
            row("sgesdd (exact)", te, cpuSeconds() - c0, e!, nil)
        }
        for f64 in [true, false] {
            let c1 = cpuSeconds()
            let (gram, tg) = try timed { try w.gramTruncatedSVD(rank: r, float64: f64) }
            let err = relErr(gram.svd)
            row(f64 ? "gram dsyrk+dsyevr" : "gram ssyrk+ssyevr", tg, cpuSeconds() - c1, err, e)
            if e == nil { e = err }  // without sgesdd, the float64 Gram is the reference
        }
        // What `auto` runs: float64 Gram, float32 `ssyevr` first, the check, `dsyevr` if it fails.
        let c2 = cpuSeconds()
        let (auto, ta) = try timed { try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(r))) }
        row("auto: " + auto.report.svd, ta, cpuSeconds() - c2, auto.report.relativeError, e)
        if !args.contains("--no-randomized") {
            for q in [1, 2] where r + 10 < p {
                let c1 = cpuSeconds()
                let (rs, tr) = try timed { try w.randomizedSVD(rank: r, oversampling: 10, powerIterations: q, seed: 1) }
                row("randomized q=\(q)", tr, cpuSeconds() - c1, relErr(rs), e)
            }
        }
    }
}

/// User + system CPU seconds of this process so far (all threads).
func cpuSeconds() -> Double {
    var u = rusage()
    getrusage(RUSAGE_SELF.rawValue, &u)
    return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6
}

/// The CPU's model name from /proc/cpuinfo.
func cpuName() -> String {
    guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
          let line = info.split(separator: "\n").first(where: { $0.hasPrefix("model name") }),
          let v = line.split(separator: ":", maxSplits: 1).last else { return "unknown CPU" }
    // The model name alone does not tell machines apart ("Intel(R) Xeon(R) Processor" on several
    // generations): add the family and model numbers.
    func field(_ name: String) -> String? {
        info.split(separator: "\n").first(where: { $0.hasPrefix(name) })?.split(separator: ":", maxSplits: 1).last?
            .trimmingCharacters(in: .whitespaces)
    }
    let id = [field("cpu family").map { "family \($0)" }, field("model\t").map { "model \($0)" }].compactMap { $0 }
    return v.trimmingCharacters(in: .whitespaces) + (id.isEmpty ? "" : " (" + id.joined(separator: " ") + ")")
}

/// The whitened (output-objective) rank-r factoring of a down-shaped W [d, f] (issue 29), as
/// `compressLayer` runs it, from T routed hidden activations (one token pass of 1024-row blocks):
/// today's input Gram path (float64 Gram of the hidden activations by `dgemm`, Cholesky,
/// W·L, the Gram eigendecomposition of W·L, V·L⁻¹, the output error) against the output Gram
/// (P = Y·Yᵀ + λ·W·Wᵀ, its r leading eigenpairs, V = Σ^{-1/2}·U_rᵀ·W, the reconstructed error).
/// Synthetic data, seeded: W Gaussian / √f; hidden rows Gaussian with column scales 1/(1 + j/512)
/// plus a shared rank-64 component (correlated features), routing weights uniform in [0.2, 1).
/// Each row: wall and process CPU seconds (user + system, all BLAS threads), the report's whitened
/// output error and its difference from the input Gram path's.
func whitenedDownBench(d: Int, f: Int, r: Int, tokens t: Int, inputGram: Bool) throws {
    print("whitened rank-\(r) factoring of a \(d)×\(f) down from \(t) routed tokens; CPU \(cpuName()); load \(loadAverage())")
    var rng = SplitMix64(seed: 29)
    let w = Matrix(rows: d, cols: f, data: (0..<(d * f)).map { _ in Float(rng.nextGaussian() / Double(f).squareRoot()) })
    var h = Matrix(rows: t, cols: f, data: (0..<(t * f)).map { _ in Float(rng.nextGaussian()) })
    for i in 0..<t { for j in 0..<f { h.data[i * f + j] /= Float(1 + Double(j) / 512) } }
    let k = min(64, f)
    let shared = BLAS.matmul(Matrix(rows: t, cols: k, data: (0..<(t * k)).map { _ in Float(rng.nextGaussian()) }),
                             Matrix(rows: k, cols: f, data: (0..<(k * f)).map { _ in Float(rng.nextGaussian() * 0.5) }))
    h.addScaled(shared, 1)
    let weights = (0..<t).map { _ in Float(0.2 + 0.8 * rng.nextDouble()) }
    func blocks(_ body: (Matrix, [Float]) -> Void) {
        for start in stride(from: 0, to: t, by: 1024) {
            let c = min(1024, t - start)
            body(h.rowBlock(start, c), Array(weights[start..<(start + c)]))
        }
    }
    let options = LowRankOptions(rank: .fixed(r))
    printRow("path                          wall s   cpu s   svd                    output error   vs input Gram   load")
    func row(_ label: String, _ wall: Double, _ cpu: Double, _ rep: MatrixLowRankReport, _ reference: Double?) {
        let err = rep.outputError ?? .nan
        let vs = reference.map { String(format: "%+.2e", err - $0) } ?? "-"
        func pad(_ s: String, _ n: Int) -> String { s.padding(toLength: max(n, s.count), withPad: " ", startingAt: 0) }
        printRow(pad(label, 28) + String(format: " %7.1f %7.1f   ", wall, cpu) + pad(rep.svd, 22)
                 + String(format: " %12.8f   ", err) + pad(vs, 13) + "   " + loadAverage())
    }
    var reference: Double? = nil
    if inputGram {
        let c0 = cpuSeconds()
        let (rep, wall) = try timed { () throws -> MatrixLowRankReport in
            var g = [Double](repeating: 0, count: f * f)
            blocks { x, p in accumulateWeightedCross(x, x, weights: p.map { $0 * $0 }, into: &g) }
            let gram = InputGram(n: f, gram: g, tokens: t)
            let norms = gram.columnNorms
            let wh = try Whitening(gram, relativeRidge: options.whiteningRidge)
            return try LowRankStage.factor(w, options: options, inputNorms: norms, whitening: wh).report
        }
        row("input Gram (before)", wall, cpuSeconds() - c0, rep, nil)
        reference = rep.outputError
    }
    let c1 = cpuSeconds()
    var phases: [(String, Double, Double)] = []
    func phase<T>(_ name: String, _ body: () throws -> T) rethrows -> T {
        let c = cpuSeconds()
        let (v, wall) = try timed(body)
        phases.append((name, wall, cpuSeconds() - c))
        return v
    }
    var kept: [Double] = []
    var keptGram: OutputGram? = nil
    let (rep, wall) = try timed { () throws -> MatrixLowRankReport in
        var acc = OutputGramAccumulator(matrix: w)
        phase("  Y = X·Wᵀ, P += YᵀY") { blocks { x, p in acc.add(x, weights: p) } }
        let og = phase("  P += λ·W·Wᵀ") { acc.finish(relativeRidge: options.whiteningRidge) }
        guard let res = try phase("  eigenpairs, V, check", { try LowRankStage.factor(w, options: options, outputGram: og) }) else {
            throw SMoEError("the output Gram's check failed")
        }
        kept = og.gram
        keptGram = og
        return res.report
    }
    row("output Gram (issue 29)", wall, cpuSeconds() - c1, rep, reference)
    // The same P through `dsyevr` only (`--svd gram` takes no float32 first try): the reference
    // the float32 `ssyevr` of `auto` is compared to.
    if let og = keptGram {
        let c2 = cpuSeconds()
        let (rep64, wall64) = try timed { try LowRankStage.factor(w, options: LowRankOptions(rank: .fixed(r), svd: .gram), outputGram: og) }
        if let rep64 { row("same P, dsyevr only", wall64, cpuSeconds() - c2, rep64.report, reference) }
        if let rep64, let e32 = rep.outputError, let e64 = rep64.report.outputError {
            printRow(String(format: "output error %@ − dsyevr: %+.3e (relative %+.3e)", rep.svd as NSString, e32 - e64, e32 / e64 - 1))
        }
    }
    _ = try phase("  ssyevr alone, same P") { try largestSymmetricEigenpairsFloat32(kept, n: d, count: r) }
    // The eigensolve alone, on the same P after the timed run (not part of its figures).
    _ = try phase("  dsyevr alone, same P") { try largestSymmetricEigenpairs(&kept, n: d, count: r) }
    for (name, wall, cpu) in phases {
        printRow(name.padding(toLength: 28, withPad: " ", startingAt: 0) + String(format: " %7.1f %7.1f", wall, cpu))
    }
}

/// `smoe-bench factor --planner-spectra [--experts E --d-model d --d-ff f --tokens T]` (default 4
/// experts of 1024 × 4096, top-2, 4096 tokens): `LowRankStage.whitenedSpectra` (what
/// `compress --target-size`'s planner measures per merged layer) on a synthetic GLU layer with
/// d_ff ≫ d_model, down from its output Gram's eigenvalues, against the input Gram route it
/// replaced for down (each expert's d_ff² hidden Gram, Cholesky, W·L, its singular values), and
/// the largest difference of the two down spectra (σ_k² relative to σ₁²).
func plannerSpectraBench(experts: Int, d: Int, f: Int, tokens t: Int) throws {
    print("whitenedSpectra of a \(experts)-expert GLU layer, d_model \(d), d_ff \(f), \(t) tokens; CPU \(cpuName()); load \(loadAverage())")
    let spec = SyntheticSpec(
        architecture: "bench-planner-spectra", numLayers: 1, numExperts: experts, families: max(1, experts / 2), topK: min(2, experts),
        dModel: d, dFF: f, expertType: .glu, activation: .silu, routerType: .softmax_topk_norm, noise: 0.05, tokens: t, seed: 11)
    try spec.validate()
    let (layer, x, _) = SyntheticGenerator.makeLayer(spec, index: 0)
    let blocks: TokenBlocks = { body in
        var s = 0
        while s < x.rows { let n = min(1024, x.rows - s); try body(x.rowBlock(s, n)); s += n }
    }
    var o = LowRankOptions(rank: .fixed(1))
    o.matrices = [.down]
    printRow("route                               wall s   cpu s   load")
    let c0 = cpuSeconds()
    let (now, wallNow) = try timed { try LowRankStage.whitenedSpectra(layer, options: o, tokens: blocks) }
    printRow(String(format: "down, output Gram eigenvalues     %8.2f %7.2f   ", wallNow, cpuSeconds() - c0) + loadAverage())
    let c1 = cpuSeconds()
    let (before, wallBefore) = try timed { () throws -> [[Double]] in
        try (0..<layer.numStored).map { g in
            let w = layer.experts[g].down.dense()
            let wh = try Whitening(LowRankStage.inputGram(layer, expert: g, tokens: blocks, hidden: true), relativeRidge: o.whiteningRidge)
            return try (wh?.whiten(w) ?? w).singularValues().map(Double.init)
        }
    }
    printRow(String(format: "down, input Gram route (before)   %8.2f %7.2f   ", wallBefore, cpuSeconds() - c1) + loadAverage())
    var worst = 0.0
    for (g, s) in before.enumerated() {
        let s1 = s[0] * s[0]
        for (a, b) in zip(now[g].candidate.singularValues, s) { worst = max(worst, abs(a * a - b * b) / s1) }
    }
    printRow(String(format: "largest |Δσ_k²| / σ₁² between the routes: %.2e", worst))
}
