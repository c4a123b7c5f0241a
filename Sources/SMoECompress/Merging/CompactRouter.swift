import Foundation

/// How a merged layer is routed: all E router slots plus an `expert_map` (the default), or a
/// compact layer of G router rows and G experts, fitted to the slot router (ALGORITHM.md §3.4).
public enum RouterLayout: String, Sendable, CaseIterable {
    case slots, compact
}

/// Solver settings of the compact router fit.
public struct CompactRouterOptions: Sendable, Equatable {
    /// L-BFGS iterations at most.
    public var maxIterations = 500
    /// Stop when the largest gradient entry is at most this.
    public var gradientTolerance = 1e-7
    /// Stop when one iteration lowers the loss by less than this times max(1, loss).
    public var lossTolerance = 1e-12
    /// L-BFGS memory (pairs kept).
    public var memory = 10

    public init() {}
}

/// How well a G-row router reproduces the group-summed slot probabilities on a set of tokens.
public struct RouterFitMeasure: Sendable, Equatable {
    public var tokens: Int
    /// Mean over tokens of −Σ_g p_g log q_g (p: group-summed slot probabilities, q: softmax of
    /// the G-row router); for sigmoid routers the binary cross-entropy
    /// −Σ_g [p_g log q_g + (1 − p_g) log(1 − q_g)] (p_g: the group's largest member score
    /// max_{s∈g} σ(z_s), q = σ of the G-row router).
    public var crossEntropy: Double
    /// Mean entropy of p: the least cross-entropy any router can reach (cross-entropy − this is
    /// the mean KL divergence).
    public var entropy: Double
    /// Fraction of tokens whose k groups of largest q are the k groups of largest p.
    public var topKAgreement: Double

    public var json: JSONValue {
        .object([("tokens", .int(tokens)), ("cross_entropy", .double(crossEntropy)), ("entropy", .double(entropy)),
                 ("top_k_agreement", .double(topKAgreement))])
    }
}

/// What the compact router fit did to one layer.
public struct CompactRouterReport: Sendable {
    public var name: String
    /// The slots of each group (group g is stored expert g and router row g), and the most used
    /// slot of each, whose router row started the fit.
    public var groups: [[Int]]
    public var start: [Int]
    public var iterations: Int
    /// True when the gradient or loss tolerance was met (false: the iteration limit or a failed
    /// line search stopped the solver).
    public var converged: Bool
    /// On the calibration tokens: the most-used-slot rows (the start) and the fitted rows.
    public var initial: RouterFitMeasure
    public var fitted: RouterFitMeasure
    /// The same on evaluation tokens, when a stage measured them (`compress --eval-calib`).
    public var evaluation: (initial: RouterFitMeasure, fitted: RouterFitMeasure)? = nil
    /// The expert refit under the compact routing, when asked for (`MergeSettings.compactRefit`).
    public var refit: CompactRefitReport? = nil
    /// How the selection bias was refitted, when the layer has one.
    public var selectionBias: SelectionBiasFit? = nil

    /// Slot → group.
    public var slotToGroup: [Int] {
        var m = [Int](repeating: 0, count: groups.reduce(0) { $0 + $1.count })
        for (g, slots) in groups.enumerated() { for s in slots { m[s] = g } }
        return m
    }

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [
            ("groups", .int(groups.count)), ("iterations", .int(iterations)), ("converged", .bool(converged)),
            ("start_rows", JSONValue(start)), ("calibration_start", initial.json), ("calibration_fitted", fitted.json),
        ]
        if let e = evaluation { kv += [("evaluation_start", e.initial.json), ("evaluation_fitted", e.fitted.json)] }
        if let b = selectionBias { kv.append(("selection_bias", b.json)) }
        if let r = refit { kv.append(("expert_refit", r.json)) }
        return .object(kv)
    }
}

