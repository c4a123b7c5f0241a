/// How one group was merged.
public struct MergedGroup: Sendable {
    public var dominant: Int
    public var members: [Int]
    /// Each member's share of the layer's routing hits (frequency), in `members` order.
    public var frequency: [Double]
    /// What was done: "copied" (one stored expert), "weighted" (frequency-weighted average),
    /// "mean" (no member was ever used), or a method-specific description.
    public var how: String
    /// Mean matched-neuron cosine to the dominant after alignment (1 for singletons).
    public var alignedCosine: Double
    /// Set when the group could not be merged as asked (e.g. too few tokens for RegMean).
    public var warning: String? = nil
    /// Solver remarks (e.g. a least-squares fallback for an ill-conditioned system).
    public var notes: [String] = []

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [
            ("dominant", .int(dominant)), ("members", JSONValue(members)), ("frequency", JSONValue(frequency)),
            ("merge", .string(how)), ("aligned_cosine", .double(alignedCosine)),
        ]
        if let w = warning { kv.append(("warning", .string(w))) }
        if !notes.isEmpty { kv.append(("notes", JSONValue(notes))) }
        return .object(kv)
    }
}

/// A group's members as read, dropped one by one once aligned.
private final class Originals: @unchecked Sendable {
    var experts: [Expert?]
    init(_ experts: [Expert]) { self.experts = experts }
}

/// Merging a layer's groups into single experts (ALGORITHM.md §3).
public enum Merging {
    /// Σ w_i E_i / Σ w_i over every matrix and bias (experts must be dense and already aligned).
    /// When all weights are zero the plain mean is used.
    public static func weightedAverage(_ experts: [Expert], weights: [Double]) throws -> Expert {
        let gate: Matrix? = experts[0].gate != nil ? try weightedAverage("gate", of: experts, weights: weights) : nil
        let biases = weightedBiases(experts, weights: weights)
        return Expert(up: .dense(try weightedAverage("up", of: experts, weights: weights)), gate: gate.map { .dense($0) },
                      down: .dense(try weightedAverage("down", of: experts, weights: weights)),
                      upBias: biases.up, downBias: biases.down, gateBias: biases.gate)
    }

    /// The normalised float32 weights of `weightedAverage` (the plain mean when all are zero).
    private static func normalised(_ weights: [Double]) -> [Float] {
        let total = weights.reduce(0, +)
        return total > 0 ? weights.map { Float($0 / total) } : weights.map { _ in 1 / Float(weights.count) }
    }

    /// One matrix (`up`, `gate` or `down`) of `weightedAverage`, the same bits, without
    /// averaging the others (RegMean's ridge prior needs one matrix at a time).
    public static func weightedAverage(_ matrix: String, of experts: [Expert], weights: [Double]) throws -> Matrix {
        precondition(!experts.isEmpty && experts.count == weights.count)
        let w = normalised(weights)
        let mats = try experts.map { e -> Matrix in
            let m = try Alignment.denseMatrices(e, "merge member")
            switch matrix {
            case "up": return m.up
            case "down": return m.down
            default:
                guard let g = m.gate else { throw SMoEError("merge member: the expert has no \(matrix) matrix") }
                return g
            }
        }
        var out = Matrix(rows: mats[0].rows, cols: mats[0].cols)
        for (m, wi) in zip(mats, w) where wi != 0 { out.addScaled(m, wi) }
        return out
    }

    /// The biases of `weightedAverage` alone.
    public static func weightedBiases(_ experts: [Expert], weights: [Double]) -> (up: [Float]?, down: [Float]?, gate: [Float]?) {
        precondition(!experts.isEmpty && experts.count == weights.count)
        let w = normalised(weights)
        func avgVec(_ pick: (Expert) -> [Float]?) -> [Float]? {
            guard experts.contains(where: { pick($0) != nil }) else { return nil }
            let n = experts.compactMap(pick).first!.count
            var out = [Float](repeating: 0, count: n)
            for (e, wi) in zip(experts, w) { if let v = pick(e) { for i in 0..<n { out[i] += wi * v[i] } } }
            return out
        }
        return (avgVec { $0.upBias }, avgVec { $0.downBias }, avgVec { $0.gateBias })
    }

