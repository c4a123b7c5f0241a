import XCTest
@testable import SMoECompress

/// The batched forward pass against a direct per-token loop in Float64.
final class ForwardTests: XCTestCase {
    /// Reference: one token at a time, every product a plain loop.
    func referenceForward(_ layer: MoELayer, _ x: Matrix) -> Matrix {
        let c = layer.config
        var y = Matrix(rows: x.rows, cols: c.dModel)
        for t in 0..<x.rows {
            var z = [Double](repeating: 0, count: c.numExperts)
            for e in 0..<c.numExperts {
                var s = Double(layer.routerBias?[e] ?? 0)
                for j in 0..<c.dModel { s += Double(layer.router[e, j]) * Double(x[t, j]) }
                z[e] = s
            }
            let mx = z.max()!
            let p = z.map { Foundation.exp($0 - mx) }
            let den = p.reduce(0, +)
            // Scores, choice scores (+ selection bias), eligible groups (sum of the two best).
            let score: [Double]
            switch c.routerType {
            case .softmax_topk, .softmax_topk_norm: score = p.map { $0 / den }
            case .sigmoid_topk, .sigmoid_topk_norm: score = z.map { 1 / (1 + Foundation.exp(-$0)) }
            case .topk_softmax, .topk_sigmoid_input: score = z
            }
            let choice = (0..<c.numExperts).map { score[$0] + Double(layer.selectionBias?[$0] ?? 0) }
            let size = c.numExperts / c.numGroups
            let groupScore = (0..<c.numGroups).map { g in choice[(g * size)..<((g + 1) * size)].sorted(by: >).prefix(2).reduce(0, +) }
            let keep = Set((0..<c.numGroups).sorted { groupScore[$0] != groupScore[$1] ? groupScore[$0] > groupScore[$1] : $0 < $1 }
                .prefix(c.topKGroups))
            let order = (0..<c.numExperts).filter { c.numGroups == 1 || keep.contains($0 / size) }
                .sorted { choice[$0] != choice[$1] ? choice[$0] > choice[$1] : $0 < $1 }
            let chosen = Array(order.prefix(c.topK))
            var w = chosen.map { score[$0] }
            if c.routerType == .topk_softmax {
                let m = w.max()!
                w = w.map { Foundation.exp($0 - m) }
            }
            if [.softmax_topk_norm, .sigmoid_topk_norm, .topk_softmax].contains(c.routerType) { let s = w.reduce(0, +); w = w.map { $0 / s } }
            if c.routerType == .topk_sigmoid_input { w = w.map { 1 / (1 + Foundation.exp(-$0)) } }
            w = w.map { $0 * Double(c.routedScalingFactor) }
            // Sum weights per stored expert, run each once; Llama-4's weight scales the input
            // (top-1: one expert per token) and the output is summed with weight 1.
            let inputScale = c.routerType == .topk_sigmoid_input ? w[0] : 1
            var perStored: [Int: Double] = [:]
            for (r, e) in chosen.enumerated() { perStored[layer.storedIndex(slot: e), default: 0] += inputScale == 1 ? w[r] : 1 }
            let xt = (0..<c.dModel).map { Double(x[t, $0]) * inputScale }
            for (g, wg) in perStored {
                let ex = layer.experts[g]
                let up = ex.up.dense(), down = ex.down.dense(), gate = ex.gate?.dense()
                var h = [Double](repeating: 0, count: c.dFF)
                for i in 0..<c.dFF {
                    var u = Double(ex.upBias?[i] ?? 0)
                    for j in 0..<c.dModel { u += Double(up[i, j]) * xt[j] }
                    if let gm = gate {
                        var a = Double(ex.gateBias?[i] ?? 0)
                        for j in 0..<c.dModel { a += Double(gm[i, j]) * xt[j] }
                        // GPT-OSS: up clamped to ±7, plus 1 (the activation clamps the gate).
                        if c.activation == .swiglu_oai { u = min(max(u, -7), 7) + 1 }
                        h[i] = Double(c.activation.apply(Float(a))) * u
                    } else {
                        h[i] = Double(c.activation.apply(Float(u)))
                    }
                }
                for o in 0..<c.dModel {
                    var s = Double(ex.downBias?[o] ?? 0)
                    for i in 0..<c.dFF { s += Double(down[o, i]) * h[i] }
                    y[t, o] += Float(wg * s)
                }
            }
        }
        return y
    }

    func testForwardMatchesPerTokenLoop() {
        var seed: UInt64 = 100
        for type in ExpertType.allCases {
            for router in RouterType.allCases {
                for act in Activation.allCases where !(type == .mlp && act == .swiglu_oai) {
                    for (G, biases) in [(6, false), (3, true)] {
                        seed += 1
                        var rng = SplitMix64(seed: seed)
                        // Input-scaled routing is modelled for top-1 only (LayerConfig.routingProblem).
                        var layer = randomLayer(&rng, type: type, router: router, activation: act, E: 6, G: G,
                                                k: router.scalesExpertInput ? 1 : 2, biases: biases)
                        if biases && type == .glu {
                            for g in layer.experts.indices { layer.experts[g].gateBias = (0..<layer.config.dFF).map { _ in Float(rng.nextGaussian()) } }
                        }
                        if act == .swiglu_oai {  // large enough that the clamps at ±7 act
                            for g in layer.experts.indices { layer.experts[g].up = .dense(randomMatrix(layer.config.dFF, layer.config.dModel, &rng, scale: 3)) }
                        }
                        if router == .sigmoid_topk || router == .sigmoid_topk_norm {
                            // DeepSeek-V3's form: selection bias, 3 groups of 2 with 2 eligible, scaled.
                            layer.selectionBias = (0..<6).map { _ in Float(rng.nextGaussian()) * 0.2 }
                            layer.config.numGroups = biases ? 3 : 1
                            layer.config.topKGroups = biases ? 2 : 1
                            layer.config.routedScalingFactor = 2.5
                        }
                        let x = randomMatrix(40, layer.config.dModel, &rng)
                        let err = relativeError(layer.forward(x), referenceForward(layer, x))
                        XCTAssertLessThan(err, 1e-5, "seed \(seed): \(type) \(router) \(act) G=\(G) biases=\(biases)")
                    }
                }
            }
        }
    }