/// Turns a merged layer (E router slots, G stored experts, `expert_map`) into a standard MoE
/// layer of G router rows and G experts: row g is fitted on calibration tokens so that softmax
/// over the G rows reproduces p_g(x) = Σ_{s∈g} softmax(R x + b)_s (ALGORITHM.md §3.4).
public enum CompactRouter {
    /// The slots of each stored expert of `layer`, in stored order.
    public static func groups(of layer: MoELayer) -> [[Int]] {
        var out = [[Int]](repeating: [], count: layer.numStored)
        for (s, g) in layer.resolvedMap.enumerated() { out[g].append(s) }
        return out
    }

    /// The compact form of `merged` and what the fit did. `frequency` is the slots' usage (the
    /// start row of a group is its most used slot's, the lower slot on ties). Softmax routers
    /// (and top-k-then-softmax) get rows fitted to the group-summed slot probabilities, sigmoid
    /// routers rows fitted so that σ(row·x) reproduces the group's largest member score; a
    /// selection bias is refitted (`SelectionBiasFit`), the scaling factor kept; with grouped
    /// top-k the stored experts are first ordered into the expert groups (`regrouped`).
    public static func compact(_ merged: MoELayer, frequency: [Double], tokens: TokenBlocks,
                               options: CompactRouterOptions = CompactRouterOptions()) throws -> (layer: MoELayer, report: CompactRouterReport) {
        if let why = merged.config.compactProblem(groups: merged.numStored) { throw SMoEError.layer(merged.name, why) }
        let merged = try regrouped(merged, frequency: frequency)
        let groups = groups(of: merged)
        if let empty = groups.firstIndex(where: \.isEmpty) {
            throw SMoEError.layer(merged.name, "stored expert \(empty) has no router slot, so it has no router row to fit")
        }
        let start = groups.map { slots in slots.max { frequency[$0] < frequency[$1] || (frequency[$0] == frequency[$1] && $0 > $1) }! }
        let data = try FitData(layer: merged, groups: groups, tokens: tokens)
        let d = merged.config.dModel, g = groups.count, hasBias = merged.routerBias != nil
        var theta = [Double](repeating: 0, count: g * d + (hasBias ? g : 0))
        for (j, s) in start.enumerated() {
            for c in 0..<d { theta[j * d + c] = Double(merged.router[s, c]) }
            if let b = merged.routerBias { theta[g * d + j] = Double(b[s]) }
        }
        let initial = data.measure(theta)
        let (solution, iterations, converged) = lbfgs(theta, options: options) { data.lossAndGradient($0) }
        var out = merged
        out.router = Matrix(rows: g, cols: d, data: solution[0..<(g * d)].map { Float($0) })
        out.routerBias = hasBias ? solution[(g * d)...].map { Float($0) } : nil
        out.expertMap = nil
        out.config.numExperts = g
        // n_group = topk_group: every group is eligible, so the compact layer is ungrouped.
        if out.config.topKGroups == out.config.numGroups { (out.config.numGroups, out.config.topKGroups) = (1, 1) }
        var biasFit: SelectionBiasFit? = nil
        if merged.selectionBias != nil {
            (out.selectionBias, biasFit) = try SelectionBiasFit.fit(compact: out, slotLayer: merged, groups: groups, start: start, tokens: tokens)
        }
        // Measured on the rows as stored (float32).
        let fitted = data.measure(parameters(out))
        var report = CompactRouterReport(name: merged.name, groups: groups, start: start, iterations: iterations,
                                         converged: converged, initial: initial, fitted: fitted)
        report.selectionBias = biasFit
        return (out, report)
    }