    /// The stored experts behind a group's slots, with their summed frequencies (slots of an
    /// already merged layer may share a stored expert). The dominant slot's expert comes first.
    static func storedMembers(_ layer: MoELayer, slots: [Int], dominant: Int, frequency: [Double]) -> [(stored: Int, weight: Double)] {
        var order: [Int] = [layer.storedIndex(slot: dominant)]
        var weight: [Int: Double] = [:]
        for s in slots {
            let g = layer.storedIndex(slot: s)
            if !order.contains(g) { order.append(g) }
            weight[g, default: 0] += frequency[s]
        }
        return order.map { ($0, weight[$0] ?? 0) }
    }

    /// A group's stored experts, aligned to the dominant one, with their usage weights.
    struct PreparedGroup {
        var slots: [Int]
        var dominant: Int
        var stored: [Int]
        var weights: [Double]
        var aligned: [Expert]
        var alignedCosine: Double
    }

    /// Reads group `gi`'s stored experts from `source` and aligns each to the dominant one.
    /// Members are aligned in parallel (one BLAS thread each) when there are several; a single
    /// pair uses BLAS's threads.
    static func prepareGroup(_ source: LayerSource, grouping: LayerGrouping, group gi: Int, frequency: [Double],
                             align: Bool) throws -> PreparedGroup {
        let slots = grouping.groups[gi], dom = grouping.dominant[gi]
        let members = storedMembers(source.header, slots: slots, dominant: dom, frequency: frequency)
        // Read here, one after the other: HDF5 calls are not made from the parallel workers.
        let reference = try source.expert(members[0].stored)
        let others = Originals(try members.dropFirst().map { try source.expert($0.stored) })
        let n = others.experts.count
        // The permutations (and cosines) first; then each member is permuted and its original
        // dropped, so one extra copy of an expert is held at a time.
        let found = try BLAS.perform(n) { k -> (perm: [Int]?, cosine: Double) in
            let ex = others.experts[k]!
            guard align else { return (nil, try Alignment.meanNeuronCosine(reference, ex, Array(0..<source.config.dFF))) }
            let r = try Alignment.alignmentPair(reference: reference, ex)
            return (r.perm, r.cosineAfter)
        }
        var aligned = [reference]
        var cos = 0.0
        for (k, (perm, c)) in found.enumerated() {
            let ex = others.experts[k]!
            others.experts[k] = nil
            aligned.append(try perm.map { try Alignment.permute(ex, $0) } ?? ex)
            cos += c
        }
        return PreparedGroup(slots: slots, dominant: dom, stored: members.map(\.stored), weights: members.map(\.weight),
                             aligned: aligned, alignedCosine: members.count > 1 ? cos / Double(members.count - 1) : 1)
    }

    /// Merges every group of `layer` into one expert after aligning each member to the group's
    /// dominant expert (unless `options.align` is false): by frequency-weighted averaging, or
    /// output-aware (RegMean, RegMean + refit) from calibration `tokens`. The result stores one
    /// expert per group and an `expert_map`; the router is unchanged.
    public static func mergeLayer(_ layer: MoELayer, grouping: LayerGrouping, frequency: [Double],
                                  options: MergeOptions = MergeOptions(), tokens: TokenBlocks? = nil,
                                  progress: ProgressCallback? = nil) throws -> (layer: MoELayer, groups: [MergedGroup]) {
        try mergeLayer(LayerSource(layer), grouping: grouping, frequency: frequency, options: options, tokens: tokens,
                       progress: progress)
    }