    /// GPT-OSS's clamped SwiGLU with its gate bias, worked by hand: gate 10 + 0 → min(·, 7) = 7,
    /// up 9 → clamp 7, + 1 = 8: h = 8 · 7 · σ(1.702 · 7); gate −3 + 1 = −2, up −9 → −7 + 1 = −6:
    /// h = −6 · (−2) · σ(−3.404).
    func testClampedSwiGLUKnownAnswer() {
        let e = Expert(up: Matrix([[9], [-9]]), gate: Matrix([[10], [-3]]), down: Matrix([[1, 0], [0, 1]]),
                       upBias: [0, 0], gateBias: [0, 1])
        let h = e.hidden(Matrix([[1]]), activation: .swiglu_oai)
        func sigmoid(_ v: Double) -> Double { 1 / (1 + exp(-v)) }
        XCTAssertEqual(Double(h.data[0]), 8 * 7 * sigmoid(1.702 * 7), accuracy: 1e-5)
        XCTAssertEqual(Double(h.data[1]), -6 * -2 * sigmoid(-3.404), accuracy: 1e-6)
    }

    func testRoutingTiesGoToLowerIndex() {
        let z = Matrix([[1, 3, 3, 0], [2, 2, 2, 2]])
        let r = MoELayer.route(logits: z, k: 2, type: .softmax_topk)
        XCTAssertEqual(r.slots, [1, 2, 0, 1])
        XCTAssertEqual(Double(r.weights[2]), 0.25, accuracy: 1e-7)
        let n = MoELayer.route(logits: z, k: 2, type: .softmax_topk_norm)
        XCTAssertEqual(Double(n.weights[0] + n.weights[1]), 1, accuracy: 1e-6)
    }

    /// A stored expert chosen by two slots of one token runs once with the summed weight:
    /// with every slot mapped to one expert, the layer equals that expert (weights sum to 1).
    func testExpertMapSharedExpertRunsOnceWithSummedWeight() {
        var rng = SplitMix64(seed: 7)
        var layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 4, G: 1, k: 2)
        layer.expertMap = [0, 0, 0, 0]
        let x = randomMatrix(10, layer.config.dModel, &rng)
        let direct = layer.experts[0].forward(x, activation: layer.config.activation)
        XCTAssertLessThan(relativeError(layer.forward(x), direct), 1e-6)
    }

    /// Factored experts are applied as (X·Vᵀ)·Uᵀ + X·Sᵀ and equal the dense forward of U·V + S.
    func testFactoredForwardEqualsDense() {
        var rng = SplitMix64(seed: 9)
        var layer = randomLayer(&rng, type: .mlp, router: .softmax_topk, activation: .gelu, E: 4, k: 1)
        var dense = layer
        for g in 0..<layer.experts.count {
            for name in ["up", "down"] {
                let w = layer.experts[g][matrix: name]!.dense()
                let r = 3
                let u = randomMatrix(w.rows, r, &rng), v = randomMatrix(r, w.cols, &rng)
                let s = CSRMatrix.from(randomMatrix(w.rows, w.cols, &rng)) { i, j in (i * 7 + j) % 5 == 0 }
                let f = LowRankSparse(u: u, v: v, s: s)
                layer.experts[g][matrix: name] = .factored(f)
                dense.experts[g][matrix: name] = .dense(f.dense())
            }
        }
        let x = randomMatrix(30, layer.config.dModel, &rng)
        XCTAssertLessThan(relativeError(layer.forward(x), dense.forward(x)), 1e-5)
        XCTAssertLessThan(relativeError(layer.forward(x), referenceForward(layer, x)), 1e-5)
    }

    /// The trained fixtures' captured outputs are reproduced (FORMAT semantics, float32).
    func testTrainedFixturesReproduceCapturedOutputs() throws {
        for (model, calib) in [("trained-switch.h5", "trained-switch.calib.h5"), ("trained-mixtral.h5", "trained-mixtral.heldout.h5")] {
            let r = try CheckpointReader(fixture(model))
            let c = try CalibrationReader(fixture(calib))
            try c.checkMatches(r)
            for cfg in r.layers {
                let layer = try r.readLayer(cfg.name)
                let x = try c.hiddenStates(cfg.name)
                let routing = layer.route(x)
                let y = layer.forward(x, routing: routing)
                let err = relativeError(y, try c.output(cfg.name))
                XCTAssertLessThan(err, 1e-6, "\(model) \(cfg.name)")
                let captured = MoELayer.route(logits: try c.routerLogits(cfg.name), k: cfg.topK, type: cfg.routerType)
                XCTAssertEqual(routing.slots, captured.slots, "\(model) \(cfg.name): top-k sets differ")
            }
        }
    }
}
