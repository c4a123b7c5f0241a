import Foundation
import XCTest
@testable import SMoECompress

/// The routing forms of issue 24 with answers worked out by hand (docs/FORMAT.md §1, "Routing"):
/// sigmoid scores, a selection-only bias, grouped top-k, routed scaling, renormalisation,
/// top-k-then-softmax, ties to the lower index; and their storage in the checkpoint.
final class RoutingTests: XCTestCase {
    func sigmoid(_ x: Float) -> Float { 1 / (1 + expf(-x)) }

    /// E = 8 in 4 groups of 2. Scores s = σ(z), choice c = s + b:
    /// c = [.881, .269, .622, .599, −1.047, .047, .850, .750]; group scores (sum of the two best)
    /// 1.150, 1.221, −1.000, 1.600 → groups 3 and 1 are eligible, so expert 0 (second-best c) is
    /// out; expert 4 (best s) is out by its bias. Top-2 of the eligible c: 6, 7, weighted by their
    /// unbiased σ(0.2), σ(−0.2) (sum 1), times 2.5.
    func testGroupedSigmoidWithSelectionBiasAndScaling() {
        let z = Matrix([[2, -1, 0.5, 0.4, 3, -3, 0.2, -0.2]])
        let bias: [Float] = [0, 0, 0, 0, -2, 0, 0.3, 0.3]
        var c = LayerConfig(name: "l", index: 0, numExperts: 8, topK: 2, dModel: 1, dFF: 1, expertType: .glu, activation: .silu,
                            routerType: .sigmoid_topk_norm, numGroups: 4, topKGroups: 2, routedScalingFactor: 2.5)
        XCTAssertNil(c.routingProblem)
        var r = MoELayer.route(logits: z, config: c, selectionBias: bias)
        XCTAssertEqual(r.slots, [6, 7])
        XCTAssertEqual(Double(r.weights[0]), 2.5 * Double(sigmoid(0.2)), accuracy: 1e-6)
        XCTAssertEqual(Double(r.weights[1]), 2.5 * Double(sigmoid(-0.2)), accuracy: 1e-6)
        // Without normalisation the weights are the same here (σ(a) + σ(−a) = 1), unscaled:
        c.routerType = .sigmoid_topk
        c.routedScalingFactor = 1
        r = MoELayer.route(logits: z, config: c, selectionBias: bias)
        XCTAssertEqual(r.slots, [6, 7])
        XCTAssertEqual(r.weights, [sigmoid(0.2), sigmoid(-0.2)])
        // Without groups, experts 0 and 6 (the two largest c); sigmoid_topk keeps σ(2), σ(0.2).
        c.numGroups = 1
        c.topKGroups = 1
        r = MoELayer.route(logits: z, config: c, selectionBias: bias)
        XCTAssertEqual(r.slots, [0, 6])
        XCTAssertEqual(r.weights, [sigmoid(2), sigmoid(0.2)])
        // ... and renormalised: divided by their sum.
        c.routerType = .sigmoid_topk_norm
        r = MoELayer.route(logits: z, config: c, selectionBias: bias)
        XCTAssertEqual(Double(r.weights[0]), Double(sigmoid(2) / (sigmoid(2) + sigmoid(0.2))), accuracy: 1e-7)
        // Without the bias, expert 4 (σ(3)) leads.
        r = MoELayer.route(logits: z, config: c, selectionBias: nil)
        XCTAssertEqual(r.slots, [4, 0])
    }

    /// A softmax router with a selection bias (ERNIE-4.5's form): the bias moves the choice, the
    /// weights stay the probabilities.
    func testSoftmaxWithSelectionBiasChoosesByBiasedProbability() {
        let z = Matrix([[0, 1, 2, 0]])
        let c = LayerConfig(name: "l", index: 0, numExperts: 4, topK: 1, dModel: 1, dFF: 1, expertType: .glu, activation: .silu,
                            routerType: .softmax_topk)
        let p = [0, 1, 2, 0].map { expf($0) / (2 + expf(1) + expf(2)) }
        let r = MoELayer.route(logits: z, config: c, selectionBias: [0, 0.5, 0, 0])
        XCTAssertEqual(r.slots, [1])  // p1 + 0.5 = 0.74 > p2 = 0.64
        XCTAssertEqual(Double(r.weights[0]), Double(p[1]), accuracy: 1e-7)
    }

