import Foundation

public enum ExpertType: String, Sendable, CaseIterable, Codable {
    /// y = down · act(up · x)
    case mlp
    /// y = down · (act(gate · x) ⊙ (up · x))
    case glu
}

public enum Activation: String, Sendable, CaseIterable, Codable {
    case relu, gelu, gelu_tanh, silu
    /// GPT-OSS's clamped SwiGLU (glu experts only): act(g) = g′ · σ(α g′) with g′ = min(g, limit),
    /// and the up value enters as clamp(u, −limit, limit) + 1 (`Expert.hidden`); α = 1.702,
    /// limit = 7 (transformers' `swiglu_alpha`, `swiglu_limit`; other values are refused on import).
    case swiglu_oai

    public static let swigluAlpha: Float = 1.702
    public static let swigluLimit: Float = 7

    @inline(__always) public func apply(_ x: Float) -> Float {
        switch self {
        case .relu: return x > 0 ? x : 0
        case .gelu: return 0.5 * x * (1 + erff(x / Float(2).squareRoot()))
        case .gelu_tanh:
            let c: Float = 0.797_884_560_802_865_4  // sqrt(2/pi)
            return 0.5 * x * (1 + tanhf(c * (x + 0.044715 * x * x * x)))
        case .silu: return x / (1 + expf(-x))
        case .swiglu_oai:
            let g = min(x, Activation.swigluLimit)
            return g / (1 + expf(-Activation.swigluAlpha * g))
        }
    }

    public func apply(inPlace m: inout Matrix) {
        m.data.withUnsafeMutableBufferPointer { p in
            for i in 0..<p.count { p[i] = apply(p[i]) }
        }
    }
}

/// How a router turns logits z [E] into k slots and their weights (docs/FORMAT.md §1, "Routing").
/// Every type also honours the layer's selection bias, expert groups and routed scaling factor
/// (`MoELayer.route`).
public enum RouterType: String, Sendable, CaseIterable, Codable {
    /// softmax over all slots, take the top-k, weight each by its probability (Switch).
    case softmax_topk
    /// same, then divide the k weights by their sum (Mixtral, Qwen with norm_topk_prob).
    case softmax_topk_norm
    /// s = sigmoid(z) per slot, take the top-k, weight each by its s (DeepSeek-V3 without
    /// norm_topk_prob).
    case sigmoid_topk
    /// same, then divide the k weights by their sum + 1e-20 (DeepSeek-V3, GLM-4.5, MiniMax-M2).
    case sigmoid_topk_norm
    /// take the top-k logits, weight them by the softmax over those k only (GPT-OSS).
    case topk_softmax
    /// take the top-k logits, weight each by sigmoid(z); the weight scales the expert's INPUT:
    /// y = Σ_j expert_j(σ(z_j) · x) (Llama-4; top-1 only, see `LayerConfig.routingProblem`).
    case topk_sigmoid_input

    /// The score a slot's weight comes from: softmax probability, sigmoid, or the logit itself.
    public var scoring: String {
        switch self {
        case .softmax_topk, .softmax_topk_norm: return "softmax"
        case .sigmoid_topk, .sigmoid_topk_norm: return "sigmoid"
        case .topk_softmax, .topk_sigmoid_input: return "logit"
        }
    }

    /// The routing weight multiplies the expert's input, not its output.
    public var scalesExpertInput: Bool { self == .topk_sigmoid_input }
}

/// One stored expert: its matrices in `nn.Linear` convention and optional biases.
public struct Expert: Sendable, Equatable {
    public var up: LinearOp  // [d_ff, d_model]
    public var gate: LinearOp?  // [d_ff, d_model], glu only
    public var down: LinearOp  // [d_model, d_ff]
    public var upBias: [Float]?  // [d_ff]
    public var downBias: [Float]?  // [d_model]
    public var gateBias: [Float]?  // [d_ff], glu only (GPT-OSS)

    public init(up: LinearOp, gate: LinearOp? = nil, down: LinearOp, upBias: [Float]? = nil, downBias: [Float]? = nil,
                gateBias: [Float]? = nil) {
        self.up = up
        self.gate = gate
        self.down = down
        self.upBias = upBias
        self.downBias = downBias
        self.gateBias = gateBias
    }

