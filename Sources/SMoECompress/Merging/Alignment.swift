import Dispatch
import Foundation

/// What aligning one expert to its reference found.
public struct ExpertAlignment: Sendable {
    public var slot: Int
    /// Aligned neuron i is the original neuron `permutation[i]`.
    public var permutation: [Int]
    /// Mean cosine between matched hidden neurons (up row ‖ gate row ‖ down column) of this
    /// expert and the reference, before (identity matching) and after alignment.
    public var cosineBefore: Double
    public var cosineAfter: Double
}

/// Per-layer alignment report.
public struct LayerAlignment: Sendable {
    public var name: String
    public var reference: Int
    public var experts: [ExpertAlignment]
    /// CPU seconds spent building cost matrices (BLAS) and in the assignment solver, summed over
    /// experts: with pairs in parallel, each pair's worker thread's own; one pair at a time, the
    /// process's (BLAS's threads included). So the product rate they give is per core busy, to
    /// compare with the machine's one-thread `sgemm` rate, and the machine's load leaves it be.
    public var productSeconds: Double
    public var solverSeconds: Double

    public var meanCosineBefore: Double {
        let o = experts.filter { $0.slot != reference }
        return o.isEmpty ? 1 : o.reduce(0) { $0 + $1.cosineBefore } / Double(o.count)
    }
    public var meanCosineAfter: Double {
        let o = experts.filter { $0.slot != reference }
        return o.isEmpty ? 1 : o.reduce(0) { $0 + $1.cosineAfter } / Double(o.count)
    }

    public var json: JSONValue {
        .object([
            ("name", .string(name)), ("reference", .int(reference)),
            ("mean_cosine_before", .double(meanCosineBefore)), ("mean_cosine_after", .double(meanCosineAfter)),
            ("product_seconds", .double(productSeconds)), ("solver_seconds", .double(solverSeconds)),
            ("experts", .array(experts.map {
                .object([("expert", .int($0.slot)), ("cosine_before", .double($0.cosineBefore)),
                         ("cosine_after", .double($0.cosineAfter)),
                         ("moved_neurons", .int(zip($0.permutation, $0.permutation.indices).filter { $0 != $1 }.count))])
            })),
        ])
    }
}

/// Hidden-neuron permutation alignment (ALGORITHM.md §2): weight matching by an exact linear
/// assignment on C = up_a·up_bᵀ + down_aᵀ·down_b (+ gate_a·gate_bᵀ).
public enum Alignment {
    static func denseMatrices(_ e: Expert, _ what: String, layer: String? = nil) throws -> (up: Matrix, gate: Matrix?, down: Matrix) {
        guard case .dense(let up) = e.up, case .dense(let down) = e.down else {
            throw SMoEError("\(what): alignment needs dense experts, but this one is factored (run align/merge before lowrank, or expand first)", layer: layer)
        }
        var gate: Matrix? = nil
        if let g = e.gate {
            guard case .dense(let gm) = g else {
                throw SMoEError("\(what): alignment needs dense experts, but this one is factored", layer: layer)
            }
            gate = gm
        }
        return (up, gate, down)
    }

    /// The weight-matching score matrix [d_ff, d_ff]: C[i, j] is how well reference neuron i
    /// matches neuron j of `expert`.
    public static func costMatrix(reference a: Expert, _ b: Expert) throws -> Matrix {
        let ma = try denseMatrices(a, "reference expert"), mb = try denseMatrices(b, "expert")
        var c = BLAS.matmul(ma.up, mb.up, transB: true)
        BLAS.gemm(ma.down, transA: true, mb.down, alpha: 1, beta: 1, into: &c)
        if let ga = ma.gate, let gb = mb.gate { BLAS.gemm(ga, gb, transB: true, alpha: 1, beta: 1, into: &c) }
        return c
    }

    /// Applies a hidden-neuron permutation: aligned neuron i is original neuron `perm[i]`
    /// (rows of up, gate and up_bias; columns of down). The expert's function is unchanged.
    public static func permute(_ e: Expert, _ perm: [Int]) throws -> Expert {
        let m = try denseMatrices(e, "expert")
        return Expert(up: m.up.gatherRows(perm), gate: m.gate?.gatherRows(perm), down: m.down.gatherColumns(perm),
                      upBias: e.upBias.map { b in perm.map { b[$0] } }, downBias: e.downBias,
                      gateBias: e.gateBias.map { b in perm.map { b[$0] } })
    }

    /// The optimal permutation aligning `expert` to `reference`, with timings in CPU seconds, so
    /// other processes on the machine do not inflate them: the calling thread's when it is one of
    /// several single-threaded workers (`workerThread`), else the whole process's (BLAS's own
    /// threads included). The cost matrix and the assignment only (`alignmentPair` adds the
    /// report's cosines).
    public static func permutation(reference: Expert, _ expert: Expert,
                                   workerThread: Bool = false) throws -> (perm: [Int], productSeconds: Double, solverSeconds: Double) {
        let r = try matched(reference: reference, expert, workerThread: workerThread)
        return (r.perm, r.productSeconds, r.solverSeconds)
    }

