// smoe-bench: the speed goals of the issues, measured (never asserted by tests).
// `smoe-bench all` runs every benchmark; `smoe-bench NAME [args]` runs one.
// Each benchmark lives in its own file and registers itself here.
import Foundation
import SMoECompress

/// Runs `body` and returns its result with the wall-clock seconds it took.
func timed<T>(_ body: () throws -> T) rethrows -> (T, Double) {
    let t0 = DispatchTime.now().uptimeNanoseconds
    let v = try body()
    return (v, Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
}

/// Prints one result row and flushes, so rows appear as they are measured even when piped
/// (`fflush(nil)`: `fflush(stdout)` is not concurrency-safe in Swift 6).
func printRow(_ s: String) {
    print(s)
    fflush(nil)
}

let benchmarks: [(name: String, summary: String, options: String, run: ([String]) throws -> Void)] = [
    ("assignment", "linear assignment solver vs SciPy on weight-matching cost matrices",
     "--sizes F,F,… --seed N --other-size N --minimize --no-scipy", assignmentBench),
    ("lowrank", "exact vs randomized SVD for low-rank compression", "--quick", lowRankBench),
    ("align", "align of a Switch-base-32-shaped model with the cost products' rate beside the machine's sgemm rate",
     "--layers N --experts N --d-model N --d-ff N", alignBench),
    ("factor", "high-rank factorisation (rank 1024 of 14336×4096): sgesdd vs Gram eigendecomposition vs randomized",
     "--rows M --cols N --rank R --no-randomized --no-exact --gaussian-only; --whitened-down [--rows d --cols f --rank R --tokens T --output-gram-only]; --planner-spectra [--experts E --d-model d --d-ff f --tokens T]", factorBench),
    ("merge", "merge time per method on a Switch-base-shaped layer", "--experts N --groups N --d-model N --d-ff N --tokens N",
     mergeBench),
    ("scale", "wall time and peak RSS per smoe-compress stage on one Mixtral-8x7B- or Qwen3-30B-A3B-shaped layer (subprocesses)",
     "--shape mixtral|qwen3-30b-a3b --d-model N --d-ff N --experts N --top-k N --dtype T --tokens N --groups N --rank N --stages S,S,… --max-rss GiB --binary PATH --dir DIR --keep --json",
     scaleBench),
    ("fidelity", "held-out error at 50 % / 25 % of the expert bytes: merge or prune, and the uniform (groups, rank) grid against --target-size",
     "--fixtures DIR --fractions X,X,… --ranks R,R,… --merge-or-prune [--plans-only] [--fp8] --loss-every K --no-loss", fidelityBench),
    ("regmean-tokens", "RegMean's fallback rule against always solving, per calibration token count (fixtures and a 64-expert layer)",
     "--fixtures DIR", regmeanTokensBench),
]

// The in-process benchmarks (align, factor, …) need the same BLAS kernels smoe-compress runs with:
// on a CPU this OpenBLAS does not know, re-run with the matching core (as smoe-compress does).
BLAS.chooseCore()
let args = Array(CommandLine.arguments.dropFirst())
print("smoe-bench \(smoeCompressVersion) — BLAS core \(BLAS.coreName), \(BLAS.threads) threads, "
      + "OPENBLAS_CORETYPE=\(ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"] ?? "unset")")
let asksHelp = args.contains("--help") || args.contains("-h")
guard !asksHelp, let which = args.first, which == "all" || benchmarks.contains(where: { $0.name == which }) else {
    print("usage: smoe-bench all|" + benchmarks.map(\.name).joined(separator: "|") + " [options]")
    for b in benchmarks { print("  \(b.name): \(b.summary)\n      options: \(b.options)") }
    exit(asksHelp ? 0 : 2)
}
do {
    // `all` leaves out `scale` (minutes and GiB per stage; run it by name or with `make bench-scale`).
    for b in benchmarks where which == b.name || (which == "all" && b.name != "scale") {
        print("\n== \(b.name): \(b.summary)")
        try b.run(Array(args.dropFirst()))
    }
} catch {
    FileHandle.standardError.write("error: \(error)\n".data(using: .utf8)!)
    exit(1)
}