    /// GPT-OSS: the top-k logits, weighted by the softmax over those k only.
    func testTopKThenSoftmax() {
        let z = Matrix([[1, 3, 2, 0], [5, 5, 5, 5]])
        let c = LayerConfig(name: "l", index: 0, numExperts: 4, topK: 2, dModel: 1, dFF: 1, expertType: .glu, activation: .silu,
                            routerType: .topk_softmax)
        let r = MoELayer.route(logits: z, config: c, selectionBias: nil)
        XCTAssertEqual(r.slots, [1, 2, 0, 1])  // ties: lower index first
        XCTAssertEqual(Double(r.weights[0]), exp(1) / (exp(1) + 1), accuracy: 1e-6)
        XCTAssertEqual(Double(r.weights[1]), 1 / (exp(1) + 1), accuracy: 1e-6)
        XCTAssertEqual(r.weights[2], 0.5)
        XCTAssertEqual(r.weights[3], 0.5)
    }

    /// Ties go to the lower index, for groups and for experts (torch.topk on CPU does not
    /// promise this: topk([1, 2, 2, 0, 2], 2) gives indices 2 and 4 there).
    /// Llama-4: the top-1 logit's σ scales the expert INPUT. One expert, d = 1: up 1, gate 1,
    /// down 1, silu: expert(v) = v · silu(v). z = [0.5, 2, −1] → slot 1, w = σ(2); for x = 3 the
    /// output is expert(3 σ(2)), not σ(2) · expert(3). Top-2 is refused naming the key.
    func testTopKSigmoidScalesTheExpertInput() {
        let c = LayerConfig(name: "l", index: 0, numExperts: 3, topK: 1, dModel: 1, dFF: 1, expertType: .glu, activation: .silu,
                            routerType: .topk_sigmoid_input)
        XCTAssertNil(c.routingProblem)
        let r = MoELayer.route(logits: Matrix([[0.5, 2, -1]]), config: c, selectionBias: nil)
        XCTAssertEqual(r.slots, [1])
        XCTAssertEqual(r.weights, [sigmoid(2)])
        let one = Expert(up: Matrix([[1]]), gate: Matrix([[1]]), down: Matrix([[1]]))
        let zero = Expert(up: Matrix([[0]]), gate: Matrix([[0]]), down: Matrix([[0]]))
        // Router rows make the logits z = W x for x = 3: [0.5, 2, −1] / 3.
        let layer = MoELayer(config: c, router: Matrix([[0.5 / 3], [2.0 / 3], [-1.0 / 3]]), experts: [zero, one, zero])
        let v = Double(3 * sigmoid(2))
        let want = v * v / (1 + exp(-v))
        XCTAssertEqual(Double(layer.forward(Matrix([[3]]))[0, 0]), want, accuracy: 1e-5)
        let outputScaled = Double(sigmoid(2)) * 9 / (1 + exp(-3.0))
        XCTAssertGreaterThan(abs(want - outputScaled), 0.1)
        var two = c
        two.topK = 2
        XCTAssertEqual(two.routingProblem, "num_experts_per_tok 2: routing that scales the expert input (topk_sigmoid_input) is modelled for top-1 only")
    }

    func testTiesGoToTheLowerIndexForGroupsAndExperts() {
        let z = Matrix([[0, 0, 0, 0, 0, 0, 0, 0]])
        let c = LayerConfig(name: "l", index: 0, numExperts: 8, topK: 3, dModel: 1, dFF: 1, expertType: .glu, activation: .silu,
                            routerType: .sigmoid_topk_norm, numGroups: 4, topKGroups: 2)
        let r = MoELayer.route(logits: z, config: c, selectionBias: nil)
        XCTAssertEqual(r.slots, [0, 1, 2])
        for w in r.weights { XCTAssertEqual(Double(w), 1.0 / 3, accuracy: 1e-7) }
    }

    /// The plain softmax routing goes through the original code (goldens unchanged); a scaling
    /// factor multiplies its weights.
    func testPlainSoftmaxIsTheOriginalRoutingTimesTheScale() {
        var rng = SplitMix64(seed: 3)
        let z = randomMatrix(20, 6, &rng)
        for type in [RouterType.softmax_topk, .softmax_topk_norm] {
            var c = LayerConfig(name: "l", index: 0, numExperts: 6, topK: 2, dModel: 1, dFF: 1, expertType: .glu, activation: .silu,
                                routerType: type)
            let old = MoELayer.route(logits: z, k: 2, type: type)
            let new = MoELayer.route(logits: z, config: c, selectionBias: nil)
            XCTAssertEqual(old.slots, new.slots)
            XCTAssertEqual(old.weights, new.weights)
            c.routedScalingFactor = 2
            XCTAssertEqual(MoELayer.route(logits: z, config: c, selectionBias: nil).weights, old.weights.map { $0 * 2 })
        }
    }