    /// The core of `permutation` and `alignmentPair`: the cost matrix C (`costMatrix`), the
    /// maximising assignment on it, and the CPU seconds of each (clock as `permutation`).
    static func matched(reference: Expert, _ expert: Expert, workerThread: Bool)
        throws -> (perm: [Int], cost: Matrix, productSeconds: Double, solverSeconds: Double) {
        let clock = workerThread ? CLOCK_THREAD_CPUTIME_ID : CLOCK_PROCESS_CPUTIME_ID
        let t0 = cpuSeconds(clock)
        let c = try costMatrix(reference: reference, expert)
        let t1 = cpuSeconds(clock)
        let perm = try LinearAssignment.solve(c, maximize: true).rowToColumn
        let t2 = cpuSeconds(clock)
        return (perm, c, t1 - t0, t2 - t1)
    }

    /// `permutation`, with the mean neuron cosines before (identity) and after (the permutation)
    /// read off the cost matrix: C[i, j] = ⟨a_i, b_j⟩ is the dot product of reference neuron i's and
    /// neuron j's vectors (up row, gate row, down column), so cosine_i = C[i, π(i)] / (‖a_i‖·‖b_π(i)‖)
    /// needs only the neurons' norms (one pass over each expert; `referenceNorms` when the caller
    /// has the reference's), not the second float64 pass over both experts and the two transposed
    /// downs that `meanNeuronCosine` makes (about a second per pair at Mixtral's shape). The dot
    /// products are C's float32 sums over 3·d_model terms (relative rounding ~1e-6 against the
    /// float64 sums: a reported statistic, not used by any computation).
    public static func alignmentPair(reference: Expert, _ expert: Expert, referenceNorms: [Double]? = nil, workerThread: Bool = false) throws
        -> (perm: [Int], cosineBefore: Double, cosineAfter: Double, productSeconds: Double, solverSeconds: Double) {
        let (perm, c, productSeconds, solverSeconds) = try matched(reference: reference, expert, workerThread: workerThread)
        let na = try referenceNorms ?? neuronNormsSquared(reference), nb = try neuronNormsSquared(expert)
        func meanCosine(_ column: (Int) -> Int) -> Double {
            let f = c.rows
            guard f > 0 else { return 1 }
            var total = 0.0
            for i in 0..<f {
                let j = column(i), n = na[i] * nb[j]
                total += n > 0 ? Double(c.data[i * f + j]) / n.squareRoot() : 0
            }
            return total / Double(f)
        }
        return (perm, meanCosine { $0 }, meanCosine { perm[$0] }, productSeconds, solverSeconds)
    }

    /// ‖v_i‖² (float64) of each hidden neuron's vector: up row i, gate row i, down column i.
    public static func neuronNormsSquared(_ e: Expert) throws -> [Double] {
        let m = try denseMatrices(e, "expert")
        let f = m.up.rows
        var norms = [Double](repeating: 0, count: f)
        for x in [m.up, m.gate].compactMap({ $0 }) {
            let d = x.cols
            x.data.withUnsafeBufferPointer { p in
                for i in 0..<f {
                    var s = 0.0
                    for k in 0..<d { let v = Double(p[i * d + k]); s += v * v }
                    norms[i] += s
                }
            }
        }
        // down [d_model, d_ff]: its columns, accumulated row by row (contiguous reads).
        m.down.data.withUnsafeBufferPointer { p in
            for r in 0..<m.down.rows {
                let row = p.baseAddress! + r * f
                for i in 0..<f { let v = Double(row[i]); norms[i] += v * v }
            }
        }
        return norms
    }

    /// CPU seconds of `clock` (a `clock_gettime` CPU-time clock).
    static func cpuSeconds(_ clock: clockid_t) -> Double {
        var t = timespec()
        clock_gettime(clock, &t)
        return Double(t.tv_sec) + Double(t.tv_nsec) / 1e9
    }

