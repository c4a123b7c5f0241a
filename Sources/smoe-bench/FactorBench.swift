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
/// Options: `--rows M --cols N --rank R` (default 14336, 4096, 1024), `--no-randomized`.
func factorBench(_ args: [String]) throws {
    func int(_ name: String, _ def: Int) -> Int {
        guard let i = args.firstIndex(of: name), i + 1 < args.count, let v = Int(args[i + 1]), v > 0 else { return def }
        return v
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
            let vs = exactErr.map { String(format: "%+8.4f%%", 100 * (err / $0 - 1)) } ?? "-"
            printRow(String(format: "%-26@ %-18@ %7.2f %7.2f  %10.6f  %9@   %@", label as NSString, method as NSString, wall, cpu, err,
                            vs as NSString, loadAverage() as NSString))
        }
        let c0 = cpuSeconds()
        let (exact, te) = try timed { try w.thinSVD() }
        let e = relErr(exact)
        row("sgesdd (exact)", te, cpuSeconds() - c0, e, nil)
        for f64 in [true, false] {
            let c1 = cpuSeconds()
            let (gram, tg) = try timed { try w.gramTruncatedSVD(rank: r, float64: f64) }
            row(f64 ? "gram dsyrk+dsyevr" : "gram ssyrk+ssyevr", tg, cpuSeconds() - c1, relErr(gram.svd), e)
        }
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
    return v.trimmingCharacters(in: .whitespaces)
}
