import Foundation

/// Output-aware merging (ALGORITHM.md §3b): RegMean for the input-side matrices and a
/// weighted ridge least-squares refit of `down`. All accumulation is float64, streamed over
/// token blocks, solved by LAPACK (Cholesky, least squares when ill-conditioned; see
/// `SymmetricSolver.solve` for the condition threshold).
enum OutputAwareMerge {
    /// Per-member streaming accumulators.
    struct MemberStats {
        var tokens = 0
        var gramX: [Double]  // d × d: Σ w x xᵀ over the member's tokens
        var gramH: [Double]  // f × f: Σ w h hᵀ (the member's own intermediate activations)
    }

    /// Per-group refit accumulators: A = Σ s h* h*ᵀ, B = Σ h* (Σ_i w_i y_i)ᵀ (h* with a 1 appended
    /// when the experts have a down bias).
    struct RefitStats {
        var tokens = 0
        var a: [Double]
        var b: [Double]
    }

    /// Each stored expert's tokens (indices into the block) and routing weights, per block.
    static func dispatch(_ layer: MoELayer, _ x: Matrix) -> [(tokens: [Int], weights: [Float])] {
        layer.dispatch(layer.route(x))
    }

    /// (Σ G̃_i + λ·mean(diag) I)⁻¹ Σ G̃_i W_iᵀ, with G̃ = α·G + (1−α)·diag(G); W_i [out, in], G_i [in, in].
    /// The ridge pulls towards `prior` (the frequency-weighted average) rather than towards zero,
    /// so identical members are reproduced exactly whatever λ.
    static func regmeanSolve(_ grams: [[Double]], _ weights: [Matrix], alpha: Double, ridge: Double,
                             prior: Matrix? = nil) throws -> (w: Matrix, method: SymmetricSolver.Method, conditionEstimate: Double) {
        let p = weights[0].cols, q = weights[0].rows
        var sum = [Double](repeating: 0, count: p * p)
        var rhs = [Double](repeating: 0, count: p * q)
        for (g, w) in zip(grams, weights) {
            var gt = g
            for i in 0..<p { for j in 0..<p where i != j { gt[i * p + j] *= alpha } }
            for k in 0..<(p * p) { sum[k] += gt[k] }
            // rhs += G̃ · Wᵀ  ([p, p] · [p, q])
            let wd = w.data.map(Double.init)  // W [q, p] row-major = Wᵀ column-major
            BLAS.dgemmAccumulate(m: p, n: q, k: p, a: gt, transA: false, lda: p, b: wd, transB: true, ldb: p, into: &rhs)
        }
        var meanDiag = 0.0
        for i in 0..<p { meanDiag += sum[i * p + i] }
        meanDiag /= Double(max(p, 1))
        let lambda = ridge * meanDiag + (meanDiag == 0 ? 1e-12 : 0)
        for i in 0..<p { sum[i * p + i] += lambda }
        if let w0 = prior {
            for i in 0..<p { for j in 0..<q { rhs[i * q + j] += lambda * Double(w0.data[j * p + i]) } }
        }
        let (y, method, estimate) = try SymmetricSolver.solve(sum, rhs, n: p, m: q)  // Y [p, q] = W*ᵀ
        var w = Matrix(rows: q, cols: p)
        for i in 0..<p { for j in 0..<q { w.data[j * p + i] = Float(y[i * q + j]) } }
        return (w, method, estimate)
    }

    /// A report note for a system that was not solved by Cholesky.
    static func solverNote(_ what: String, _ method: SymmetricSolver.Method, _ estimate: Double) -> String {
        estimate > 0 ? "\(what): \(method.rawValue) (estimated rcond \(String(format: "%.1e", estimate)))"
                     : "\(what): \(method.rawValue) (not positive definite)"
    }