    /// Mean cosine between neuron i of `a` and neuron perm[i] of `b` (neuron vector = up row,
    /// gate row and down column concatenated).
    public static func meanNeuronCosine(_ a: Expert, _ b: Expert, _ perm: [Int]) throws -> Double {
        let ma = try denseMatrices(a, "expert"), mb = try denseMatrices(b, "expert")
        let f = ma.up.rows
        guard f > 0 else { return 1 }
        var dot = [Double](repeating: 0, count: f), na = dot, nb = dot
        // Neuron vectors as contiguous rows: up and gate rows, and down's columns as rows of its
        // transpose; each part adds its dot product and squared norms (float64 accumulation).
        func accumulate(_ x: Matrix, _ y: Matrix) {
            let d = x.cols
            x.data.withUnsafeBufferPointer { xp in
                y.data.withUnsafeBufferPointer { yp in
                    for i in 0..<f {
                        let xr = xp.baseAddress! + i * d, yr = yp.baseAddress! + perm[i] * d
                        var s = 0.0, sx = 0.0, sy = 0.0
                        for k in 0..<d {
                            let u = Double(xr[k]), w = Double(yr[k])
                            s += u * w; sx += u * u; sy += w * w
                        }
                        dot[i] += s; na[i] += sx; nb[i] += sy
                    }
                }
            }
        }
        accumulate(ma.up, mb.up)
        if let ga = ma.gate, let gb = mb.gate { accumulate(ga, gb) }
        accumulate(ma.down.transposed(), mb.down.transposed())
        var total = 0.0
        for i in 0..<f { total += na[i] > 0 && nb[i] > 0 ? dot[i] / (na[i] * nb[i]).squareRoot() : 0 }
        return total / Double(f)
    }

    /// How expert pairs of a layer use the two cores.
    public enum Parallelism: String, Sendable, CaseIterable {
        /// expert pairs in parallel, one BLAS thread each
        case pairs
        /// one pair at a time, BLAS with its default threads
        case blas
    }

    /// Aligns every stored expert of `layer` to stored expert `reference`. The returned layer
    /// computes the same function (up to float rounding).
    public static func alignLayer(_ layer: MoELayer, reference: Int, parallelism: Parallelism = .pairs,
                                  progress: ProgressCallback? = nil) throws -> (layer: MoELayer, report: LayerAlignment) {
        let (aligned, report) = try alignLayer(LayerSource(layer), reference: reference, parallelism: parallelism, progress: progress)
        return (try aligned.whole(), report)
    }

    /// Aligns every stored expert of `source` to stored expert `reference`, a few experts at a
    /// time (docs/ALGORITHM.md "Scale"): the reference stays in memory, the others are read in
    /// batches of one per core (`.pairs`: aligned in parallel, one BLAS thread each) or one by
    /// one (`.blas`), and only their permutations are kept. The aligned layer is returned as a
    /// source that reads each expert again and permutes it when asked for it, so the writer
    /// stores it expert by expert; it computes the same function (up to float rounding). The
    /// permutations and reports do not depend on the batching.
    public static func alignLayer(_ source: LayerSource, reference: Int, parallelism: Parallelism = .pairs,
                                  progress: ProgressCallback? = nil) throws -> (layer: LayerSource, report: LayerAlignment) {
        let n = source.numStored, name = source.name
        guard reference >= 0, reference < n else {
            throw SMoEError.setting(.reference, "\(reference) is outside the \(n) stored experts of \(name)")
        }
        let ref = try source.expert(reference)
        _ = try denseMatrices(ref, "\(name) expert \(reference)", layer: name)
        let refNorms = try neuronNormsSquared(ref)
        let identity = Array(0..<source.config.dFF)
        var reports = [ExpertAlignment?](repeating: nil, count: n)
        reports[reference] = ExpertAlignment(slot: reference, permutation: identity, cosineBefore: 1, cosineAfter: 1)
        var productSeconds = 0.0, solverSeconds = 0.0
        let others = (0..<n).filter { $0 != reference }
        let width = parallelism == .pairs ? max(1, ProcessInfo.processInfo.activeProcessorCount) : 1
        var done = 1
        progress?("aligning \(name)", done, n)
        for first in stride(from: 0, to: others.count, by: width) {
            let slots = Array(others[first..<min(first + width, others.count)])
            // Read here, one after the other: HDF5 calls are not made from the parallel workers.
            let batch = try slots.map { try source.expert($0) }
            let results = try BLAS.perform(slots.count) { k in
                do {
                    let e = batch[k]
                    let r = try alignmentPair(reference: ref, e, referenceNorms: refNorms, workerThread: slots.count > 1)
                    return (ExpertAlignment(slot: slots[k], permutation: r.perm, cosineBefore: r.cosineBefore, cosineAfter: r.cosineAfter),
                            r.productSeconds, r.solverSeconds)
                } catch let err as SMoEError {
                    throw SMoEError("\(name): stored expert \(slots[k]): \(err.message)", file: err.file, layer: name, kind: err.kind)
                }
            }
            for (k, (r, tp, ts)) in results.enumerated() {
                reports[slots[k]] = r
                productSeconds += tp
                solverSeconds += ts
            }
            done += slots.count
            progress?("aligning \(name)", done, n)
        }
        let report = LayerAlignment(name: name, reference: reference, experts: reports.map { $0! },
                                    productSeconds: productSeconds, solverSeconds: solverSeconds)
        let perms = report.experts.map(\.permutation)
        let aligned = source.mappingExperts { i, e in i == reference ? e : try permute(e, perms[i]) }
        return (aligned, report)
    }
}
