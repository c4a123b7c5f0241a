/// What the expert refit under the compact routing did to one layer (ALGORITHM.md §3a).
public struct CompactRefitReport: Sendable, Equatable {
    /// Calibration tokens the compact router sends to each expert (the rows of its refit).
    public var tokens: [Int]
    /// ‖y′ − y‖_F / ‖y‖_F of the compact layer against the original layer on the calibration
    /// tokens, before and after the refit.
    public var before: Double
    public var after: Double
    /// Solver remarks (a least-squares fallback for an ill-conditioned system).
    public var notes: [String] = []

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [("tokens", JSONValue(tokens)), ("calibration_error_before", .double(before)),
                                         ("calibration_error_after", .double(after))]
        if !notes.isEmpty { kv.append(("notes", JSONValue(notes))) }
        return .object(kv)
    }
}

/// Refits the experts of a compact layer to the original layer's output under the compact
/// routing: expert by expert (each with the others as they stand, the earlier ones already
/// refitted), `down` and its bias by weighted ridge least squares (`RefitStats`, as the refit of
/// regmean+refit) so that the compact layer's output on the calibration tokens it routes to the
/// expert reproduces the original layer's. Each step minimises the layer's squared output error
/// on the calibration tokens plus the ridge term over that expert's down, so the calibration
/// error does not rise.
public enum CompactRefit {
    /// `compact`: the layer after the router fit; `original`: the layer before merging;
    /// `slotGroups`: original slot → compact expert (to measure the routing on the way);
    /// `ridge` relative to the mean diagonal of each normal matrix.
    public static func refit(_ compact: MoELayer, original: MoELayer, slotGroups: [Int], tokens: TokenBlocks, ridge: Double,
                             progress: ProgressCallback? = nil) throws -> (layer: MoELayer, report: CompactRefitReport) {
        try refit(compact, original: LayerSource(original), slotGroups: slotGroups, tokens: tokens, ridge: ridge, progress: progress)
    }

    /// `refit` with the original layer's experts read from `original` (for each token block).
    public static func refit(_ compact: MoELayer, original: LayerSource, slotGroups: [Int], tokens: TokenBlocks, ridge: Double,
                             progress: ProgressCallback? = nil) throws -> (layer: MoELayer, report: CompactRefitReport) {
        let c = compact.config
        let hasBias = compact.experts.contains { $0.downBias != nil }
        let g = compact.numStored
        var layer = compact
        var counts = [Int](repeating: 0, count: g)
        var notes: [String] = []
        let before = try error(layer, original: original, slotGroups: slotGroups, tokens: tokens)
        for e in 0..<g {
            progress?("refitting the experts of \(c.name)", e, g)
            var stats = OutputAwareMerge.RefitStats(features: c.dFF, outputs: c.dModel, bias: hasBias)
            try tokens { x in
                let routing = layer.route(x)
                let disp = layer.dispatch(routing)[e]
                guard !disp.tokens.isEmpty else { return }
                let xs = x.gatherRows(disp.tokens)
                let y = try original.forward(xs, routing: original.route(xs))
                let current = layer.forward(xs, routing: routing.rows(disp.tokens))
                let h = layer.experts[e].hidden(xs, activation: c.activation)
                let own = layer.experts[e].forward(xs, activation: c.activation)
                // With routing weight w, the expert's part of the output should be the residual
                // r = y − (y′ − w·E(x)): minimise Σ w² ‖E(x) − r/w‖², i.e. A = Σ w² h hᵀ, B = Σ h (w r)ᵀ.
                var target = Matrix(rows: xs.rows, cols: c.dModel)
                var s = [Float](repeating: 0, count: xs.rows)
                for (t, w) in disp.weights.enumerated() {
                    s[t] = w * w
                    for j in 0..<c.dModel {
                        let i = t * c.dModel + j
                        target.data[i] = w * (y.data[i] - current.data[i] + w * own.data[i])
                    }
                }
                stats.add(hidden: h, target: target, weights: s, bias: hasBias)
            }
            counts[e] = stats.tokens
            guard stats.tokens > 0 else { continue }  // an expert no token reaches keeps its weights
            let (method, estimate) = try stats.solve(into: &layer.experts[e], bias: hasBias, ridge: ridge)
            if method != .cholesky { notes.append(OutputAwareMerge.solverNote("refit of expert \(e)", method, estimate)) }
        }
        let after = try error(layer, original: original, slotGroups: slotGroups, tokens: tokens)
        return (layer, CompactRefitReport(tokens: counts, before: before, after: after, notes: notes))
    }

    /// The compact layer's relative output error against the original on `tokens`.
    static func error(_ layer: MoELayer, original: LayerSource, slotGroups: [Int], tokens: TokenBlocks) throws -> Double {
        var acc = try EvaluationAccumulator(original: original, compressed: layer, slotGroups: slotGroups)
        try tokens { try acc.add($0) }
        return acc.result(bytesBefore: 0, bytesAfter: 0).relativeError
    }
}

extension Routing {
    /// The routing of some of the block's tokens, in the order given.
    func rows(_ tokens: [Int]) -> Routing {
        Routing(logits: logits.gatherRows(tokens), slots: tokens.flatMap { slots[($0 * k)..<(($0 + 1) * k)] },
                weights: tokens.flatMap { weights[($0 * k)..<(($0 + 1) * k)] }, k: k)
    }
}