    public init(up: Matrix, gate: Matrix? = nil, down: Matrix, upBias: [Float]? = nil, downBias: [Float]? = nil,
                gateBias: [Float]? = nil) {
        self.init(up: .dense(up), gate: gate.map { .dense($0) }, down: .dense(down), upBias: upBias, downBias: downBias,
                  gateBias: gateBias)
    }

    /// The named matrices in a fixed order: up, gate (when present), down.
    public var namedMatrices: [(name: String, op: LinearOp)] {
        var out: [(String, LinearOp)] = [("up", up)]
        if let g = gate { out.append(("gate", g)) }
        out.append(("down", down))
        return out
    }

    public subscript(matrix name: String) -> LinearOp? {
        get {
            switch name {
            case "up": return up
            case "gate": return gate
            case "down": return down
            default: return nil
            }
        }
        set {
            guard let v = newValue else { return }
            switch name {
            case "up": up = v
            case "gate": gate = v
            case "down": down = v
            default: break
            }
        }
    }

    /// The intermediate activation `h(x)` [n, d_ff] for a token block X [n, d_model].
    public func hidden(_ x: Matrix, activation: Activation) -> Matrix {
        var h = up.apply(x)
        if let b = upBias { h.addRowVector(b) }
        if let g = gate {
            var a = g.apply(x)
            if let b = gateBias { a.addRowVector(b) }
            if activation == .swiglu_oai {
                let l = Activation.swigluLimit
                for i in 0..<h.data.count { h.data[i] = min(max(h.data[i], -l), l) + 1 }
            }
            activation.apply(inPlace: &a)
            for i in 0..<h.data.count { h.data[i] *= a.data[i] }
        } else {
            activation.apply(inPlace: &h)
        }
        return h
    }

    /// The expert's output for a token block X [n, d_model] → [n, d_model].
    public func forward(_ x: Matrix, activation: Activation) -> Matrix {
        var y = down.apply(hidden(x, activation: activation))
        if let b = downBias { y.addRowVector(b) }
        return y
    }

    public var parameterCount: Int {
        namedMatrices.reduce(0) { $0 + $1.op.parameterCount } + (upBias?.count ?? 0) + (downBias?.count ?? 0) + (gateBias?.count ?? 0)
    }

    public func storedBytes(floatBytes: Int, encoding: ExpertEncoding = .float) -> Int {
        namedMatrices.reduce(0) { acc, m in
            switch (encoding, m.op) {
            case (.fp8Block(let br, let bc), .dense(let w)):
                // One byte per weight and one float32 scale per block (FORMAT.md §1).
                return acc + w.count + ((w.rows + br - 1) / br) * ((w.cols + bc - 1) / bc) * 4
            default: return acc + m.op.storedBytes(floatBytes: floatBytes)
            }
        } + ((upBias?.count ?? 0) + (downBias?.count ?? 0) + (gateBias?.count ?? 0)) * floatBytes
    }

    public var flopsPerToken: Int {
        namedMatrices.reduce(0) { $0 + $1.op.flopsPerToken }
    }
}

/// The routing decision for a block of tokens.
public struct Routing: Sendable {
    /// Router logits [n, E].
    public var logits: Matrix
    /// The k chosen slots of token t: `slots[t*k ..< (t+1)*k]`, best first.
    public var slots: [Int]
    /// Their weights (as the router type and the layer's routing settings make them).
    public var weights: [Float]
    public var k: Int
}

/// The static description of a MoE layer (everything but the weights).
public struct LayerConfig: Sendable, Equatable {
    public var name: String
    public var index: Int
    public var numExperts: Int  // E, router slots
    public var topK: Int
    public var dModel: Int
    public var dFF: Int
    public var expertType: ExpertType
    public var activation: Activation
    public var routerType: RouterType
    /// Grouped top-k (DeepSeek-V3 `n_group`, `topk_group`): the E slots form `numGroups`
    /// consecutive groups; only the `topKGroups` groups of largest group score are eligible.
    /// 1 and 1: no grouping.
    public var numGroups: Int = 1
    public var topKGroups: Int = 1
    /// Every routing weight is multiplied by this (DeepSeek-V3 `routed_scaling_factor`).
    public var routedScalingFactor: Float = 1

