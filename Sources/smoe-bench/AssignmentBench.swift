import Foundation
import SMoECompress

/// A buffer of `count` independent N(0, scale²) floats: Box–Muller over pairs of uniforms from
/// the seeded generator, written straight into the buffer (both outputs of each pair used).
func gaussianBuffer(_ count: Int, scale: Float, _ rng: inout SplitMix64) -> [Float] {
    var out = [Float](repeating: 0, count: count)
    addGaussian(&out, scale: scale, &rng)
    return out
}

/// Adds independent N(0, scale²) noise to every element of `x` (Box–Muller, as above).
func addGaussian(_ x: inout [Float], scale: Float, _ rng: inout SplitMix64) {
    let s = Double(scale)
    x.withUnsafeMutableBufferPointer { p in
        var k = 0
        while k < p.count {
            var u1 = rng.nextDouble()
            if u1 < 1e-300 { u1 = 1e-300 }
            let r = (-2 * log(u1)).squareRoot() * s, t = 2 * Double.pi * rng.nextDouble()
            p[k] += Float(r * cos(t))
            if k + 1 < p.count { p[k + 1] += Float(r * sin(t)) }
            k += 2
        }
    }
}

/// Linear assignment on weight-matching cost matrices C = up_a·up_bᵀ + down_aᵀ·down_b of two
/// mlp experts (up [f, d], down [d, f], Gaussian weights of standard deviation 1/√d), solved
/// with maximize: true by smoe-compress and by SciPy (`tools/bench_lsa_scipy.py`, timing only
/// `linear_sum_assignment`). Cases: "independent" (two unrelated experts) and "related" (b is a
/// with its neurons permuted by a random permutation, plus Gaussian noise of 0.2 relative size).
/// Targets: ≥ 2× faster than SciPy on independent, never slower (ratio ≥ 1) on related, and the
/// same objective (relative difference ≤ 1e-9).
/// Then, for information, matrices with structure and ties (uniform, small integers, all equal,
/// i·j, (i+j) mod 7, rank 1) at `--other-size N` (default 2048, 0 to skip), minimised.
/// Options: `--sizes 3072,14336` (d_ff list; d_model is 768 for 3072, 4096 for 14336, d_ff/4
/// otherwise), `--no-scipy`, `--seed N`, `--other-size N`.
func assignmentBench(_ args: [String]) throws {
    func value(_ name: String) -> String? {
        guard let i = args.firstIndex(of: name), i + 1 < args.count else { return nil }
        return args[i + 1]
    }
    var sizes = [3072, 14336]
    if let s = value("--sizes") {
        let parsed = s.split(separator: ",").map { Int($0.trimmingCharacters(in: .whitespaces)) }
        guard !parsed.isEmpty, parsed.allSatisfy({ ($0 ?? 0) > 0 }) else {
            throw SMoEError("--sizes: expected a comma-separated list of positive d_ff values, got '\(s)'")
        }
        sizes = parsed.map { $0! }
    }
    var seed: UInt64 = 1
    if let s = value("--seed") {
        guard let v = UInt64(s) else { throw SMoEError("--seed: expected a non-negative integer, got '\(s)'") }
        seed = v
    }
    let noise: Float = 0.2

    // SciPy: the helper script next to the sources (or under the current directory).
    let script = repositoryFile("tools/bench_lsa_scipy.py")
    let python = runPython
    var scipy = !args.contains("--no-scipy")
    if scipy {
        if script == nil {
            printRow("scipy: not available (tools/bench_lsa_scipy.py not found; run from the repository root)")
            scipy = false
        } else if python(["-c", "import scipy, numpy"]).status != 0 {
            printRow("scipy: not available (python3 cannot import scipy and numpy)")
            scipy = false
        }
    }

    /// SciPy's time and objective on `c` (maximize), through a temporary raw float32 file.
    func runSciPy(_ c: Matrix, minimize: Bool = false) throws -> (seconds: Double, objective: Double) {
        let path = NSTemporaryDirectory() + "smoe-bench-lsa-\(UUID().uuidString).f32"
        defer { try? FileManager.default.removeItem(atPath: path) }
        // Raw float32 in native (little-endian) order, written without an extra copy.
        guard FileManager.default.createFile(atPath: path, contents: nil), let h = FileHandle(forWritingAtPath: path) else {
            throw SMoEError.file(path, "cannot create the temporary cost matrix file")
        }
        try c.data.withUnsafeBytes { raw in
            try h.write(contentsOf: Data(bytesNoCopy: UnsafeMutableRawPointer(mutating: raw.baseAddress!), count: raw.count,
                                         deallocator: .none))
        }
        try h.close()
        let r = python([script!, path, String(c.rows)] + (minimize ? ["--minimize"] : []))
        guard r.status == 0 else {
            throw SMoEError("bench_lsa_scipy.py failed: \(r.err.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        let doc = try JSONValue.parse(r.out)
        guard let s = doc["seconds"]?.doubleValue, let o = doc["objective"]?.doubleValue else {
            throw SMoEError("bench_lsa_scipy.py: unexpected output '\(r.out)'")
        }
        return (s, o)
    }

    printRow("weight matching C = up_a·up_bᵀ + down_aᵀ·down_b of two mlp experts (Gaussian, σ = 1/√d), maximize, seed \(seed)")
    printRow("independent: two unrelated experts; related: b = a with permuted neurons + \(Int(noise * 100))% noise")
    if scipy {
        printRow("targets: ours ≥ 2× faster than scipy on independent, ≥ 1× on related, objectives equal (rel. diff ≤ 1e-9)")
        printRow("size        case             ours s    scipy s  speed-up  obj rel diff  planted  result")
    } else {
        printRow("size        case             ours s  planted")
    }
    for f in sizes {
        let d = f == 3072 ? 768 : f == 14336 ? 4096 : max(1, f / 4)
        let sigma = 1 / Float(d).squareRoot()
        var rng = SplitMix64(seed: seed &* 1_000_003 &+ UInt64(f))
        let (a, genSeconds) = timed {
            Expert(up: Matrix(rows: f, cols: d, data: gaussianBuffer(f * d, scale: sigma, &rng)),
                   down: Matrix(rows: d, cols: f, data: gaussianBuffer(d * f, scale: sigma, &rng)))
        }
        var buildTimes: [Double] = []
        for relatedCase in [false, true] {
            let name = relatedCase ? "related" : "independent"
            var planted: [Int]? = nil
            let (c, buildSeconds): (Matrix, Double) = try timed {
                let b: Expert
                if relatedCase {
                    // b's neuron j is a's neuron q[j], plus noise; the aligning permutation is q⁻¹.
                    let q = rng.permutation(f)
                    var up = a.up.dense().gatherRows(q), down = a.down.dense().gatherColumns(q)
                    addGaussian(&up.data, scale: noise * sigma, &rng)
                    addGaussian(&down.data, scale: noise * sigma, &rng)
                    b = Expert(up: up, down: down)
                    var inverse = [Int](repeating: 0, count: f)
                    for (j, p) in q.enumerated() { inverse[p] = j }
                    planted = inverse
                } else {
                    b = Expert(up: Matrix(rows: f, cols: d, data: gaussianBuffer(f * d, scale: sigma, &rng)),
                               down: Matrix(rows: d, cols: f, data: gaussianBuffer(d * f, scale: sigma, &rng)))
                }
                return try Alignment.costMatrix(reference: a, b)
            }
            let size = "\(d)x\(f)".padding(toLength: 11, withPad: " ", startingAt: 0)
            let label = name.padding(toLength: 13, withPad: " ", startingAt: 0)
            buildTimes.append(buildSeconds)
            let (ours, oursSeconds) = try timed { try LinearAssignment.solve(c, maximize: true) }
            let recovered = planted.map { $0 == ours.rowToColumn ? "yes    " : "NO     " } ?? "-      "
            if scipy {
                let sp = try runSciPy(c)
                let ratio = sp.seconds / oursSeconds
                let diff = abs(ours.objective - sp.objective) / max(abs(sp.objective), 1e-300)
                let fast = ratio >= (relatedCase ? 1 : 2), same = diff <= 1e-9
                let result = fast && same ? "PASS" : "FAIL" + (same ? "" : " (objective)") + (fast ? "" : " (speed)")
                printRow(String(format: "%@ %@ %8.4f  %8.4f  %7.2f×  %11.2e   %@  %@", size as NSString, label as NSString,
                            oursSeconds, sp.seconds, ratio, diff, recovered as NSString, result as NSString))
            } else {
                printRow(String(format: "%@ %@ %8.4f  %@", size as NSString, label as NSString, oursSeconds,
                            recovered as NSString))
            }
        }
        printRow(String(format: "  (%@: first expert generated in %.2f s; cost matrices, second expert included, built in %.2f s and %.2f s)",
                    "\(d)x\(f)" as NSString, genSeconds, buildTimes[0], buildTimes[1]))
    }

    // Matrices unlike weight matching, where ties or structure stress a solver: informational
    // (no target), to show there is no pathological case hiding behind the headline figures.
    let n = value("--other-size").flatMap { Int($0) } ?? 2048
    guard n > 0 else { return }
    printRow("")
    printRow("other \(n)×\(n) matrices, minimise (no target; structure and ties)")
    printRow(scipy ? "matrix                     ours s    scipy s  speed-up  obj rel diff" : "matrix                     ours s")
    var rng = SplitMix64(seed: seed &+ 99)
    let others: [(String, (Int, Int) -> Float)] = [
        ("uniform [0, 1)", { _, _ in Float(rng.nextDouble()) }),
        ("integers 0..<8", { _, _ in Float(rng.next() % 8) }),
        ("all equal", { _, _ in 1 }),
        ("c[i,j] = i·j", { i, j in Float(i * j) }),
        ("c[i,j] = (i+j) mod 7", { i, j in Float((i + j) % 7) }),
        ("rank 1: x_i·y_j", { i, j in Float((i % 97) + 1) * Float((j % 89) + 1) }),
    ]
    for (name, entry) in others {
        var c = Matrix(rows: n, cols: n)
        for i in 0..<n { for j in 0..<n { c.data[i * n + j] = entry(i, j) } }
        let (ours, oursSeconds) = try timed { try LinearAssignment.solve(c) }
        let label = name.padding(toLength: 24, withPad: " ", startingAt: 0)
        if scipy {
            let sp = try runSciPy(c, minimize: true)
            let diff = abs(ours.objective - sp.objective) / max(abs(sp.objective), 1e-300)
            printRow(String(format: "%@ %8.4f  %8.4f  %7.2f×  %11.2e", label as NSString, oursSeconds, sp.seconds,
                        sp.seconds / oursSeconds, diff))
        } else {
            printRow(String(format: "%@ %8.4f", label as NSString, oursSeconds))
        }
    }
}