    static func merge(_ layer: MoELayer, prepared: [Merging.PreparedGroup], frequency: [Double], options: MergeOptions,
                      tokens: TokenBlocks, progress: ProgressCallback?) throws -> ([Expert], [MergedGroup]) {
        let c = layer.config
        let d = c.dModel, f = c.dFF
        let minTokens = options.minTokens ?? d
        // Stored expert → (group, position) for the groups that need solving. A stored expert can
        // sit in two groups when slots that share it (an already merged layer) are grouped apart.
        var position: [Int: [(Int, Int)]] = [:]
        for (gi, p) in prepared.enumerated() where p.stored.count > 1 {
            for (k, s) in p.stored.enumerated() { position[s, default: []].append((gi, k)) }
        }
        var members: [[MemberStats]] = prepared.map { p in
            p.stored.count > 1 ? p.stored.map { _ in MemberStats(gramX: .init(repeating: 0, count: d * d), gramH: .init(repeating: 0, count: f * f)) } : []
        }
        // Distinct tokens routed to at least one member, per group (a token routed to two members
        // of a group adds one row, not two, to the rank of the summed input Gram).
        var groupTokens = [Int](repeating: 0, count: prepared.count)
        // Pass 1: Gram matrices of each member's own tokens (inputs and intermediate activations).
        var block = 0
        try tokens { x in
            var seen: [Int: [Bool]] = [:]
            for (s, disp) in dispatch(layer, x).enumerated() where !disp.tokens.isEmpty {
                for (gi, k) in position[s] ?? [] {
                    if seen[gi] == nil { seen[gi] = [Bool](repeating: false, count: x.rows) }
                    for t in disp.tokens where !seen[gi]![t] { seen[gi]![t] = true; groupTokens[gi] += 1 }
                    let xs = x.gatherRows(disp.tokens)
                    members[gi][k].tokens += xs.rows
                    accumulateWeightedCross(xs, xs, weights: disp.weights, into: &members[gi][k].gramX)
                    let h = prepared[gi].aligned[k].hidden(xs, activation: c.activation)
                    accumulateWeightedCross(h, h, weights: disp.weights, into: &members[gi][k].gramH)
                }
            }
            block += 1
            progress?("regmean \(layer.name)", block, block + 1)
        }
        var experts: [Expert] = []
        var reports: [MergedGroup] = []
        var needsRefit: [Bool] = []
        for (gi, p) in prepared.enumerated() {
            var report = MergedGroup(dominant: p.dominant, members: p.slots, frequency: p.slots.map { frequency[$0] },
                                     how: "copied", alignedCosine: p.alignedCosine)
            if p.stored.count == 1 {
                experts.append(p.aligned[0]); reports.append(report); needsRefit.append(false)
                continue
            }
            // Members without tokens drop out of the Gram sums.
            let used = members[gi].indices.filter { members[gi][$0].tokens > 0 }
            let total = groupTokens[gi]
            if used.isEmpty {
                experts.append(try Merging.weightedAverage(p.aligned, weights: p.aligned.map { _ in 1 }))
                report.how = "mean"
                report.warning = "no routed tokens: fell back to the plain mean"
                reports.append(report); needsRefit.append(false)
                continue
            }
            if total < minTokens {
                experts.append(try Merging.weightedAverage(p.aligned, weights: p.weights))
                report.how = "weighted"
                report.warning = "only \(total) routed tokens (< \(minTokens)): fell back to the frequency-weighted average"
                reports.append(report); needsRefit.append(false)
                continue
            }
            let gx = used.map { members[gi][$0].gramX }
            let prior = try Merging.weightedAverage(p.aligned, weights: p.weights)
            func solve(_ name: String, _ grams: [[Double]]) throws -> Matrix {
                let (w, method, estimate) = try regmeanSolve(grams, used.map { p.aligned[$0][matrix: name]!.dense() },
                                                             alpha: options.alpha, ridge: options.ridge, prior: prior[matrix: name]!.dense())
                if method != .cholesky { report.notes.append(solverNote(name, method, estimate)) }
                return w
            }
            let up = try solve("up", gx)
            let gate = c.expertType == .glu ? try solve("gate", gx) : nil
            let down = try solve("down", used.map { members[gi][$0].gramH })
            // Biases: usage-weighted average of the members that saw tokens.
            let avg = try Merging.weightedAverage(used.map { p.aligned[$0] }, weights: used.map { Double(members[gi][$0].tokens) })
            experts.append(Expert(up: .dense(up), gate: gate.map { .dense($0) }, down: .dense(down), upBias: avg.upBias, downBias: avg.downBias))
            report.how = "regmean"
            reports.append(report)
            needsRefit.append(options.method == .regmeanRefit)
        }
        guard needsRefit.contains(true) else { return (experts, reports) }
        // Pass 2: refit down so the merged expert reproduces its members' weighted outputs.
        let hasBias = experts.contains { $0.downBias != nil }
        var refit: [RefitStats?] = needsRefit.map { $0 ? RefitStats(features: f, outputs: d, bias: hasBias) : nil }
        let groupsOfStored = position.mapValues { $0.map(\.0) }
        block = 0
        try tokens { x in
            let disp = dispatch(layer, x)
            // Per group: union tokens, their summed weight s and Σ w_i y_i.
            var union: [Int: [Int: Int]] = [:]  // group → token → row
            var rowsOf: [Int: [Int]] = [:]
            for (s, dsp) in disp.enumerated() {
                for gi in groupsOfStored[s] ?? [] where refit[gi] != nil {
                    for t in dsp.tokens where union[gi, default: [:]][t] == nil {
                        union[gi, default: [:]][t] = rowsOf[gi, default: []].count
                        rowsOf[gi, default: []].append(t)
                    }
                }
            }
            for (gi, rows) in rowsOf {
                let n = rows.count
                let xs = x.gatherRows(rows)
                var target = Matrix(rows: n, cols: d)  // Σ_i w_i y_i
                var sw = [Float](repeating: 0, count: n)
                for (k, s) in prepared[gi].stored.enumerated() {
                    let dsp = disp[s]
                    if dsp.tokens.isEmpty { continue }
                    let y = prepared[gi].aligned[k].forward(x.gatherRows(dsp.tokens), activation: c.activation)
                    for (r, t) in dsp.tokens.enumerated() {
                        let row = union[gi]![t]!
                        let w = dsp.weights[r]
                        sw[row] += w
                        for j in 0..<d { target.data[row * d + j] += w * y.data[r * d + j] }
                    }
                }
                refit[gi]!.add(hidden: experts[gi].hidden(xs, activation: c.activation), target: target, weights: sw, bias: hasBias)
            }
            block += 1
            progress?("refit \(layer.name)", block, block + 1)
        }
        for gi in refit.indices {
            guard let r = refit[gi] else { continue }
            // Ridge towards the RegMean down (and bias), not towards zero.
            let (method, estimate) = try r.solve(into: &experts[gi], bias: hasBias, ridge: options.refitRidge)
            reports[gi].how = "regmean+refit"
            if method != .cholesky { reports[gi].notes.append(solverNote("refit", method, estimate)) }
        }
        return (experts, reports)
    }
}
