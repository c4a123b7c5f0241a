import Foundation

/// Output-aware merging (ALGORITHM.md §3b): RegMean for the input-side matrices and a
/// weighted ridge least-squares refit of `down`. All accumulation is float64, streamed over
/// token blocks, solved by LAPACK (Cholesky, least squares when ill-conditioned; see
/// `SymmetricSolver.solve` for the condition threshold).
enum OutputAwareMerge {
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

    /// The RegMean system of one matrix kind of one group, summed member by member so that only
    /// one member's Gram is in memory at a time: S = Σ G̃_i and R = Σ G̃_i W_iᵀ, with
    /// G̃ = α·G + (1−α)·diag(G); W_i [q, p], G_i [p, p].
    struct RegMeanSystem {
        let p: Int, q: Int
        var sum: [Double]
        var rhs: [Double]

        init(inputs p: Int, outputs q: Int) {
            self.p = p
            self.q = q
            sum = [Double](repeating: 0, count: p * p)
            rhs = [Double](repeating: 0, count: p * q)
        }

        /// Adds one member; `gram` is scaled to G̃ in place.
        mutating func add(gram: inout [Double], weight w: Matrix, alpha: Double) {
            for i in 0..<p { for j in 0..<p where i != j { gram[i * p + j] *= alpha } }
            for k in 0..<(p * p) { sum[k] += gram[k] }
            // rhs += G̃ · Wᵀ  ([p, p] · [p, q])
            let wd = w.data.map(Double.init)  // W [q, p] row-major = Wᵀ column-major
            BLAS.dgemmAccumulate(m: p, n: q, k: p, a: gram, transA: false, lda: p, b: wd, transB: true, ldb: p, into: &rhs)
        }

        /// (S + λ·mean(diag S) I)⁻¹ (R + λ·mean(diag S)·W₀ᵀ). The ridge pulls towards `prior` (the
        /// frequency-weighted average) rather than towards zero, so identical members are
        /// reproduced exactly whatever λ.
        func solve(ridge: Double, prior: Matrix?) throws -> (w: Matrix, method: SymmetricSolver.Method, conditionEstimate: Double) {
            var sum = self.sum, rhs = self.rhs
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
    }

    /// A report note for a system that was not solved by Cholesky.
    static func solverNote(_ what: String, _ method: SymmetricSolver.Method, _ estimate: Double) -> String {
        estimate > 0 ? "\(what): \(method.rawValue) (estimated rcond \(String(format: "%.1e", estimate)))"
                     : "\(what): \(method.rawValue) (not positive definite)"
    }

    /// Merges every group (one at a time, to bound memory: ALGORITHM.md §3b, "Memory").
    static func merge(_ layer: MoELayer, prepared: [Merging.PreparedGroup], frequency: [Double], options: MergeOptions,
                      tokens: TokenBlocks, progress: ProgressCallback?) throws -> ([Expert], [MergedGroup]) {
        var experts: [Expert] = []
        var reports: [MergedGroup] = []
        for (gi, p) in prepared.enumerated() {
            let (e, r) = try mergeGroup(layer, p, frequency: frequency, options: options, tokens: tokens)
            experts.append(e)
            reports.append(r)
            progress?("regmean \(layer.name)", gi + 1, prepared.count)
        }
        return (experts, reports)
    }

