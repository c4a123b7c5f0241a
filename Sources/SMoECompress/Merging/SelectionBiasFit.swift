import Foundation

/// How the compact router fit chose a compact layer's selection bias (the per-expert bias added
/// to the scores for choosing only; ALGORITHM.md §3a): three candidates, the one of least
/// output error against the merged slot layer on the calibration tokens kept.
public struct SelectionBiasFit: Sendable, Equatable {
    public enum Rule: String, Sendable, CaseIterable {
        /// The bias of each group's start slot (its most used).
        case start
        /// The mean of the group's slot biases.
        case mean
        /// Started from `start`, moved by the sign update of DeepSeek-V3's auxiliary-loss-free
        /// balancing until each compact expert's selection frequency matches its group's.
        case frequency
    }
    public var rule: Rule
    /// ‖y′ − y‖_F / ‖y‖_F of the compact layer (its fitted rows, the merged experts) against the
    /// merged slot layer on the calibration tokens, per candidate in `Rule` order.
    public var errors: [Double]
    /// Σ_g |f_g − c_g| / k per candidate: f_g the fraction of tokens × k on which the slot layer
    /// chooses a slot of group g, c_g the compact layer's (0: the same loads; at most 2).
    public var mismatch: [Double]
    /// Passes of the frequency matching.
    public var passes: Int

    public var json: JSONValue {
        .object([("rule", .string(rule.rawValue)), ("candidates", JSONValue(Rule.allCases.map(\.rawValue))),
                 ("calibration_errors", JSONValue(errors)), ("frequency_mismatch", JSONValue(mismatch)), ("passes", .int(passes))])
    }

    /// The bias of `compact` (fitted rows, no bias yet) for the merged `slotLayer` whose slot
    /// groups are `groups` (start slots `start`), and how it was chosen. Deterministic.
    static func fit(compact: MoELayer, slotLayer: MoELayer, groups: [[Int]], start: [Int],
                    tokens: TokenBlocks) throws -> (bias: [Float], report: SelectionBiasFit) {
        let slotBias = slotLayer.selectionBias ?? [Float](repeating: 0, count: slotLayer.config.numExperts)
        let g = groups.count, k = compact.config.topK
        var slotGroup = [Int](repeating: 0, count: slotLayer.config.numExperts)
        for (j, slots) in groups.enumerated() { for s in slots { slotGroup[s] = j } }
        var xs: [Matrix] = [], ys: [Matrix] = [], zs: [Matrix] = []
        var target = [Double](repeating: 0, count: g)
        var n = 0
        try tokens { x in
            let r = slotLayer.route(x)
            for s in r.slots { target[slotGroup[s]] += 1 }
            ys.append(slotLayer.forward(x, routing: r))
            xs.append(x)
            zs.append(compact.logits(x))
            n += x.rows
        }
        guard n > 0 else { throw SMoEError.layer(compact.name, "the selection bias fit has no calibration tokens") }
        target = target.map { $0 / Double(n) }
        func frequency(_ b: [Float]) -> [Double] {
            var c = [Double](repeating: 0, count: g)
            for z in zs { for s in MoELayer.route(logits: z, config: compact.config, selectionBias: b).slots { c[s] += 1 } }
            return c.map { $0 / Double(n) }
        }
        func mismatch(_ b: [Float]) -> Double { zip(target, frequency(b)).reduce(0) { $0 + abs($1.0 - $1.1) } / Double(k) }
        let startBias = start.map { slotBias[$0] }
        let meanBias = groups.map { s in Float(s.reduce(0.0) { $0 + Double(slotBias[$1]) } / Double(s.count)) }
        // Step: a quarter of the mean spread (largest − smallest) of the compact scores.
        var spread = 0.0
        for z in zs {
            for t in 0..<z.rows {
                let v = (0..<g).map { Double(z[t, $0]) }
                let s: [Double]
                switch compact.config.routerType.scoring {
                case "sigmoid": s = v.map { 1 / (1 + Foundation.exp(-$0)) }
                case "softmax":
                    let mx = v.max()!, e = v.map { Foundation.exp($0 - mx) }, sum = e.reduce(0, +)
                    s = e.map { $0 / sum }
                default: s = v
                }
                spread += s.max()! - s.min()!
            }
        }
        let u0 = max(0.25 * spread / Double(n), 1e-6)
        var u = u0, b = startBias, best = (bias: startBias, m: Double.infinity), stall = 0, passes = 0
        while passes < 200 {
            passes += 1
            let f = frequency(b)
            let m = zip(target, f).reduce(0) { $0 + abs($1.0 - $1.1) } / Double(k)
            if m < best.m { best = (b, m); stall = 0 } else { stall += 1 }
            if m == 0 || u < 1e-4 * u0 { break }
            if stall >= 5 { u /= 2; stall = 0; b = best.bias; continue }
            for j in 0..<g where target[j] != f[j] { b[j] += Float(target[j] > f[j] ? u : -u) }
        }
        let candidates = [startBias, meanBias, best.bias]
        var errors: [Double] = []
        for c in candidates {
            var layer = compact
            layer.selectionBias = c
            var errSq = 0.0, refSq = 0.0
            for (x, y) in zip(xs, ys) {
                let y1 = layer.forward(x)
                for i in y.data.indices {
                    let a = Double(y.data[i]), d = Double(y1.data[i]) - a
                    errSq += d * d; refSq += a * a
                }
            }
            errors.append(refSq > 0 ? (errSq / refSq).squareRoot() : (errSq > 0 ? .infinity : 0))
        }
        let chosen = errors.indices.min { errors[$0] < errors[$1] || (errors[$0] == errors[$1] && $0 < $1) }!
        return (candidates[chosen], SelectionBiasFit(rule: Rule.allCases[chosen], errors: errors,
                                                     mismatch: candidates.map(mismatch), passes: passes))
    }
}
