import XCTest
@testable import SMoECompress

final class EvaluationTests: XCTestCase {
    /// Two slots, top-1, one-neuron relu experts on d_model 2: expert 0 passes x₀ to y₀,
    /// expert 1 passes x₁ to y₁. Token (2, 0) goes to slot 0, token (0, 2) to slot 1, each
    /// with router weight p = e²/(e² + 1), so y = (2p, 0) and (0, 2p).
    private func handLayer(expert1Down: [Float], swapRouter: Bool = false) -> MoELayer {
        let config = LayerConfig(name: "l", index: 0, numExperts: 2, topK: 1, dModel: 2, dFF: 1,
                                 expertType: .mlp, activation: .relu, routerType: .softmax_topk)
        let e0 = Expert(up: Matrix(rows: 1, cols: 2, data: [1, 0]), down: Matrix(rows: 2, cols: 1, data: [1, 0]))
        let e1 = Expert(up: Matrix(rows: 1, cols: 2, data: [0, 1]), down: Matrix(rows: 2, cols: 1, data: expert1Down))
        let router = Matrix(rows: 2, cols: 2, data: swapRouter ? [0, 1, 1, 0] : [1, 0, 0, 1])
        return MoELayer(config: config, router: router, experts: [e0, e1])
    }

    private let tokens = Matrix(rows: 2, cols: 2, data: [2, 0, 0, 2])

    func testFiguresAgainstHandComputedCases() throws {
        let original = handLayer(expert1Down: [0, 1])
        // Expert 1 halved: error (0, p) on token 2; ‖y‖² = 8p² → relative error 1/(2√2); outputs parallel.
        var acc = try EvaluationAccumulator(original: original, compressed: handLayer(expert1Down: [0, 0.5]))
        try acc.add(tokens)
        var r = acc.result(bytesBefore: 100, bytesAfter: 50)
        XCTAssertEqual(r.relativeError, 1 / (2 * 2.0.squareRoot()), accuracy: 1e-6)
        XCTAssertEqual(r.meanCosine, 1, accuracy: 1e-12)
        XCTAssertEqual(r.routingAgreement, 1)
        XCTAssertEqual(r.tokens, 2)
        XCTAssertEqual(r.parametersBefore, 8)
        XCTAssertEqual(r.flopsBefore, 8)  // two 1×2 matrices per slot, k = 1: 4 multiply–adds = 8 FLOPs
        // Expert 1 writes to the wrong coordinate: y′ = (2p, 0) for token 2, orthogonal to y:
        // error² = 8p² = ‖y‖², cosines 1 and 0.
        acc = try EvaluationAccumulator(original: original, compressed: handLayer(expert1Down: [1, 0]))
        try acc.add(tokens)
        r = acc.result(bytesBefore: 0, bytesAfter: 0)
        XCTAssertEqual(r.relativeError, 1, accuracy: 1e-6)
        XCTAssertEqual(r.meanCosine, 0.5, accuracy: 1e-6)
        // A swapped router sends each token to the other slot: no routing agreement, y′ = 0.
        acc = try EvaluationAccumulator(original: original, compressed: handLayer(expert1Down: [0, 1], swapRouter: true))
        try acc.add(tokens)
        r = acc.result(bytesBefore: 0, bytesAfter: 0)
        XCTAssertEqual(r.routingAgreement, 0)
        XCTAssertEqual(r.routingOverlap, 0)
        XCTAssertEqual(r.relativeError, 1, accuracy: 1e-6)
        XCTAssertEqual(r.meanCosine, 0)
    }

