/// What the refits of the experts' `down` aim at (ALGORITHM.md §3d).
public enum RefitTargets: String, Sendable, CaseIterable {
    /// The original layer's output on the calibration inputs.
    case layer
    /// The `output` stored in the calibration capture: with a capture whose inputs come from the
    /// already-compressed layers before (`capture_calibration.py --reference`), the original
    /// model's own output for the same tokens, so the refit also undoes upstream drift.
    case capture
}

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
    /// With `targets` (token blocks paired with the outputs to reproduce, e.g. a capture's
    /// `output` of the original model, taken on the original model's own inputs for the same
    /// tokens: sequential calibration), those outputs replace the original layer's on `x`, and
    /// the reported errors are measured against them; `tokens` is then unused. `slotGroups` may
    /// be nil for a layer that keeps the original's router slots.
    public static func refit(_ compact: MoELayer, original: LayerSource, slotGroups: [Int]?, tokens: TokenBlocks,
                             targets: TargetBlocks? = nil, ridge: Double,
                             progress: ProgressCallback? = nil) throws -> (layer: MoELayer, report: CompactRefitReport) {
        // Token blocks with the outputs to reproduce (nil: the original layer's, computed below
        // for the tokens each expert receives).
        func pairs(_ body: (Matrix, Matrix) throws -> Void) throws {
            if let targets { return try targets(body) }
            try withoutActuallyEscaping(body) { body in try tokens { x in try body(x, Matrix(rows: 0, cols: 0)) } }
        }
        func error(_ layer: MoELayer) throws -> Double {
            if targets == nil { return try CompactRefit.error(layer, original: original, slotGroups: slotGroups, tokens: tokens) }
            var errSq = 0.0, refSq = 0.0
            try pairs { x, y in
                let y1 = layer.forward(x)
                for i in 0..<y.data.count {
                    let a = Double(y.data[i]), b = Double(y1.data[i])
                    errSq += (b - a) * (b - a); refSq += a * a
                }
            }
            return refSq > 0 ? (errSq / refSq).squareRoot() : (errSq > 0 ? .infinity : 0)
        }
        let c = compact.config
        let hasBias = compact.experts.contains { $0.downBias != nil }
        let g = compact.numStored
        var layer = compact
        var counts = [Int](repeating: 0, count: g)
        var notes: [String] = []
        let before = try error(layer)
        for e in 0..<g {
            progress?("refitting the experts of \(c.name)", e, g)
            var stats = OutputAwareMerge.RefitStats(features: c.dFF, outputs: c.dModel, bias: hasBias)
            try pairs { x, yAll in
                let routing = layer.route(x)
                let disp = layer.dispatch(routing)[e]
                guard !disp.tokens.isEmpty else { return }
                let xs = x.gatherRows(disp.tokens)
                let y = targets == nil ? try original.forward(xs, routing: original.route(xs)) : yAll.gatherRows(disp.tokens)
                let current = layer.forward(xs, routing: routing.rows(disp.tokens))
                // What the expert runs on and its output weights (scaled rows and weight 1 where
                // the routing weight scales the input; else xs and the routing weights).
                let (xe, weights) = MoELayer.expertInput(x, disp, config: c)
                let h = layer.experts[e].hidden(xe, activation: c.activation)
                let own = layer.experts[e].forward(xe, activation: c.activation)
                // With routing weight w, the expert's part of the output should be the residual
                // r = y − (y′ − w·E(x)): minimise Σ w² ‖E(x) − r/w‖², i.e. A = Σ w² h hᵀ, B = Σ h (w r)ᵀ.
                var target = Matrix(rows: xs.rows, cols: c.dModel)
                var s = [Float](repeating: 0, count: xs.rows)
                for (t, w) in weights.enumerated() {
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
        let after = try error(layer)
        return (layer, CompactRefitReport(tokens: counts, before: before, after: after, notes: notes))
    }

    /// The compact layer's relative output error against the original on `tokens`.
    static func error(_ layer: MoELayer, original: LayerSource, slotGroups: [Int]?, tokens: TokenBlocks) throws -> Double {
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
