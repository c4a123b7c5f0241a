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
    static func dispatch(_ layer: LayerSource, _ x: Matrix) -> [(tokens: [Int], weights: [Float])] {
        layer.dispatch(layer.route(x))
    }

    /// The RegMean system of one matrix kind of one group: S = Σ G̃_i and R = Σ G̃_i W_iᵀ, with
    /// G̃ = α·G + (1−α)·diag(G); W_i [q, p], G_i [p, p]. Two ways to fill it, both float64:
    /// - `add(gram:weight:alpha:)` folds in one member's whole Gram (the input side, p = d_model);
    /// - `addTokens` and `endMember` stream a member's tokens straight into S and R, so no
    ///   member's Gram is ever held (the down side, p = d_ff: 1.6 GB per Gram at Mixtral's 14336).
    ///   S then holds Σ G_i, and `solve` applies α to its off-diagonal once (diag G̃ = diag G);
    ///   G_i W_iᵀ = Σ_t w_t h_t (W_i h_t)ᵀ is accumulated from the member's own products W_i h_t.
    struct RegMeanSystem {
        let p: Int, q: Int
        var sum: [Double]
        var rhs: [Double]
        /// S holds Σ G_i (tokens streamed in), not yet Σ G̃_i.
        private(set) var streamed = false
        /// diag G_i of the member being streamed.
        private var memberDiagonal: [Double] = []
        /// The α of the streamed members.
        private var alpha = 1.0

        init(inputs p: Int, outputs q: Int) {
            self.p = p
            self.q = q
            sum = [Double](repeating: 0, count: p * p)
            rhs = [Double](repeating: 0, count: p * q)
        }

        /// Adds one member; `gram` is scaled to G̃ in place.
        mutating func add(gram: inout [Double], weight w: Matrix, alpha: Double) {
            precondition(!streamed)
            for i in 0..<p { for j in 0..<p where i != j { gram[i * p + j] *= alpha } }
            for k in 0..<(p * p) { sum[k] += gram[k] }
            // rhs += G̃ · Wᵀ  ([p, p] · [p, q])
            let wd = w.data.map(Double.init)  // W [q, p] row-major = Wᵀ column-major
            BLAS.dgemmAccumulate(m: p, n: q, k: p, a: gram, transA: false, lda: p, b: wd, transB: true, ldb: p, into: &rhs)
        }

        /// Adds a block of one member's inputs h [n, p] with routing weights w, given the
        /// member's weights as float64 (`wd`, W [q, p] row-major): S += Σ w h hᵀ,
        /// R += α Σ w h (W h)ᵀ, diag G_i += Σ w h².
        mutating func addTokens(_ h: Matrix, weights: [Float], member wd: [Double], alpha: Double) {
            let n = h.rows
            guard n > 0 else { return }
            if memberDiagonal.isEmpty { memberDiagonal = [Double](repeating: 0, count: p) }
            streamed = true
            self.alpha = alpha
            // In chunks of rows, so the float64 copies stay small (`float64ChunkRows`).
            for start in stride(from: 0, to: n, by: float64ChunkRows) {
                let rows = min(float64ChunkRows, n - start)
                var hd = [Double](repeating: 0, count: rows * p)   // w·h, float64
                var hp = [Double](repeating: 0, count: rows * p)   // h, float64
                for r in 0..<rows {
                    let t = start + r
                    let wt = Double(weights[t])
                    for j in 0..<p {
                        let v = Double(h.data[t * p + j])
                        hp[r * p + j] = v
                        hd[r * p + j] = wt * v
                        memberDiagonal[j] += wt * v * v
                    }
                }
                BLAS.dgemmAccumulate(m: p, n: p, k: rows, a: hd, transA: true, lda: p, b: hp, transB: false, ldb: p, into: &sum)
                // (W h) for every token: [rows, q] = h [rows, p] · Wᵀ
                var wh = [Double](repeating: 0, count: rows * q)
                BLAS.dgemmAccumulate(m: rows, n: q, k: p, a: hp, transA: false, lda: p, b: wd, transB: true, ldb: p, into: &wh)
                BLAS.dgemmAccumulate(m: p, n: q, k: rows, alpha: alpha, a: hd, transA: true, lda: p, b: wh, transB: false, ldb: q, into: &rhs)
            }
        }

        /// Ends the member whose tokens were streamed: R += (1−α) diag(G_i) W_iᵀ.
        mutating func endMember(member wd: [Double], alpha: Double) {
            guard !memberDiagonal.isEmpty else { return }
            for i in 0..<p {
                let s = (1 - alpha) * memberDiagonal[i]
                if s != 0 { for j in 0..<q { rhs[i * q + j] += s * wd[j * p + i] } }
            }
            memberDiagonal = []
        }

        /// (S + λ·mean(diag S) I)⁻¹ (R + λ·mean(diag S)·W₀ᵀ). The ridge pulls towards `prior` (the
        /// frequency-weighted average) rather than towards zero, so identical members are
        /// reproduced exactly whatever λ. Solved in place: the system is emptied.
        mutating func solve(ridge: Double, prior: Matrix?) throws -> (w: Matrix, method: SymmetricSolver.Method, conditionEstimate: Double) {
            var sum: [Double] = [], rhs: [Double] = []
            swap(&sum, &self.sum)
            swap(&rhs, &self.rhs)
            if streamed {
                // Σ G̃_i = α·Σ G_i off the diagonal, Σ G_i on it.
                for i in 0..<p { for j in 0..<p where i != j { sum[i * p + j] *= alpha } }
            }
            var meanDiag = 0.0
            for i in 0..<p { meanDiag += sum[i * p + i] }
            meanDiag /= Double(max(p, 1))
            let lambda = ridge * meanDiag + (meanDiag == 0 ? 1e-12 : 0)
            for i in 0..<p { sum[i * p + i] += lambda }
            if let w0 = prior {
                for i in 0..<p { for j in 0..<q { rhs[i * q + j] += lambda * Double(w0.data[j * p + i]) } }
            }
            let (method, estimate) = try SymmetricSolver.solveInPlace(&sum, &rhs, n: p, m: q)  // rhs: [p, q] = W*ᵀ
            var w = Matrix(rows: q, cols: p)
            for i in 0..<p { for j in 0..<q { w.data[j * p + i] = Float(rhs[i * q + j]) } }
            return (w, method, estimate)
        }
    }

    /// A report note for a system that was not solved by Cholesky.
    static func solverNote(_ what: String, _ method: SymmetricSolver.Method, _ estimate: Double) -> String {
        estimate > 0 ? "\(what): \(method.rawValue) (estimated rcond \(String(format: "%.1e", estimate)))"
                     : "\(what): \(method.rawValue) (not positive definite)"
    }

    /// One group: a routing pass decides whether it has the tokens for RegMean; then a token pass
    /// per member accumulates that member's input Gram and folds it into
    /// the up (and gate) systems, which are then solved; a second pass per member streams its
    /// intermediate activations into the down system, which is solved next; then, for
    /// regmean+refit, one more pass refits `down`. Only one member's input Gram (d_model²) and one
    /// system at a time are held (ALGORITHM.md §3b, "Memory"), all float64.
    static func mergeGroup(_ layer: LayerSource, _ p: Merging.PreparedGroup, frequency: [Double], options: MergeOptions,
                           tokens: TokenBlocks) throws -> (Expert, MergedGroup) {
        let c = layer.config
        let d = c.dModel, f = c.dFF
        let minTokens = options.minTokens ?? d
        var report = MergedGroup(dominant: p.dominant, members: p.slots, frequency: p.slots.map { frequency[$0] },
                                 how: "copied", alignedCosine: p.alignedCosine)
        if p.stored.count == 1 { return (p.aligned[0], report) }
        // A routing pass first: the tokens each member gets and the distinct tokens routed to at
        // least one member (a token routed to two members adds one row, not two, to the rank of
        // the summed input Gram). A group that falls back costs no Gram.
        var seen: [Bool] = []
        var distinct = 0
        var memberTokens = [Int](repeating: 0, count: p.stored.count)
        var offset = 0
        try tokens { x in
            seen += [Bool](repeating: false, count: x.rows)
            let disp = dispatch(layer, x)
            for (k, s) in p.stored.enumerated() {
                memberTokens[k] += disp[s].tokens.count
                for t in disp[s].tokens where !seen[offset + t] { seen[offset + t] = true; distinct += 1 }
            }
            offset += x.rows
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
        var up = RegMeanSystem(inputs: d, outputs: f)
        var gate = c.expertType == .glu ? RegMeanSystem(inputs: d, outputs: f) : nil
        // Members without tokens drop out of the sums (their Grams are zero: adding them would
        // change nothing, but skipping keeps the sums' terms exactly the used ones).
        for k in used {
            let s = p.stored[k]
            var gramX = [Double](repeating: 0, count: d * d)
            try MoELayer.forEachRoutedInput(layer, expert: p.aligned[k], stored: s, tokens: tokens, hidden: false) { xs, w in
                accumulateWeightedCross(xs, xs, weights: w, into: &gramX)
            }
            var gx2 = gate != nil ? gramX : []  // the gate's copy of the input Gram
            up.add(gram: &gramX, weight: p.aligned[k].up.dense(), alpha: options.alpha)
            if gate != nil { gate!.add(gram: &gx2, weight: p.aligned[k].gate!.dense(), alpha: options.alpha) }
        }
        // The ridge prior, the frequency-weighted average, one matrix at a time (one expert's
        // worth of memory less than the whole average while the down system is streamed).
        func solve(_ name: String, _ system: inout RegMeanSystem) throws -> Matrix {
            let prior = try Merging.weightedAverage(name, of: p.aligned, weights: p.weights)
            let (w, method, estimate) = try system.solve(ridge: options.ridge, prior: prior)
            if method != .cholesky { report.notes.append(solverNote(name, method, estimate)) }
            return w
        }
        let upW = try solve("up", &up)
        var gateW: Matrix? = nil
        if var g = gate {
            gate = nil
            gateW = try solve("gate", &g)
        }
        // The down system, streamed member by member (the members' own activations).
        var down = RegMeanSystem(inputs: f, outputs: d)
        for k in used {
            let s = p.stored[k]
            let member = p.aligned[k]
            let wd = member.down.dense().data.map(Double.init)  // down [d, f], float64
            try MoELayer.forEachRoutedInput(layer, expert: member, stored: s, tokens: tokens, hidden: true) { h, w in
                down.addTokens(h, weights: w, member: wd, alpha: options.alpha)
            }
            down.endMember(member: wd, alpha: options.alpha)
        }
        let downW = try solve("down", &down)
        // Biases: usage-weighted average of the members that saw tokens.
        let biases = Merging.weightedBiases(used.map { p.aligned[$0] }, weights: used.map { Double(memberTokens[$0]) })
        var expert = Expert(up: .dense(upW), gate: gateW.map { .dense($0) }, down: .dense(downW),
                            upBias: biases.up, downBias: biases.down, gateBias: biases.gate)
        report.how = "regmean"
        guard options.method == .regmeanRefit else { return (expert, report) }
        try refitDown(&expert, layer, p, options: options, tokens: tokens, report: &report)
        report.how = "regmean+refit"
        return (expert, report)
    }

    /// Refits `down` (and its bias) so the merged expert reproduces its members' weighted
    /// outputs on the group's tokens: A = Σ s h* h*ᵀ, B = Σ h* (Σ_i w_i y_i)ᵀ (h* with a 1 appended
    /// when the expert has a down bias), ridge towards the RegMean down.
    static func refitDown(_ expert: inout Expert, _ layer: LayerSource, _ p: Merging.PreparedGroup, options: MergeOptions,
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
            // Input-scaled routing (top-1): each row's own routing weight scales the merged
            // expert's input as it scales the member's.
            var rowScale = [Float](repeating: 1, count: n)
            for (k, s) in p.stored.enumerated() {
                let dsp = disp[s]
                if dsp.tokens.isEmpty { continue }
                let (xs, ws) = MoELayer.expertInput(x, dsp, config: c)
                let y = p.aligned[k].forward(xs, activation: c.activation)
                for (i, t) in dsp.tokens.enumerated() {
                    let j = row[t]!
                    let w = ws[i]
                    sw[j] += w
                    if c.routerType.scalesExpertInput { rowScale[j] = dsp.weights[i] }
                    for q in 0..<d { target.data[j * d + q] += w * y.data[i * d + q] }
                }
            }
            let merged = MoELayer.expertInput(x, (rows, rowScale), config: c).rows
            r.add(hidden: expert.hidden(merged, activation: c.activation), target: target, weights: sw, bias: hasBias)
        }
        // Ridge towards the RegMean down (and bias), not towards zero.
        let (method, estimate) = try r.solve(into: &expert, bias: hasBias, ridge: options.refitRidge)
        if method != .cholesky { report.notes.append(solverNote("refit", method, estimate)) }
    }
}