    /// One group: a token pass per member accumulates that member's Grams (inputs, and its own
    /// intermediate activations) and folds them into the group's RegMean systems, so one member's
    /// Grams are in memory at a time; then the solves; then, for regmean+refit, one more pass
    /// for the refit of `down`. Float64 throughout; the same sums in the same order as when all
    /// members were accumulated in one pass, so the result is the same to the bit.
    static func mergeGroup(_ layer: MoELayer, _ p: Merging.PreparedGroup, frequency: [Double], options: MergeOptions,
                           tokens: TokenBlocks) throws -> (Expert, MergedGroup) {
        let c = layer.config
        let d = c.dModel, f = c.dFF
        let minTokens = options.minTokens ?? d
        var report = MergedGroup(dominant: p.dominant, members: p.slots, frequency: p.slots.map { frequency[$0] },
                                 how: "copied", alignedCosine: p.alignedCosine)
        if p.stored.count == 1 { return (p.aligned[0], report) }
        var up = RegMeanSystem(inputs: d, outputs: f)
        var gate = c.expertType == .glu ? RegMeanSystem(inputs: d, outputs: f) : nil
        var down = RegMeanSystem(inputs: f, outputs: d)
        // Distinct tokens routed to at least one member (a token routed to two members adds one
        // row, not two, to the rank of the summed input Gram), over every block.
        var seen: [Bool] = []
        var distinct = 0
        var memberTokens = [Int](repeating: 0, count: p.stored.count)
        for (k, s) in p.stored.enumerated() {
            var gramX = [Double](repeating: 0, count: d * d)
            var gramH = [Double](repeating: 0, count: f * f)
            var offset = 0
            try tokens { x in
                if seen.count < offset + x.rows { seen += [Bool](repeating: false, count: offset + x.rows - seen.count) }
                let disp = dispatch(layer, x)[s]
                if !disp.tokens.isEmpty {
                    for t in disp.tokens where !seen[offset + t] { seen[offset + t] = true; distinct += 1 }
                    let xs = x.gatherRows(disp.tokens)
                    memberTokens[k] += xs.rows
                    accumulateWeightedCross(xs, xs, weights: disp.weights, into: &gramX)
                    let h = p.aligned[k].hidden(xs, activation: c.activation)
                    accumulateWeightedCross(h, h, weights: disp.weights, into: &gramH)
                }
                offset += x.rows
            }
            // Members without tokens drop out of the sums (their Grams are zero: adding them
            // would change nothing, but skipping keeps the sums' terms exactly the used ones).
            guard memberTokens[k] > 0 else { continue }
            var gx2 = gate != nil ? gramX : []  // the gate's copy of the input Gram
            up.add(gram: &gramX, weight: p.aligned[k].up.dense(), alpha: options.alpha)
            if gate != nil { gate!.add(gram: &gx2, weight: p.aligned[k].gate!.dense(), alpha: options.alpha) }
            down.add(gram: &gramH, weight: p.aligned[k].down.dense(), alpha: options.alpha)
        }
        let used = memberTokens.indices.filter { memberTokens[$0] > 0 }
        if used.isEmpty {
            report.how = "mean"
            report.warning = "no routed tokens: fell back to the plain mean"
            return (try Merging.weightedAverage(p.aligned, weights: p.aligned.map { _ in 1 }), report)
        }
        if distinct < minTokens {
            report.how = "weighted"
            report.warning = "only \(distinct) routed tokens (< \(minTokens)): fell back to the frequency-weighted average"
            return (try Merging.weightedAverage(p.aligned, weights: p.weights), report)
        }
        let prior = try Merging.weightedAverage(p.aligned, weights: p.weights)
        func solve(_ name: String, _ system: RegMeanSystem) throws -> Matrix {
            let (w, method, estimate) = try system.solve(ridge: options.ridge, prior: prior[matrix: name]!.dense())
            if method != .cholesky { report.notes.append(solverNote(name, method, estimate)) }
            return w
        }
        let upW = try solve("up", up)
        let gateW = try gate.map { try solve("gate", $0) }
        let downW = try solve("down", down)
        // Biases: usage-weighted average of the members that saw tokens.
        let avg = try Merging.weightedAverage(used.map { p.aligned[$0] }, weights: used.map { Double(memberTokens[$0]) })
        var expert = Expert(up: .dense(upW), gate: gateW.map { .dense($0) }, down: .dense(downW),
                            upBias: avg.upBias, downBias: avg.downBias)
        report.how = "regmean"
        guard options.method == .regmeanRefit else { return (expert, report) }
        try refitDown(&expert, layer, p, options: options, tokens: tokens, report: &report)
        report.how = "regmean+refit"
        return (expert, report)
    }

    /// Refits `down` (and its bias) so the merged expert reproduces its members' weighted
    /// outputs on the group's tokens: A = Σ s h* h*ᵀ, B = Σ h* (Σ_i w_i y_i)ᵀ (h* with a 1 appended
    /// when the expert has a down bias), ridge towards the RegMean down.
    static func refitDown(_ expert: inout Expert, _ layer: MoELayer, _ p: Merging.PreparedGroup, options: MergeOptions,
                          tokens: TokenBlocks, report: inout MergedGroup) throws {
        let c = layer.config
        let d = c.dModel, f = c.dFF
        let hasBias = expert.downBias != nil
        var r = RefitStats(features: f, outputs: d, bias: hasBias)
        try tokens { x in
            let disp = dispatch(layer, x)
            // The union of the members' tokens (members in stored-index order), their summed
            // weight s and Σ w_i y_i.
            var row: [Int: Int] = [:]  // token → row
            var rows: [Int] = []
            for s in p.stored.sorted() {
                for t in disp[s].tokens where row[t] == nil {
                    row[t] = rows.count
                    rows.append(t)
                }
            }
            guard !rows.isEmpty else { return }
            let n = rows.count
            var target = Matrix(rows: n, cols: d)
            var sw = [Float](repeating: 0, count: n)
            for (k, s) in p.stored.enumerated() {
                let dsp = disp[s]
                if dsp.tokens.isEmpty { continue }
                let y = p.aligned[k].forward(x.gatherRows(dsp.tokens), activation: c.activation)
                for (i, t) in dsp.tokens.enumerated() {
                    let j = row[t]!
                    let w = dsp.weights[i]
                    sw[j] += w
                    for q in 0..<d { target.data[j * d + q] += w * y.data[i * d + q] }
                }
            }
            r.add(hidden: expert.hidden(x.gatherRows(rows), activation: c.activation), target: target, weights: sw, bias: hasBias)
        }
        // Ridge towards the RegMean down (and bias), not towards zero.
        let (method, estimate) = try r.solve(into: &expert, bias: hasBias, ridge: options.refitRidge)
        if method != .cholesky { report.notes.append(solverNote("refit", method, estimate)) }
    }
}