    /// Pruning keeps the kept slots' selection biases (the pruned router chooses among them as the
    /// original did) and refuses a grouped router, whose groups dropping slots would break.
    func testPruningKeepsTheKeptSlotsSelectionBiasAndRefusesGroups() throws {
        var rng = SplitMix64(seed: 12)
        var layer = randomLayer(&rng, type: .glu, router: .sigmoid_topk_norm, E: 8, k: 2)
        layer.selectionBias = (0..<8).map { Float($0) }
        let pruned = try Pruning.pruned(LayerSource(layer), kept: [1, 4, 6])
        XCTAssertEqual(pruned.selectionBias, [1, 4, 6])
        XCTAssertEqual(pruned.config.numExperts, 3)
        layer.config.numGroups = 4
        layer.config.topKGroups = 2
        XCTAssertThrowsError(try Pruning.pruned(LayerSource(layer), kept: [1, 4, 6])) { e in
            XCTAssertTrue("\(e)".contains("expert groups"), "\(e)")
        }
    }

    func testRoutingProblemsAreNamed() {
        func problem(_ e: Int, _ k: Int, _ g: Int, _ tg: Int, _ type: RouterType = .sigmoid_topk) -> String? {
            LayerConfig(name: "l", index: 0, numExperts: e, topK: k, dModel: 1, dFF: 1, expertType: .glu, activation: .silu,
                        routerType: type, numGroups: g, topKGroups: tg).routingProblem
        }
        XCTAssertNil(problem(64, 8, 8, 4))
        XCTAssertTrue(problem(64, 8, 8, 9)?.contains("topk_group") == true)
        XCTAssertTrue(problem(60, 8, 8, 4)?.contains("does not divide") == true)
        XCTAssertTrue(problem(8, 2, 8, 4)?.contains("fewer than 2") == true)
        XCTAssertTrue(problem(16, 8, 8, 2)?.contains("exceeds") == true)
        XCTAssertTrue(problem(16, 2, 8, 2, .topk_softmax)?.contains("no expert groups") == true)
    }

    /// The new settings round-trip through a checkpoint (selection bias in float32 even in an
    /// f16 file); a plain layer is written as before, without the new attributes or dataset.
    func testCheckpointStoresTheRoutingSettings() throws {
        let dir = temporaryDirectory(self)
        var rng = SplitMix64(seed: 9)
        var layer = randomLayer(&rng, type: .glu, router: .sigmoid_topk_norm, E: 8, k: 2)
        layer.config.numGroups = 4
        layer.config.topKGroups = 2
        layer.config.routedScalingFactor = 2.5
        layer.selectionBias = (0..<8).map { Float($0) * 0.0123456789 }
        var plain = randomLayer(&rng, type: .glu, router: .softmax_topk, E: 8, k: 2)
        plain.config.name = "layers.1.moe"
        plain.config.index = 1
        let w = try CheckpointWriter(destination: dir + "/m.h5", architecture: "test", history: [], entry: ["stage": "t"],
                                     options: WriteOptions(dtype: .f16))
        try w.write(layer)
        try w.write(plain)
        try w.commit()
        let r = try CheckpointReader(dir + "/m.h5")
        let back = try r.readLayer(layer.name)
        XCTAssertEqual(back.config, layer.config)
        XCTAssertEqual(back.selectionBias, layer.selectionBias)
        let x = randomMatrix(30, layer.config.dModel, &rng)
        XCTAssertEqual(back.route(x).slots, layer.roundedForStorage(.f16).route(x).slots)
        let g = try r.file.root.openGroup("moe_layers/\(plain.name)")
        for a in ["n_group", "topk_group", "routed_scaling_factor"] { XCTAssertFalse(g.hasAttribute(a), a) }
        XCTAssertFalse(g.isDataset("router/selection_bias"))
        XCTAssertNil(try r.readLayer(plain.name).selectionBias)
    }
}
