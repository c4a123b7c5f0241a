import Foundation
import SMoECompress

/// Merge time per method on a Switch-base-shaped layer: 32 mlp/relu experts of 768 × 3072,
/// top-1, merged into 8 groups (the 8 planted families) with 16k calibration tokens.
/// Options: `--experts N --groups G --d-model D --d-ff F --tokens N` to change the shape.
func mergeBench(_ args: [String]) throws {
    func value(_ name: String, _ def: Int) -> Int {
        guard let i = args.firstIndex(of: name), i + 1 < args.count, let v = Int(args[i + 1]) else { return def }
        return v
    }
    let spec = SyntheticSpec(
        architecture: "bench-switch-base", numLayers: 1, numExperts: value("--experts", 32), families: value("--groups", 8),
        topK: 1, dModel: value("--d-model", 768), dFF: value("--d-ff", 3072), expertType: .mlp, activation: .relu,
        routerType: .softmax_topk, noise: 0.05, tokens: value("--tokens", 16384), seed: 7)
    try spec.validate()
    var t0 = Date()
    let (layer, x, truth) = SyntheticGenerator.makeLayer(spec, index: 0)
    print("layer: \(spec.numExperts) experts of \(spec.dModel)×\(spec.dFF) (mlp, top-1), \(x.rows) tokens, "
          + "\(spec.families) groups; generated in \(String(format: "%.1f", Date().timeIntervalSince(t0))) s")
    // Usage from the layer's own routing; groups = the planted families around their most used slot.
    let routing = layer.route(x)
    var counts = [Double](repeating: 0, count: spec.numExperts)
    for s in routing.slots { counts[s] += 1 }
    let frequency = counts.map { $0 / Double(routing.slots.count) }
    let e = spec.numExperts
    let similarity = (0..<(e * e)).map { truth.family[$0 / e] == truth.family[$0 % e] ? 1.0 : 0.0 }
    let dominant = (0..<spec.families).map { f in
        Grouping.byUsage(frequency).first { truth.family[$0] == f }!
    }
    let grouping = Grouping.assign(dominant: dominant, frequency: frequency, similarity: similarity)
    let blockSize = 4096
    let tokens: TokenBlocks = { body in
        var s = 0
        while s < x.rows { let n = min(blockSize, x.rows - s); try body(x.rowBlock(s, n)); s += n }
    }
    func pad(_ s: String, _ w: Int) -> String { s.padding(toLength: max(w, s.count), withPad: " ", startingAt: 0) }
    print(pad("method", 15) + "seconds  output error (first 4096 tokens)")
    for method in MergeMethod.allCases {
        t0 = Date()
        let (merged, _) = try Merging.mergeLayer(layer, grouping: grouping, frequency: frequency,
                                                 options: MergeOptions(method: method), tokens: tokens)
        let seconds = Date().timeIntervalSince(t0)
        let err = relativeError(merged.forward(x.rowBlock(0, min(4096, x.rows))), layer.forward(x.rowBlock(0, min(4096, x.rows))))
        print(pad(method.rawValue, 15) + pad(String(format: "%7.2f", seconds), 9) + String(format: "%.4f", err))
    }
}