    public init(name: String, index: Int, numExperts: Int, topK: Int, dModel: Int, dFF: Int,
                expertType: ExpertType, activation: Activation, routerType: RouterType,
                numGroups: Int = 1, topKGroups: Int = 1, routedScalingFactor: Float = 1) {
        self.name = name
        self.index = index
        self.numExperts = numExperts
        self.topK = topK
        self.dModel = dModel
        self.dFF = dFF
        self.expertType = expertType
        self.activation = activation
        self.routerType = routerType
        self.numGroups = numGroups
        self.topKGroups = topKGroups
        self.routedScalingFactor = routedScalingFactor
    }

    /// True when routing is one of the original two softmax forms with nothing else (what the
    /// compact router fit and its evaluation model).
    public var isPlainSoftmaxRouting: Bool {
        (routerType == .softmax_topk || routerType == .softmax_topk_norm) && numGroups == 1 && routedScalingFactor == 1
    }

    /// Why the compact router fit (ALGORITHM.md §3a) cannot make this layer a standard layer of
    /// `groups` experts (nil when it can): one line. Modelled: softmax and sigmoid scoring (rows
    /// fitted in that form, a selection bias refitted, the scaling factor kept), GPT-OSS's
    /// top-k-then-softmax and Llama-4's top-1 σ(z) on the input (sigmoid rows); grouped top-k
    /// needs `groups` a multiple of n_group with at least 2 experts per routing group and top_k within the topk_group eligible groups (n_group =
    /// topk_group makes every group eligible: the compact layer is ungrouped, exactly).
    public func compactProblem(groups g: Int) -> String? {
        guard numGroups > 1 && topKGroups < numGroups else { return nil }
        func valid(_ m: Int) -> Bool { m % numGroups == 0 && m / numGroups >= 2 && topK <= topKGroups * (m / numGroups) }
        if valid(g) { return nil }
        let choices = stride(from: numGroups, through: numExperts, by: numGroups).filter(valid)
        let list = choices.count > 4 ? choices.prefix(4).map(String.init).joined(separator: ", ") + " …" : choices.map(String.init).joined(separator: ", ")
        return "groups \(g) cannot keep the grouped top-k of \(numGroups) expert groups (n_group \(numGroups), topk_group \(topKGroups), top_k \(topK): a multiple of n_group with at least 2 experts per expert group and top_k ≤ topk_group × groups / n_group)"
            + (choices.isEmpty ? "; no group count below the \(numExperts) experts works" : ": use \(list)")
    }

    /// Why these routing settings cannot be computed (nil when they can): a one-line reason.
    public var routingProblem: String? {
        if numGroups < 1 || topKGroups < 1 || topKGroups > numGroups {
            return "n_group \(numGroups) and topk_group \(topKGroups) must satisfy 1 ≤ topk_group ≤ n_group"
        }
        if numGroups > 1 {
            if numExperts % numGroups != 0 { return "n_group \(numGroups) does not divide the \(numExperts) experts" }
            if numExperts / numGroups < 2 { return "n_group \(numGroups) leaves fewer than 2 experts per group (a group's score is its two best)" }
            if topK > topKGroups * (numExperts / numGroups) {
                return "top_k \(topK) exceeds the \(topKGroups * (numExperts / numGroups)) experts of the topk_group \(topKGroups) eligible groups"
            }
            if routerType == .topk_softmax || routerType == .topk_sigmoid_input { return "\(routerType.rawValue) routing has no expert groups" }
        }
        // Σ_j expert(w_j x) of two slots sharing a merged expert is not one run with Σ w_j: only
        // top-1 is modelled (every Llama-4 release).
        if routerType.scalesExpertInput && topK != 1 {
            return "num_experts_per_tok \(topK): routing that scales the expert input (\(routerType.rawValue)) is modelled for top-1 only"
        }
        if !routedScalingFactor.isFinite || routedScalingFactor <= 0 { return "routed_scaling_factor \(routedScalingFactor) must be a positive number" }
        return nil
    }
}

/// How a layer's dense expert matrices are stored (docs/FORMAT.md §1): as floats of the file's
/// type, or as block-scaled FP8 (float8_e4m3fn, one float32 scale per `rows` × `cols` block, as
/// the FP8 releases and transformers' `Fp8Quantize`). Biases and the router stay floats.
public enum ExpertEncoding: Sendable, Equatable, CustomStringConvertible {
    case float
    case fp8Block(rows: Int, cols: Int)