    /// `layer` with its stored experts ordered for grouped top-k (n_group > topk_group): the G
    /// merged experts are assigned to the n_group expert groups, G / n_group each, maximising the
    /// usage `frequency` of the member slots that lie in the group they are assigned to (a linear
    /// assignment; deterministic), then stored group by group, each group's in the order of their
    /// lowest member slot. Other layers unchanged.
    static func regrouped(_ layer: MoELayer, frequency: [Double]) throws -> MoELayer {
        let c = layer.config
        guard c.numGroups > 1 && c.topKGroups < c.numGroups else { return layer }
        let g = layer.numStored, size = g / c.numGroups, slotsPerGroup = c.numExperts / c.numGroups
        let members = groups(of: layer)
        // costs[i, col]: merged expert i in expert group col / size; a small share of the member
        // count keeps unused slots meaningful.
        var costs = [Float](repeating: 0, count: g * g)
        for (i, slots) in members.enumerated() {
            for s in slots {
                let w = Float(frequency[s] + 1e-6)
                for col in 0..<g where col / size == s / slotsPerGroup { costs[i * g + col] += w }
            }
        }
        let assignment = try LinearAssignment.solve(rows: g, cols: g, costs: costs, maximize: true)
        var bins = [[Int]](repeating: [], count: c.numGroups)
        for (i, col) in assignment.rowToColumn.enumerated() { bins[col / size].append(i) }
        // Within an expert group by lowest member slot. Position → merged expert.
        let order = bins.flatMap { $0.sorted { members[$0].min()! < members[$1].min()! } }
        var inverse = [Int](repeating: 0, count: g)
        for (pos, i) in order.enumerated() { inverse[i] = pos }
        var out = layer
        out.experts = order.map { layer.experts[$0] }
        out.expertMap = layer.resolvedMap.map { inverse[$0] }
        return out
    }

    /// The fit's figures on other tokens (held out): the E-slot `slotLayer` (router and
    /// `groups`) against the start rows and the compact layer's router.
    public static func measure(slotLayer: MoELayer, groups: [[Int]], start: [Int], compact: MoELayer,
                               tokens: TokenBlocks) throws -> (initial: RouterFitMeasure, fitted: RouterFitMeasure) {
        let data = try FitData(layer: slotLayer, groups: groups, tokens: tokens)
        var first = compact
        first.router = slotLayer.router.gatherRows(start)
        first.routerBias = slotLayer.routerBias.map { b in start.map { b[$0] } }
        return (data.measure(parameters(first)), data.measure(parameters(compact)))
    }

    /// A compact layer's router rows and bias as the fit's parameter vector.
    static func parameters(_ layer: MoELayer) -> [Double] {
        layer.router.data.map(Double.init) + (layer.routerBias ?? []).map(Double.init)
    }

    /// A layer's calibration tokens in float64 with their targets p (group-summed slot
    /// probabilities), held in memory for the solver's repeated passes.
    struct FitData {
        var blocks: [(x: [Double], p: [Double], rows: Int)] = []
        var tokens = 0
        var entropy = 0.0
        let d: Int, g: Int, k: Int, hasBias: Bool
        /// Sigmoid scoring: targets t_g = max_{s∈g} σ(z_s), loss the binary cross-entropy of
        /// σ(W x + c) (else softmax targets and the cross-entropy of softmax(W x + c)).
        let sigmoid: Bool

        init(layer: MoELayer, groups: [[Int]], tokens source: TokenBlocks) throws {
            d = layer.config.dModel
            g = groups.count
            k = min(layer.config.topK, groups.count)
            hasBias = layer.routerBias != nil
            // Llama-4 (top-1, σ of the chosen logit on the input): σ is monotone, so the top-1
            // group's score is its largest member's σ(z_s), the sigmoid target.
            sigmoid = layer.config.routerType.scoring == "sigmoid" || layer.config.routerType.scalesExpertInput
            let sigmoid = self.sigmoid
            let e = layer.config.numExperts
            var slotGroup = [Int](repeating: 0, count: e)
            for (j, slots) in groups.enumerated() { for s in slots { slotGroup[s] = j } }
            let r = layer.router.data.map(Double.init)
            let bias = layer.routerBias.map { $0.map(Double.init) }
            var blocks: [(x: [Double], p: [Double], rows: Int)] = []
            var n = 0
            var h = 0.0
            let (d, g) = (self.d, self.g)
            try source { xb in
                let rows = xb.rows
                let x = xb.data.map(Double.init)
                var z = [Double](repeating: 0, count: rows * e)
                BLAS.dgemmAccumulate(m: rows, n: e, k: d, a: x, transA: false, lda: d, b: r, transB: true, ldb: d, into: &z)
                var p = [Double](repeating: 0, count: rows * g)
                for t in 0..<rows {
                    if let b = bias { for s in 0..<e { z[t * e + s] += b[s] } }
                    if sigmoid {
                        for s in 0..<e { let v = 1 / (1 + Foundation.exp(-z[t * e + s])); p[t * g + slotGroup[s]] = max(p[t * g + slotGroup[s]], v) }
                        for j in 0..<g { h += binaryEntropy(p[t * g + j]) }
                        continue
                    }
                    var mx = -Double.infinity
                    for s in 0..<e { mx = max(mx, z[t * e + s]) }
                    var sum = 0.0
                    for s in 0..<e { let v = Foundation.exp(z[t * e + s] - mx); z[t * e + s] = v; sum += v }
                    for s in 0..<e { p[t * g + slotGroup[s]] += z[t * e + s] / sum }
                    for j in 0..<g where p[t * g + j] > 0 { h -= p[t * g + j] * Foundation.log(p[t * g + j]) }
                }
                blocks.append((x, p, rows))
                n += rows
            }
            guard n > 0 else { throw SMoEError.layer(layer.name, "the compact router fit has no calibration tokens") }
            self.blocks = blocks
            self.tokens = n
            self.entropy = h / Double(n)
        }