    func testLayersOfDifferentModelsAreRefused() throws {
        var rng = SplitMix64(seed: 1)
        let a = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 6, k: 2)
        let b = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 4, k: 2)
        XCTAssertThrowsError(try EvaluationAccumulator(original: a, compressed: b)) { e in
            XCTAssertTrue("\(e)".contains("E=4"), "\(e)")
        }
    }

    /// Block size does not change the figures; a layer against itself (with or without an
    /// expert map that names the same experts) has zero error and full agreement.
    func testBlockIndependenceAndIdentity() throws {
        for seed: UInt64 in 1...5 {
            var rng = SplitMix64(seed: seed)
            let a = randomLayer(&rng, type: seed % 2 == 0 ? .glu : .mlp, router: .softmax_topk_norm, E: 6, k: 2, biases: seed == 3)
            var b = a
            for i in b.experts.indices { b.experts[i].down = .dense(b.experts[i].down.dense().scaled(0.9)) }
            let x = randomMatrix(53, a.config.dModel, &rng)
            var one = try EvaluationAccumulator(original: a, compressed: b)
            try one.add(x)
            var blocks = try EvaluationAccumulator(original: a, compressed: b)
            var s = 0
            while s < x.rows { let e = min(s + 7, x.rows); try blocks.add(x.rowBlock(s, e - s)); s = e }
            let r1 = one.result(bytesBefore: 0, bytesAfter: 0), r2 = blocks.result(bytesBefore: 0, bytesAfter: 0)
            // Products of different block shapes round differently in float32: equal to ~1e-7.
            XCTAssertEqual(r1.relativeError, r2.relativeError, accuracy: 1e-6, "seed \(seed)")
            if seed != 3 { XCTAssertEqual(r1.relativeError, 0.1, accuracy: 1e-5, "seed \(seed): every output scaled by 0.9") }
            XCTAssertEqual(r1.meanCosine, r2.meanCosine, accuracy: 1e-6, "seed \(seed)")
            var same = try EvaluationAccumulator(original: a, compressed: a)
            try same.add(x)
            XCTAssertEqual(same.result(bytesBefore: 0, bytesAfter: 0).relativeError, 0, "seed \(seed)")
            XCTAssertEqual(same.result(bytesBefore: 0, bytesAfter: 0).routingAgreement, 1, "seed \(seed)")
        }
    }

    /// eval on a merged trained fixture: the CLI's figures equal a direct computation, bytes halve,
    /// the capture's stored outputs are reproduced by the original, and --json parses.
    func testEvalCommandOnMergedTrainedFixture() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-mixtral.h5"), merged = dir + "/m.h5", held = fixture("trained-mixtral.heldout.h5")
        var res = try runCLI(["merge", model, "--calib", fixture("trained-mixtral.calib.h5"), "--groups", "4", "-o", merged, "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        res = try runCLI(["eval", model, merged, "--calib", held, "--json", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        let doc = try JSONValue.parse(res.stdout)
        let ev = try XCTUnwrap(doc["evaluation"])
        let a = try CheckpointReader(model), b = try CheckpointReader(merged), c = try CalibrationReader(held)
        guard case .array(let layers)? = ev["layers"] else { return XCTFail("no layers in \(res.stdout)") }
        XCTAssertEqual(layers.count, a.layers.count)
        for (cfg, l) in zip(a.layers, layers) {
            let x = try c.hiddenStates(cfg.name)
            let direct = relativeError(try b.readLayer(cfg.name).forward(x), try a.readLayer(cfg.name).forward(x))
            XCTAssertEqual(l["relative_error"]?.doubleValue ?? -1, direct, accuracy: 1e-6, cfg.name)
            XCTAssertEqual(l["tokens"]?.intValue, x.rows)
            XCTAssertEqual(l["stored_experts_after"]?.intValue, 4)
            XCTAssertEqual(l["routing_agreement"]?.doubleValue, 1, "router unchanged by merging")
            XCTAssertLessThan(l["captured_output_error"]?.doubleValue ?? 1, 1e-3, cfg.name)
            XCTAssertEqual(Double(l["expert_bytes_before"]!.intValue!) / Double(l["expert_bytes_after"]!.intValue!), 2, accuracy: 1e-9)
        }
        XCTAssertEqual(ev["expert_compression_ratio"]?.doubleValue ?? 0, 2, accuracy: 1e-9)
        // Capped tokens, layer selection and the text table.
        res = try runCLI(["eval", model, merged, "--calib", held, "--max-tokens", "100", "--layers", a.layers[0].name, "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        XCTAssertTrue(res.stdout.contains("rel error"), res.stdout)
        XCTAssertTrue(res.stdout.contains("  100  "), res.stdout)
        XCTAssertFalse(res.stdout.contains(a.layers[1].name), res.stdout)
    }

    /// Parameters and FLOPs of factored layers, by hand: trained-mixtral (E = 8, k = 2, GLU,
    /// d_model 64, d_ff 128) at rank 8 stores per matrix U [128|64, 8] + V [8, 64|128], i.e.
    /// 8·(128 + 64) = 1536 parameters, 2·1536 FLOPs per token; three matrices per expert.
    func testFactoredParametersAndFlopsByHand() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-mixtral.h5"), factored = dir + "/r8.h5"
        XCTAssertEqual(try runCLI(["lowrank", model, "--rank", "8", "-o", factored, "--quiet"]).status, 0)
        let res = try runCLI(["eval", model, factored, "--calib", fixture("trained-mixtral.heldout.h5"), "--max-tokens", "50", "--json"])
        XCTAssertEqual(res.status, 0, res.stderr)
        let layers = try XCTUnwrap(try JSONValue.parse(res.stdout)["evaluation"]?["layers"]?.arrayValue)
        XCTAssertEqual(layers.count, 4)
        for l in layers {
            let name = l["name"]?.stringValue ?? "?"
            XCTAssertEqual(l["expert_parameters_before"]?.doubleValue, 8 * 3 * 128 * 64, name)
            XCTAssertEqual(l["expert_parameters_after"]?.doubleValue, 8 * 3 * 1536, name)
            XCTAssertEqual(l["expert_flops_per_token_before"]?.doubleValue, 2 * 3 * 2 * 128 * 64, name)  // k · 3 matrices · 2 FLOPs
            XCTAssertEqual(l["expert_flops_per_token_after"]?.doubleValue, 2 * 3 * 2 * 1536, name)
        }
    }

    /// A capture the original model does not reproduce gets one warning on stderr, also with
    /// --json (stdout stays one JSON document); a matching capture gets none.
    func testForeignCaptureWarnsOnStderr() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-switch.h5"), calib = fixture("trained-switch.calib.h5")
        let other = dir + "/other.h5"
        XCTAssertEqual(try runCLI(["lowrank", model, "--rank", "4", "-o", other, "--quiet"]).status, 0)
        for json in [false, true] {
            let flags = json ? ["--json", "--quiet"] : ["--quiet"]
            let bad = try runCLI(["eval", other, model, "--calib", calib] + flags)
            XCTAssertEqual(bad.status, 0, bad.stderr)
            let warnings = bad.stderr.split(separator: "\n").filter { $0.hasPrefix("warning: the original model does not reproduce") }
            XCTAssertEqual(warnings.count, 1, "json \(json): \(bad.stderr)")
            XCTAssertFalse(bad.stdout.contains("warning:"), "json \(json): the warning belongs on stderr")
            if json { XCTAssertNoThrow(try JSONValue.parse(bad.stdout)) }
            let good = try runCLI(["eval", model, other, "--calib", calib] + flags)
            XCTAssertEqual(good.status, 0, good.stderr)
            XCTAssertFalse(good.stderr.contains("warning:"), "json \(json): \(good.stderr)")
        }
    }

    func testEvalBadInputs() throws {
        let dir = temporaryDirectory(self)
        let cases: [([String], String)] = [
            (["eval", fixture("trained-switch.h5"), fixture("planted-switch.h5"), "--calib", fixture("trained-switch.calib.h5")],
             "planted-switch.h5"),
            (["eval", fixture("trained-switch.h5"), fixture("trained-switch.h5"), "--calib", fixture("trained-mixtral.calib.h5")],
             "trained-mixtral.calib.h5"),
            (["eval", fixture("trained-switch.h5"), fixture("trained-switch.h5"), "--calib", fixture("trained-switch.calib.h5"),
              "--layers", "nope"], "--layers"),
            (["eval", fixture("trained-switch.h5"), dir + "/missing.h5", "--calib", fixture("trained-switch.calib.h5")],
             "missing.h5"),
            (["eval", fixture("trained-switch.h5"), fixture("trained-switch.h5"), "--calib", fixture("trained-switch.calib.h5"),
              "--max-tokens", "0"], "--max-tokens"),
        ]
        for (args, named) in cases {
            let res = try runCLI(args)
            XCTAssertNotEqual(res.status, 0, "\(args)")
            XCTAssertEqual(res.stderr.split(separator: "\n").count, 1, "one line: \(res.stderr)")
            XCTAssertTrue(res.stderr.contains(named), "\(args): \(res.stderr)")
        }
    }
}