    /// Block-scaled FP8 with 128 × 128 blocks (DeepSeek-V3's, and export's default).
    public static let fp8 = ExpertEncoding.fp8Block(rows: 128, cols: 128)

    public var isFP8: Bool { self != .float }

    /// "float" or "f8-block 128x128".
    public var description: String {
        switch self {
        case .float: return "float"
        case .fp8Block(let r, let c): return "f8-block \(r)x\(c)"
        }
    }
}

/// A whole MoE layer in memory: router, stored experts and the slot → expert map.
public struct MoELayer: Sendable, Equatable {
    public var config: LayerConfig
    public var router: Matrix  // [E, d_model]
    public var routerBias: [Float]?
    /// A per-slot bias added to the scores for choosing the top-k only, never to the weights
    /// (DeepSeek-V3 `e_score_correction_bias`); nil means zero.
    public var selectionBias: [Float]?
    public var experts: [Expert]  // G stored experts
    /// Slot e uses stored expert `expertMap[e]`; nil means identity (G = E).
    public var expertMap: [Int]?
    /// How the writer stores the dense expert matrices (a reader sets it as the file has them;
    /// a stage that makes new experts starts from `.float`).
    public var expertEncoding: ExpertEncoding = .float

    public init(config: LayerConfig, router: Matrix, routerBias: [Float]? = nil, selectionBias: [Float]? = nil,
                experts: [Expert], expertMap: [Int]? = nil) {
        self.config = config
        self.router = router
        self.routerBias = routerBias
        self.selectionBias = selectionBias
        self.experts = experts
        self.expertMap = expertMap
    }

    public var name: String { config.name }
    public var numStored: Int { experts.count }

    /// The stored expert used by slot `e`.
    @inline(__always) public func storedIndex(slot e: Int) -> Int { expertMap?[e] ?? e }

    /// Slot → stored expert for every slot.
    public var resolvedMap: [Int] { expertMap ?? Array(0..<config.numExperts) }

    /// Router logits for a token block X [n, d_model] → [n, E].
    public func logits(_ x: Matrix) -> Matrix {
        var z = BLAS.matmul(x, router, transB: true)
        if let b = routerBias { z.addRowVector(b) }
        return z
    }

    /// Top-k routing of a token block (ties broken to the lower slot index).
    public func route(_ x: Matrix) -> Routing {
        let z = logits(x)
        return Self.route(logits: z, config: config, selectionBias: selectionBias)
    }

    /// Top-k routing from logits [n, E] with every routing setting of a layer: its router type,
    /// selection bias, expert groups and routed scaling factor (docs/FORMAT.md §1, "Routing").
    public static func route(logits z: Matrix, config c: LayerConfig, selectionBias: [Float]?) -> Routing {
        if c.numGroups == 1 && selectionBias == nil && (c.routerType == .softmax_topk || c.routerType == .softmax_topk_norm) {
            var r = route(logits: z, k: c.topK, type: c.routerType)
            if c.routedScalingFactor != 1 { for i in r.weights.indices { r.weights[i] *= c.routedScalingFactor } }
            return r
        }
        return routeGeneral(logits: z, config: c, selectionBias: selectionBias)
    }