    /// `mergeLayer` reading the experts from `source` one group at a time: a group's members are
    /// read, aligned and merged, and only the merged experts stay in memory.
    public static func mergeLayer(_ source: LayerSource, grouping: LayerGrouping, frequency: [Double],
                                  options: MergeOptions = MergeOptions(), tokens: TokenBlocks? = nil,
                                  progress: ProgressCallback? = nil) throws -> (layer: MoELayer, groups: [MergedGroup]) {
        let e = source.config.numExperts
        guard frequency.count == e else { throw SMoEError.layer(source.name, "frequency has \(frequency.count) entries for \(e) slots") }
        guard grouping.slotToGroup.count == e, !grouping.slotToGroup.contains(-1) else {
            throw SMoEError.layer(source.name, "the grouping does not cover the \(e) slots exactly once")
        }
        if options.method != .frequency && tokens == nil {
            throw SMoEError.setting(.mergeMethod, "\(options.method.rawValue) needs calibration tokens ({calibration})")
        }
        var experts: [Expert] = []
        var reports: [MergedGroup] = []
        let n = grouping.groups.count
        for gi in 0..<n {
            let p = try prepareGroup(source, grouping: grouping, group: gi, frequency: frequency, align: options.align)
            switch options.method {
            case .frequency:
                reports.append(MergedGroup(dominant: p.dominant, members: p.slots, frequency: p.slots.map { frequency[$0] },
                                           how: p.stored.count == 1 ? "copied" : (p.weights.reduce(0, +) > 0 ? "weighted" : "mean"),
                                           alignedCosine: p.alignedCosine))
                experts.append(p.stored.count == 1 ? p.aligned[0] : try weightedAverage(p.aligned, weights: p.weights))
            case .regmean, .regmeanRefit:
                let (m, r) = try OutputAwareMerge.mergeGroup(source, p, frequency: frequency, options: options, tokens: tokens!)
                experts.append(m)
                reports.append(r)
            }
            progress?("merging \(source.name)", gi + 1, n)
        }
        var out = source.header
        out.experts = experts
        out.expertEncoding = .float  // new experts: stored in the file's float type (compress --fp8 asks for FP8)
        let map = grouping.slotToGroup
        out.expertMap = experts.count == e && map == Array(0..<e) ? nil : map
        return (out, reports)
    }
}

/// How groups are merged into one expert.
public enum MergeMethod: String, Sendable, CaseIterable {
    /// the paper's usage-frequency-weighted average
    case frequency
    /// RegMean on up/gate (and down, from each member's own activations)
    case regmean
    /// RegMean on up/gate, then down refitted by weighted ridge least squares
    case regmeanRefit = "regmean+refit"
}

public struct MergeOptions: Sendable {
    public var method: MergeMethod = .frequency
    public var align = true
    /// RegMean off-diagonal scale α of each Gram matrix.
    public var alpha = 0.9
    /// RegMean ridge λ, relative to the mean diagonal of the summed Gram.
    public var ridge = 1e-2
    /// Refit ridge, relative to the mean diagonal of the refit's normal matrix.
    public var refitRidge = 0.1
    /// A group needs at least this many routed tokens for an output-aware solve (nil = d_model);
    /// below it the group falls back to the frequency-weighted average, with a warning.
    public var minTokens: Int? = nil

    public init(method: MergeMethod = .frequency, align: Bool = true, alpha: Double = 0.9, ridge: Double = 1e-2,
                refitRidge: Double = 0.1, minTokens: Int? = nil) {
        self.method = method
        self.align = align
        self.alpha = alpha
        self.ridge = ridge
        self.refitRidge = refitRidge
        self.minTokens = minTokens
    }

    public func validate() throws {
        if !(alpha >= 0 && alpha <= 1) { throw SMoEError.setting(.regmeanAlpha, "must be in [0, 1]") }
        if !(ridge >= 0 && ridge.isFinite) { throw SMoEError.setting(.regmeanRidge, "must be a finite number ≥ 0") }
        if !(refitRidge >= 0 && refitRidge.isFinite) { throw SMoEError.setting(.refitRidge, "must be a finite number ≥ 0") }
        if let m = minTokens, m < 1 { throw SMoEError.setting(.regmeanMinTokens, "must be at least 1 (got \(m))") }
    }
}
