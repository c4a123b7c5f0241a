/// How `merge --prune` ranks a layer's experts (ALGORITHM.md §3c).
public enum PruneMethod: String, Sendable, CaseIterable {
    /// REAP (router-weighted expert activation pruning): the mean, over the calibration tokens
    /// routed to the expert, of its routing weight times the norm of its output.
    case reap
    /// The summed routing weight of the expert over the calibration tokens.
    case frequency
}

/// What pruning did to one layer.
public struct PruneReport: Sendable {
    public var method: PruneMethod
    /// Every original slot's saliency, in slot order.
    public var saliency: [Double]
    /// Calibration tokens routed to each original slot.
    public var tokens: [Int]
    /// The kept slots, ascending: kept slot `kept[g]` is expert g of the pruned layer.
    public var kept: [Int]
    /// The refit of the kept experts under the pruned routing (`MergeSettings.compactRefit`).
    public var refit: CompactRefitReport? = nil

    /// The slots the pruning dropped, ascending.
    public var dropped: [Int] { saliency.indices.filter { !kept.contains($0) } }

    /// Original slot → expert of the pruned layer, −1 for a dropped slot.
    public var slotToExpert: [Int] {
        var m = [Int](repeating: -1, count: saliency.count)
        for (g, s) in kept.enumerated() { m[s] = g }
        return m
    }

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [("method", .string(method.rawValue)), ("saliency", JSONValue(saliency)),
                                         ("routed_tokens", JSONValue(tokens)), ("kept", JSONValue(kept)),
                                         ("dropped", JSONValue(dropped))]
        if let r = refit { kv.append(("expert_refit", r.json)) }
        return .object(kv)
    }
}

/// Expert pruning (ALGORITHM.md §3c): keep the G experts of a layer with the highest saliency on
/// the calibration tokens, with their router rows unchanged, and drop the others. The result is a
/// standard MoE layer of G router rows and G experts (no `expert_map`).
public enum Pruning {
    /// Every slot's saliency on `tokens` under the layer's own routing, and the routed-token
    /// counts. REAP reads the experts one at a time (the calibration blocks once per expert);
    /// frequency needs the router only. The layer must have one stored expert per slot.
    public static func saliency(_ source: LayerSource, method: PruneMethod, tokens: TokenBlocks,
                                progress: ProgressCallback? = nil) throws -> (saliency: [Double], tokens: [Int]) {
        let e = source.config.numExperts
        guard source.header.expertMap == nil, source.numStored == e else {
            throw SMoEError("\(source.name): pruning needs one stored expert per router slot, but this layer maps \(e) slots onto \(source.numStored) merged experts")
        }
        var weightSum = [Double](repeating: 0, count: e)
        var counts = [Int](repeating: 0, count: e)
        try tokens { x in
            for (j, d) in source.header.dispatch(source.route(x), stored: e).enumerated() {
                counts[j] += d.tokens.count
                for w in d.weights { weightSum[j] += Double(w) }
            }
        }
        guard method == .reap else { return (weightSum, counts) }
        var saliency = [Double](repeating: 0, count: e)
        for j in 0..<e where counts[j] > 0 {
            progress?("saliency of \(source.name)", j, e)
            let expert = try source.expert(j)
            var sum = 0.0
            // One stored expert per slot (checked above), so the layer's dispatch is over the e slots.
            try MoELayer.forEachRoutedInput(source, expert: expert, stored: j, tokens: tokens, hidden: false) { rows, weights in
                let y = expert.forward(rows, activation: source.config.activation)
                for (t, w) in weights.enumerated() {
                    var sq = 0.0
                    for v in y.data[(t * y.cols)..<((t + 1) * y.cols)] { sq += Double(v) * Double(v) }
                    sum += Double(w) * sq.squareRoot()
                }
            }
            saliency[j] = sum / Double(counts[j])
        }
        return (saliency, counts)
    }

    /// The `groups` slots of largest saliency, ascending (ties to the lower index).
    public static func keep(_ saliency: [Double], groups: Int) -> [Int] {
        precondition(groups >= 1 && groups <= saliency.count)
        let order = saliency.indices.sorted { saliency[$0] > saliency[$1] || (saliency[$0] == saliency[$1] && $0 < $1) }
        return order.prefix(groups).sorted()
    }

    /// The layer with only the `kept` slots: their router rows and bias entries unchanged, their
    /// experts read from `source`.
    public static func pruned(_ source: LayerSource, kept: [Int]) throws -> MoELayer {
        var out = source.header
        out.expertEncoding = .float  // as every stage's output (the refit changes the experts)
        let d = source.config.dModel
        out.router = Matrix(rows: kept.count, cols: d, data: kept.flatMap { s in source.header.router.data[(s * d)..<((s + 1) * d)] })
        out.routerBias = source.header.routerBias.map { b in kept.map { b[$0] } }
        // The kept slots' selection biases too; expert groups would not survive dropping slots.
        guard source.config.numGroups == 1 else {
            throw SMoEError("\(source.name): pruning drops router slots, which breaks the layer's \(source.config.numGroups) expert groups")
        }
        out.selectionBias = source.header.selectionBias.map { b in kept.map { b[$0] } }
        out.experts = try kept.map { try source.expert($0) }
        out.expertMap = nil
        out.config.numExperts = kept.count
        return out
    }
}