    /// The general routing, in float32 as transformers computes it: scores s (softmax
    /// probabilities, sigmoids, or the logits for topk_softmax); choice scores c = s + bias;
    /// with groups, a group's score is the sum of its two largest c and only the topKGroups best
    /// groups stay eligible; the k largest eligible c are chosen (ties to the lower index, groups
    /// too); weights are the chosen s (softmax over the chosen logits for topk_softmax),
    /// divided by their sum (+ 1e-20 for sigmoid) for the _norm types, times the scaling factor.
    static func routeGeneral(logits z: Matrix, config cfg: LayerConfig, selectionBias: [Float]?) -> Routing {
        let n = z.rows, e = z.cols, k = cfg.topK, type = cfg.routerType
        let groups = cfg.numGroups, size = e / max(groups, 1)
        var slots = [Int](repeating: 0, count: n * k)
        var weights = [Float](repeating: 0, count: n * k)
        var score = [Float](repeating: 0, count: e), choice = [Float](repeating: 0, count: e)
        var groupScore = [Float](repeating: 0, count: groups)
        var eligible = [Bool](repeating: true, count: e)
        var taken = [Bool](repeating: false, count: max(e, groups))
        /// The index of the largest v[j] among allowed, untaken j (strict >: the lower index on ties).
        func best(_ v: [Float], count: Int, allowed: (Int) -> Bool) -> Int {
            var b = -1
            for j in 0..<count where !taken[j] && allowed(j) {
                if b < 0 || v[j] > v[b] { b = j }
            }
            return b
        }
        for t in 0..<n {
            let base = t * e
            switch type.scoring {
            case "softmax":
                var mx = -Float.infinity
                for j in 0..<e { mx = max(mx, z.data[base + j]) }
                var denom: Float = 0
                for j in 0..<e { score[j] = expf(z.data[base + j] - mx); denom += score[j] }
                for j in 0..<e { score[j] /= denom }
            case "sigmoid":
                for j in 0..<e { score[j] = 1 / (1 + expf(-z.data[base + j])) }
            default:
                for j in 0..<e { score[j] = z.data[base + j] }
            }
            for j in 0..<e { choice[j] = score[j] + (selectionBias?[j] ?? 0) }
            if groups > 1 {
                for g in 0..<groups {
                    var a = -Float.infinity, b = -Float.infinity
                    for j in (g * size)..<((g + 1) * size) {
                        let v = choice[j]
                        if v > a { b = a; a = v } else if v > b { b = v }
                    }
                    groupScore[g] = a + b
                }
                for g in 0..<groups { taken[g] = false }
                var keep = [Bool](repeating: false, count: groups)
                for _ in 0..<cfg.topKGroups {
                    let g = best(groupScore, count: groups) { _ in true }
                    taken[g] = true
                    keep[g] = true
                }
                for j in 0..<e { eligible[j] = keep[j / size] }
            }
            for j in 0..<e { taken[j] = false }
            for r in 0..<k {
                let j = best(choice, count: e) { eligible[$0] }
                taken[j] = true
                slots[t * k + r] = j
            }
            var sum: Float = 0
            if type == .topk_sigmoid_input {
                for r in 0..<k { weights[t * k + r] = 1 / (1 + expf(-score[slots[t * k + r]])) }
            } else if type == .topk_softmax {
                var mx = -Float.infinity
                for r in 0..<k { mx = max(mx, score[slots[t * k + r]]) }
                for r in 0..<k { weights[t * k + r] = expf(score[slots[t * k + r]] - mx); sum += weights[t * k + r] }
                for r in 0..<k { weights[t * k + r] /= sum }
            } else {
                for r in 0..<k { weights[t * k + r] = score[slots[t * k + r]]; sum += weights[t * k + r] }
                if type == .softmax_topk_norm, sum > 0 { for r in 0..<k { weights[t * k + r] /= sum } }
                if type == .sigmoid_topk_norm { for r in 0..<k { weights[t * k + r] /= sum + 1e-20 } }
            }
            if cfg.routedScalingFactor != 1 { for r in 0..<k { weights[t * k + r] *= cfg.routedScalingFactor } }
        }
        return Routing(logits: z, slots: slots, weights: weights, k: k)
    }

    /// Top-k routing from logits [n, E] for the two plain softmax types (no bias, no groups).
    public static func route(logits z: Matrix, k: Int, type: RouterType) -> Routing {
        precondition(type == .softmax_topk || type == .softmax_topk_norm, "route(logits:k:type:) is the plain softmax routing")
        let n = z.rows, e = z.cols
        var slots = [Int](repeating: 0, count: n * k)
        var weights = [Float](repeating: 0, count: n * k)
        var chosen = [Int](repeating: 0, count: k)
        for t in 0..<n {
            let base = t * e
            // Softmax denominator in Float64 for accuracy.
            var mx = -Float.infinity
            for j in 0..<e { mx = max(mx, z.data[base + j]) }
            var denom = 0.0
            for j in 0..<e { denom += Foundation.exp(Double(z.data[base + j] - mx)) }
            // Top-k by repeated selection: strict > keeps the lower index on ties.
            for r in 0..<k {
                var best = -1
                var bestV = -Float.infinity
                for j in 0..<e {
                    var taken = false
                    for q in 0..<r where chosen[q] == j { taken = true; break }
                    if taken { continue }
                    let v = z.data[base + j]
                    if best < 0 || v > bestV { best = j; bestV = v }
                }
                chosen[r] = best
            }
            var sum = 0.0
            for r in 0..<k {
                let p = Foundation.exp(Double(z.data[base + chosen[r]] - mx)) / denom
                slots[t * k + r] = chosen[r]
                weights[t * k + r] = Float(p)
                sum += p
            }
            if type == .softmax_topk_norm, sum > 0 {
                for r in 0..<k { weights[t * k + r] = Float(Double(weights[t * k + r]) / sum) }
            }
        }
        return Routing(logits: z, slots: slots, weights: weights, k: k)
    }