        /// Logits of the G-row router θ for one block, [rows, G].
        func logits(_ theta: [Double], _ b: (x: [Double], p: [Double], rows: Int)) -> [Double] {
            var z = [Double](repeating: 0, count: b.rows * g)
            BLAS.dgemmAccumulate(m: b.rows, n: g, k: d, a: b.x, transA: false, lda: d, b: Array(theta[0..<(g * d)]),
                                 transB: true, ldb: d, into: &z)
            if hasBias { for t in 0..<b.rows { for j in 0..<g { z[t * g + j] += theta[g * d + j] } } }
            return z
        }

        /// Mean cross-entropy and its gradient: ∇W = Dᵀ X / N, ∇b = Σ_t D_t / N with D = q − p.
        func lossAndGradient(_ theta: [Double]) -> (Double, [Double]) {
            var loss = 0.0
            var gw = [Double](repeating: 0, count: g * d)
            var gb = [Double](repeating: 0, count: hasBias ? g : 0)
            for b in blocks {
                var z = logits(theta, b)
                for t in 0..<b.rows where sigmoid {
                    // −t log σ(u) − (1 − t) log(1 − σ(u)) = softplus(u) − t u; ∂/∂u = σ(u) − t.
                    for j in 0..<g {
                        let u = z[t * g + j], p = b.p[t * g + j]
                        loss += max(u, 0) + Foundation.log1p(Foundation.exp(-abs(u))) - p * u
                        z[t * g + j] = 1 / (1 + Foundation.exp(-u)) - p
                        if hasBias { gb[j] += z[t * g + j] }
                    }
                }
                for t in 0..<b.rows where !sigmoid {
                    var mx = -Double.infinity
                    for j in 0..<g { mx = max(mx, z[t * g + j]) }
                    var sum = 0.0
                    for j in 0..<g { sum += Foundation.exp(z[t * g + j] - mx) }
                    let lse = mx + Foundation.log(sum)
                    for j in 0..<g {
                        let p = b.p[t * g + j]
                        loss -= p * (z[t * g + j] - lse)
                        z[t * g + j] = Foundation.exp(z[t * g + j] - lse) - p
                        if hasBias { gb[j] += z[t * g + j] }
                    }
                }
                BLAS.dgemmAccumulate(m: g, n: d, k: b.rows, a: z, transA: true, lda: g, b: b.x, transB: false, ldb: d, into: &gw)
            }
            let n = Double(tokens)
            return (loss / n, (gw + gb).map { $0 / n })
        }

        /// Cross-entropy and top-k group agreement of router θ.
        func measure(_ theta: [Double]) -> RouterFitMeasure {
            var agree = 0
            for b in blocks {
                let z = logits(theta, b)
                for t in 0..<b.rows {
                    let want = CompactRouter.topK(b.p[(t * g)..<((t + 1) * g)], k)
                    let got = CompactRouter.topK(z[(t * g)..<((t + 1) * g)], k)
                    if Set(want) == Set(got) { agree += 1 }
                }
            }
            return RouterFitMeasure(tokens: tokens, crossEntropy: lossAndGradient(theta).0, entropy: entropy,
                                    topKAgreement: Double(agree) / Double(tokens))
        }
    }