    /// For each stored expert: the tokens it runs on and the summed weight of its slots
    /// (a stored expert chosen by several of a token's slots runs once with the summed weight).
    public func dispatch(_ routing: Routing) -> [(tokens: [Int], weights: [Float])] { dispatch(routing, stored: numStored) }

    /// `dispatch` for a layer whose `stored` experts are not in memory (a generator writing them
    /// one at a time).
    public func dispatch(_ routing: Routing, stored: Int) -> [(tokens: [Int], weights: [Float])] {
        var out = [(tokens: [Int], weights: [Float])](repeating: ([], []), count: stored)
        let n = routing.slots.count / max(routing.k, 1)
        for t in 0..<n {
            for r in 0..<routing.k {
                let g = storedIndex(slot: routing.slots[t * routing.k + r])
                let w = routing.weights[t * routing.k + r]
                if let last = out[g].tokens.last, last == t {
                    out[g].weights[out[g].weights.count - 1] += w
                } else {
                    out[g].tokens.append(t)
                    out[g].weights.append(w)
                }
            }
        }
        return out
    }

    /// What a stored expert runs on for its dispatched tokens `d`, and the weights its outputs
    /// are summed with: the gathered rows and the routing weights, or, when the routing scales
    /// the expert input (topk_sigmoid_input), each row times its weight and weights 1. Every
    /// stage that runs experts on routed tokens goes through this.
    public static func expertInput(_ x: Matrix, _ d: (tokens: [Int], weights: [Float]), config: LayerConfig) -> (rows: Matrix, weights: [Float]) {
        var rows = x.gatherRows(d.tokens)
        guard config.routerType.scalesExpertInput else { return (rows, d.weights) }
        let c = rows.cols
        for (r, w) in d.weights.enumerated() { for j in 0..<c { rows.data[r * c + j] *= w } }
        return (rows, [Float](repeating: 1, count: d.weights.count))
    }

    /// The layer's output for a token block X [n, d_model]: the weighted sum of the chosen
    /// experts' outputs (gather each expert's tokens, run it batched, scatter-add).
    public func forward(_ x: Matrix) -> Matrix {
        forward(x, routing: route(x))
    }

    public func forward(_ x: Matrix, routing: Routing) -> Matrix {
        MoELayer.forward(x, routing: routing, dispatch: dispatch(routing), config: config) { experts[$0] }
    }

    // MARK: sizes

    public var expertParameterCount: Int { experts.reduce(0) { $0 + $1.parameterCount } }
    /// Expert bytes as the writer stores them with floats of `floatBytes` (FP8 matrices at one
    /// byte plus their block scales, when `expertEncoding` says so).
    public func expertBytes(floatBytes: Int) -> Int {
        experts.reduce(0) { $0 + $1.storedBytes(floatBytes: floatBytes, encoding: expertEncoding) }
    }

    /// Expert FLOPs per token (2 per multiply–add): the mean over slots weighted equally,
    /// times k, i.e. what one token costs when its k slots hit distinct experts.
    public var expertFlopsPerToken: Double {
        MoELayer.flopsPerToken(config: config, perStored: experts.map(\.flopsPerToken), storedIndex: storedIndex)
    }

    static func flopsPerToken(config: LayerConfig, perStored: [Int], storedIndex: (Int) -> Int) -> Double {
        let perSlot = (0..<config.numExperts).map { Double(perStored[storedIndex($0)]) }
        return perSlot.reduce(0, +) / Double(max(config.numExperts, 1)) * Double(config.topK)
    }
}