    /// −t log t − (1 − t) log(1 − t), 0 at 0 and 1.
    static func binaryEntropy(_ t: Double) -> Double {
        (t > 0 ? -t * Foundation.log(t) : 0) + (t < 1 ? -(1 - t) * Foundation.log(1 - t) : 0)
    }

    /// The indices of the k largest values (ties to the lower index), as `MoELayer.route` picks.
    static func topK(_ v: ArraySlice<Double>, _ k: Int) -> [Int] {
        var chosen: [Int] = []
        for _ in 0..<k {
            var best = -1
            for j in v.indices where !chosen.contains(j - v.startIndex) {
                if best < 0 || v[j] > v[best + v.startIndex] { best = j - v.startIndex }
            }
            chosen.append(best)
        }
        return chosen
    }

    /// Limited-memory BFGS with Armijo backtracking on a smooth convex function; deterministic.
    /// Returns the last point, the iterations made and whether a tolerance was met.
    static func lbfgs(_ x0: [Double], options: CompactRouterOptions,
                      _ f: ([Double]) -> (Double, [Double])) -> (x: [Double], iterations: Int, converged: Bool) {
        func dot(_ a: [Double], _ b: [Double]) -> Double { zip(a, b).reduce(0) { $0 + $1.0 * $1.1 } }
        var x = x0
        var (fx, gx) = f(x)
        var s: [[Double]] = [], y: [[Double]] = [], rho: [Double] = []
        var it = 0
        while it < options.maxIterations {
            if gx.reduce(0, { max($0, abs($1)) }) <= options.gradientTolerance { return (x, it, true) }
            // Two-loop recursion: direction = −H g.
            var q = gx
            var alpha = [Double](repeating: 0, count: s.count)
            for i in stride(from: s.count - 1, through: 0, by: -1) {
                alpha[i] = rho[i] * dot(s[i], q)
                for j in 0..<q.count { q[j] -= alpha[i] * y[i][j] }
            }
            let gamma = s.isEmpty ? 1 / max(gx.reduce(0) { $0 + $1 * $1 }.squareRoot(), 1e-300) : dot(s.last!, y.last!) / dot(y.last!, y.last!)
            for j in 0..<q.count { q[j] *= gamma }
            for i in 0..<s.count {
                let beta = rho[i] * dot(y[i], q)
                for j in 0..<q.count { q[j] += s[i][j] * (alpha[i] - beta) }
            }
            var dir = q.map { -$0 }
            var slope = dot(gx, dir)
            if !(slope < 0) {  // not a descent direction (rounding): restart from steepest descent
                s = []; y = []; rho = []
                dir = gx.map { -$0 }
                slope = dot(gx, dir)
            }
            var step = 1.0
            var accepted: (x: [Double], f: Double, g: [Double])? = nil
            for _ in 0..<40 {
                let xn = zip(x, dir).map { $0 + step * $1 }
                let (fn, gn) = f(xn)
                if fn.isFinite && fn <= fx + 1e-4 * step * slope { accepted = (xn, fn, gn); break }
                step *= 0.5
            }
            guard let a = accepted else { return (x, it, false) }
            it += 1
            let sk = zip(a.x, x).map { $0 - $1 }, yk = zip(a.g, gx).map { $0 - $1 }
            let sy = dot(sk, yk)
            let decrease = fx - a.f
            x = a.x; fx = a.f; gx = a.g
            if sy > 1e-16 * dot(yk, yk).squareRoot() * dot(sk, sk).squareRoot() {
                s.append(sk); y.append(yk); rho.append(1 / sy)
                if s.count > options.memory { s.removeFirst(); y.removeFirst(); rho.removeFirst() }
            }
            if decrease <= options.lossTolerance * max(1, abs(fx)) { return (x, it, true) }
        }
        return (x, it, gx.reduce(0, { max($0, abs($1)) }) <= options.gradientTolerance)
    }
}
