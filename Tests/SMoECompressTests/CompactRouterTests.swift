import XCTest
@testable import SMoECompress

final class CompactRouterTests: XCTestCase {
    /// A merged layer whose groups' slots share one router row each: slot s of group g has logit
    /// r_g·x + b_s, so p_g(x) = softmax_g(r_g·x + logsumexp_{s∈g} b_s) exactly.
    func sharedRowLayer(_ rng: inout SplitMix64, groups: [[Int]], bias: [Float], type: ExpertType, router: RouterType,
                        k: Int, d: Int = 8) -> MoELayer {
        let e = groups.reduce(0) { $0 + $1.count }
        var layer = randomLayer(&rng, type: type, router: router, E: e, G: groups.count, k: k, d: d, f: 12)
        let rows = randomMatrix(groups.count, d, &rng, scale: 0.5)
        var map = [Int](repeating: 0, count: e)
        for (g, slots) in groups.enumerated() {
            for s in slots {
                map[s] = g
                for c in 0..<d { layer.router[s, c] = rows[g, c] }
            }
        }
        layer.expertMap = map
        layer.routerBias = bias
        return layer
    }

    func blocks(_ x: Matrix, rows: Int = 128) -> TokenBlocks {
        { body in
            var start = 0
            while start < x.rows {
                let n = min(rows, x.rows - start)
                try body(x.rowBlock(start, n))
                start += n
            }
        }
    }

    /// The known answer: fitted rows are the shared rows, the fitted bias is logsumexp of the
    /// group's slot biases (up to one constant, which softmax ignores), cross-entropy reaches the
    /// entropy floor and the top-k groups agree on every token.
    func testFitIsExactWhenTheSlotsOfAGroupShareTheirRouterRow() throws {
        var rng = SplitMix64(seed: 18)
        let groups = [[0, 2, 5], [1, 4], [3]]
        let bias: [Float] = [0.3, -0.2, 1.1, 0.5, 0.9, -0.7]
        let layer = sharedRowLayer(&rng, groups: groups, bias: bias, type: .glu, router: .softmax_topk_norm, k: 2)
        let x = randomMatrix(600, 8, &rng, scale: 2)
        // Slot 5 is the most used of group 0: the fit starts from its bias, not the answer.
        let frequency = [0.1, 0.1, 0.1, 0.1, 0.2, 0.4]
        let (compact, report) = try CompactRouter.compact(layer, frequency: frequency, tokens: blocks(x))
        XCTAssertEqual(report.start, [5, 4, 3])
        XCTAssertEqual(compact.config.numExperts, 3)
        XCTAssertNil(compact.expertMap)
        XCTAssertEqual(compact.experts, layer.experts)
        for (g, slots) in groups.enumerated() {
            for c in 0..<8 { XCTAssertEqual(compact.router[g, c], layer.router[slots[0], c], accuracy: 1e-4) }
        }
        let lse = groups.map { s in Foundation.log(s.map { Foundation.exp(Double(bias[$0])) }.reduce(0, +)) }
        let fitted = try XCTUnwrap(compact.routerBias).map(Double.init)
        let shift = zip(fitted, lse).map { $0 - $1 }
        for v in shift { XCTAssertEqual(v, shift[0], accuracy: 1e-4) }
        XCTAssertGreaterThan(report.initial.crossEntropy - report.initial.entropy, 1e-3)
        XCTAssertLessThan(report.fitted.crossEntropy - report.fitted.entropy, 1e-8)
        XCTAssertEqual(report.fitted.topKAgreement, 1)
        XCTAssertTrue(report.converged)
    }

    /// When each group's other slots never win (their bias is 40 below the most used slot's),
    /// the compact layer computes the E-slot merged layer's output to float rounding, for top-1
    /// (Switch weights), top-2 renormalised (Mixtral) and GPT-OSS's top-2-then-softmax routing
    /// (its fitted logits differ from the winning slots' by one constant, which the softmax over
    /// the k ignores).
    func testCompactLayerReproducesTheSlotLayer() throws {
        var rng = SplitMix64(seed: 7)
        let groups = [[0, 3], [1, 4, 5], [2]]
        let bias: [Float] = [0.2, -0.1, 0.4, -40, -40.1, -39.6]
        for (type, router, k) in [(ExpertType.mlp, RouterType.softmax_topk, 1), (.glu, .softmax_topk_norm, 2), (.glu, .topk_softmax, 2)] {
            let layer = sharedRowLayer(&rng, groups: groups, bias: bias, type: type, router: router, k: k)
            let x = randomMatrix(300, 8, &rng)
            let (compact, report) = try CompactRouter.compact(layer, frequency: [0.3, 0.3, 0.3, 0.05, 0.03, 0.02],
                                                              tokens: blocks(x))
            XCTAssertEqual(report.start, [0, 1, 2])
            let y = layer.forward(x), yc = compact.forward(x)
            XCTAssertLessThan(relativeError(yc, y), 1e-5, "\(type) top-\(k)")
            let r = layer.route(x), rc = compact.route(x)
            XCTAssertEqual(r.slots.map { layer.expertMap![$0] }, rc.slots, "\(type) top-\(k)")
        }
    }

    /// Sigmoid routers, the known answer: when the slots of a group share one router row r_g,
    /// the target max_{s∈g} σ(r_g·x + b_s) is σ(r_g·x + max_{s∈g} b_s), so the fit returns the
    /// shared rows and the largest slot bias (no free constant under sigmoid), the binary
    /// cross-entropy reaches its entropy floor and the top-k groups agree on every token.
    func testSigmoidFitIsExactWhenTheSlotsOfAGroupShareTheirRouterRow() throws {
        var rng = SplitMix64(seed: 24)
        let groups = [[0, 2, 5], [1, 4], [3]]
        let bias: [Float] = [0.3, -0.2, 1.1, 0.5, 0.9, -0.7]
        let layer = sharedRowLayer(&rng, groups: groups, bias: bias, type: .glu, router: .sigmoid_topk_norm, k: 2)
        let x = randomMatrix(600, 8, &rng, scale: 2)
        let (compact, report) = try CompactRouter.compact(layer, frequency: [0.1, 0.1, 0.1, 0.1, 0.2, 0.4], tokens: blocks(x))
        XCTAssertEqual(report.start, [5, 4, 3])
        XCTAssertEqual(compact.config.routerType, .sigmoid_topk_norm)
        for (g, slots) in groups.enumerated() {
            for c in 0..<8 { XCTAssertEqual(compact.router[g, c], layer.router[slots[0], c], accuracy: 1e-4) }
            XCTAssertEqual(try XCTUnwrap(compact.routerBias)[g], slots.map { bias[$0] }.max()!, accuracy: 1e-4)
        }
        XCTAssertGreaterThan(report.initial.crossEntropy - report.initial.entropy, 1e-3)
        XCTAssertLessThan(report.fitted.crossEntropy - report.fitted.entropy, 1e-8)
        XCTAssertEqual(report.fitted.topKAgreement, 1)
        XCTAssertNil(report.selectionBias)
    }

    /// A merged group of identical experts (the merged layer: slots of a group share their row
    /// and selection bias, so the slot with the largest router bias wins within its group) is
    /// routed exactly as before by the compact sigmoid layer, top-1, with a selection bias and
    /// the scaling factor: same experts, same weights, same output.
    func testSigmoidCompactLayerReproducesTheSlotLayer() throws {
        var rng = SplitMix64(seed: 25)
        let groups = [[0, 3], [1, 4, 5], [2]]
        let bias: [Float] = [0.2, -0.1, 0.4, -0.3, 0.5, -0.6]
        for router in [RouterType.sigmoid_topk, .sigmoid_topk_norm] {
            var layer = sharedRowLayer(&rng, groups: groups, bias: bias, type: .glu, router: router, k: 1)
            layer.config.routedScalingFactor = 2.5
            let groupBias: [Float] = [0.05, -0.2, 0.1]
            layer.selectionBias = (0..<6).map { groupBias[layer.expertMap![$0]] }
            let x = randomMatrix(400, 8, &rng)
            let (compact, report) = try CompactRouter.compact(layer, frequency: [0.2, 0.2, 0.2, 0.1, 0.2, 0.1], tokens: blocks(x))
            XCTAssertEqual(compact.config.routedScalingFactor, 2.5)
            let fit = try XCTUnwrap(report.selectionBias)
            XCTAssertEqual(fit.rule, .start)  // every candidate is exact here: the first is kept
            XCTAssertEqual(try XCTUnwrap(compact.selectionBias), groupBias)
            let r = layer.route(x), rc = compact.route(x)
            XCTAssertEqual(r.slots.map { layer.expertMap![$0] }, rc.slots, "\(router)")
            for (a, b) in zip(r.weights, rc.weights) { XCTAssertEqual(a, b, accuracy: 1e-4) }
            XCTAssertLessThan(relativeError(compact.forward(x), layer.forward(x)), 1e-5, "\(router)")
        }
    }

    /// Grouped top-k (DeepSeek-V3's form, 8 slots in 4 groups, 2 eligible, top-2, selection
    /// bias, scaling 2.5) with the experts stored in a scrambled order: the compact layer of one
    /// slot per group stores them back in the expert groups (the assignment), keeps n_group and
    /// topk_group, and computes the slot layer's output.
    func testGroupedSigmoidCompactStoresTheExpertsInTheirGroups() throws {
        var rng = SplitMix64(seed: 26)
        var layer = randomLayer(&rng, type: .glu, router: .sigmoid_topk_norm, E: 8, k: 2, d: 8, f: 12)
        layer.config.numGroups = 4
        layer.config.topKGroups = 2
        layer.config.routedScalingFactor = 2.5
        layer.selectionBias = (0..<8).map { _ in Float(rng.nextGaussian()) * 0.1 }
        let scrambled = [5, 2, 7, 0, 3, 6, 1, 4]  // slot → stored expert
        var experts = layer.experts
        for (s, g) in scrambled.enumerated() { experts[g] = layer.experts[s] }
        var merged = layer
        merged.experts = experts
        merged.expertMap = scrambled
        let x = randomMatrix(500, 8, &rng, scale: 1.5)
        XCTAssertLessThan(relativeError(merged.forward(x), layer.forward(x)), 1e-6)
        let (compact, report) = try CompactRouter.compact(merged, frequency: [Double](repeating: 0.125, count: 8), tokens: blocks(x))
        XCTAssertEqual(report.groups, (0..<8).map { [$0] })
        XCTAssertTrue(compact.experts == layer.experts, "the experts are stored in slot order")
        XCTAssertEqual(compact.config.numGroups, 4)
        XCTAssertEqual(compact.config.topKGroups, 2)
        for (a, b) in zip(try XCTUnwrap(compact.selectionBias), try XCTUnwrap(layer.selectionBias)) { XCTAssertEqual(a, b, accuracy: 1e-6) }
        XCTAssertEqual(compact.route(x).slots, layer.route(x).slots)
        XCTAssertLessThan(relativeError(compact.forward(x), layer.forward(x)), 1e-4)
        // n_group = topk_group: every group is eligible, the compact layer is ungrouped.
        merged.config.topKGroups = 4
        let (open, _) = try CompactRouter.compact(merged, frequency: [Double](repeating: 0.125, count: 8), tokens: blocks(x))
        XCTAssertEqual(open.config.numGroups, 1)
        XCTAssertEqual(open.config.topKGroups, 1)
    }

    /// Which group counts keep grouped top-k: multiples of n_group, ≥ 2 per group, top_k within
    /// the eligible groups; the refusal lists the counts that work.
    func testGroupedCompactGroupCounts() {
        let c = LayerConfig(name: "l", index: 0, numExperts: 64, topK: 8, dModel: 8, dFF: 8, expertType: .glu, activation: .silu,
                            routerType: .sigmoid_topk_norm, numGroups: 8, topKGroups: 4, routedScalingFactor: 2.5)
        XCTAssertNil(c.compactProblem(groups: 16))
        XCTAssertNil(c.compactProblem(groups: 32))
        for g in [8, 12, 20] {
            let why = c.compactProblem(groups: g)
            XCTAssertTrue(why?.contains("use 16, 24, 32, 40 …") == true, why ?? "nil")
        }
        var open = c
        open.topKGroups = 8
        XCTAssertNil(open.compactProblem(groups: 12))
        var input = c
        (input.routerType, input.numGroups, input.topK) = (.topk_sigmoid_input, 1, 1)
        XCTAssertNil(input.compactProblem(groups: 4))
    }

    /// Llama-4 routing (top-1, σ(z) scales the expert input) compacts with sigmoid rows. Known
    /// answer: when the members of each merged group share one router row, that row reproduces
    /// the group's score exactly (the binary cross-entropy's minimum), so the compact layer routes
    /// and outputs as the merged E-slot layer does.
    func testInputScalingRouterCompactsExactlyWithSharedRows() throws {
        var rng = SplitMix64(seed: 44)
        var layer = randomLayer(&rng, type: .glu, router: .topk_sigmoid_input, E: 8, G: 4, k: 1, d: 10, f: 12)
        layer.expertMap = (0..<8).map { $0 % 4 }
        for s in 4..<8 { for c in 0..<10 { layer.router[s, c] = layer.router[s - 4, c] } }
        let x = randomMatrix(200, 10, &rng)
        let (compact, report) = try CompactRouter.compact(layer, frequency: [Double](repeating: 1, count: 8), tokens: { try $0(x) })
        XCTAssertEqual(compact.config.numExperts, 4)
        XCTAssertEqual(compact.config.routerType, .topk_sigmoid_input)
        XCTAssertEqual(report.fitted.topKAgreement, 1)
        // float32 rows from a float64 fit that starts at its optimum: 1e-5 relative.
        XCTAssertLessThan(relativeError(compact.forward(x), layer.forward(x)), 1e-5)
    }

    /// A softmax router with a selection bias (ERNIE-4.5's form), groups of unequal size: the
    /// frequency-matched candidate balances the compact experts' loads at least as well as the
    /// start slots' biases, and the kept bias is the candidate of least calibration error.
    func testSelectionBiasCandidates() throws {
        var rng = SplitMix64(seed: 27)
        var layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 8, G: 3, k: 2, d: 8, f: 12)
        layer.router = randomMatrix(8, 8, &rng, scale: 0.7)
        layer.expertMap = [0, 1, 0, 2, 0, 1, 0, 2]
        layer.selectionBias = (0..<8).map { _ in Float(rng.nextGaussian()) * 0.05 }
        let x = randomMatrix(800, 8, &rng)
        let (compact, report) = try CompactRouter.compact(layer, frequency: [0.2, 0.1, 0.15, 0.1, 0.15, 0.1, 0.1, 0.1], tokens: blocks(x))
        let fit = try XCTUnwrap(report.selectionBias)
        XCTAssertEqual(fit.errors.count, 3)
        XCTAssertLessThanOrEqual(fit.mismatch[2], fit.mismatch[0])
        XCTAssertEqual(fit.errors[SelectionBiasFit.Rule.allCases.firstIndex(of: fit.rule)!], fit.errors.min()!)
        XCTAssertEqual(compact.selectionBias?.count, 3)
        let (again, _) = try CompactRouter.compact(layer, frequency: [0.2, 0.1, 0.15, 0.1, 0.15, 0.1, 0.1, 0.1], tokens: blocks(x))
        XCTAssertEqual(again, compact)
    }

    /// On both trained fixtures the fitted rows beat each group's most used slot's row on the
    /// held-out tokens: lower cross-entropy and higher top-k group agreement, in every layer.
    func testFitBeatsTheMostUsedSlotRowsOnHeldOutTokens() throws {
        for name in ["trained-switch", "trained-mixtral"] {
            let model = try CheckpointReader(fixture(name + ".h5"))
            let calib = try CalibrationReader(fixture(name + ".calib.h5"))
            let heldout = try CalibrationReader(fixture(name + ".heldout.h5"))
            let stage = try MergeStage(model: model, calibration: calib, stats: nil,
                                       settings: MergeSettings(groups: 4, merging: MergeOptions(method: .frequency), router: .compact))
            var layers: [MoELayer] = []
            let result = try stage.run(model: model) { layers.append($0) }
            for (layer, report) in zip(layers, result.reports) {
                let fit = try XCTUnwrap(report.compact)
                XCTAssertEqual(layer.config.numExperts, 4)
                XCTAssertEqual(layer.router.rows, 4)
                XCTAssertNil(layer.expertMap)
                XCTAssertLessThan(fit.fitted.crossEntropy, fit.initial.crossEntropy)
                let (before, after) = try CompactRouter.measure(slotLayer: try model.readLayer(layer.name), groups: fit.groups,
                                                                start: fit.start, compact: layer,
                                                                tokens: heldout.tokenBlocks(layer.name))
                let label = "\(name) \(layer.name)"
                XCTAssertLessThan(after.crossEntropy, before.crossEntropy, label)
                XCTAssertGreaterThan(after.topKAgreement, before.topKAgreement, label)
                XCTAssertGreaterThan(after.topKAgreement, 0.8, label)
            }
            XCTAssertEqual(result.history["router"], "compact")
        }
    }

    /// The constraints of a compact model are checked before any layer is merged, each naming
    /// the router setting.
    func testCompactConstraints() throws {
        let model = try CheckpointReader(fixture("trained-mixtral.h5"))
        let calib = try CalibrationReader(fixture("trained-mixtral.calib.h5"))
        func error(_ s: MergeSettings, calibration: CalibrationReader?) -> SMoEError? {
            do {
                _ = try MergeStage(model: model, calibration: calibration, stats: nil, settings: s)
                return nil
            } catch { return error as? SMoEError }
        }
        let freq = MergeOptions(method: .frequency)
        let adaptive = try XCTUnwrap(error(MergeSettings(groups: 4, adaptive: true, merging: freq, router: .compact), calibration: calib))
        XCTAssertEqual(adaptive.setting, .router)
        XCTAssertTrue(adaptive.message.contains("model.layers.0.block_sparse_moe: "), adaptive.message)
        XCTAssertTrue(adaptive.message.contains("uniform groups without adaptive"), adaptive.message)
        let topK = try XCTUnwrap(error(MergeSettings(groups: 1, merging: freq, router: .compact), calibration: calib))
        XCTAssertEqual(topK.setting, .router)
        XCTAssertTrue(topK.message.contains("top_k"), topK.message)
        let partial = try XCTUnwrap(error(MergeSettings(groups: 4, layers: ["model.layers.0.block_sparse_moe"], merging: freq,
                                                        router: .compact), calibration: calib))
        XCTAssertEqual(partial.setting, .router)
        XCTAssertTrue(partial.message.contains("model.layers.1.block_sparse_moe, model.layers.2.block_sparse_moe, model.layers.3.block_sparse_moe"),
                      partial.message)
        let noTokens = try XCTUnwrap(error(MergeSettings(groups: 4, merging: freq, router: .compact), calibration: nil))
        XCTAssertEqual(noTokens.setting, .router)
        // The same settings with the slot layout are fine.
        XCTAssertNil(error(MergeSettings(groups: 4, adaptive: true, merging: freq), calibration: calib))
        // On the command line the errors name the flags.
        let res = try runCLI(["merge", fixture("trained-mixtral.h5"), "--calib", fixture("trained-mixtral.calib.h5"), "--groups", "4",
                              "--adaptive", "--router", "compact", "-o", temporaryDirectory(self) + "/x.h5"])
        XCTAssertNotEqual(res.status, 0)
        XCTAssertTrue(res.stderr.hasPrefix("error: --router: compact needs the same number of groups"), res.stderr)
        XCTAssertTrue(res.stderr.contains("uniform --groups without --adaptive"), res.stderr)
    }

    /// `merge --router compact` writes G router rows and G experts without expert_map; `eval`
    /// against the original compares through the recorded groups; `compress --router compact`
    /// reports the fit on its evaluation tokens.
    func testCompactCheckpointEvalAndCompress() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-switch.h5"), calib = fixture("trained-switch.calib.h5"), heldout = fixture("trained-switch.heldout.h5")
        let out = dir + "/c.h5"
        let res = try runCLI(["merge", model, "--calib", calib, "--groups", "4", "--router", "compact", "-o", out, "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        XCTAssertTrue(res.stdout.contains("compact router (4 rows"), res.stdout)
        let a = try CheckpointReader(model), c = try CheckpointReader(out)
        for l in a.layers {
            let s = try c.summary(l.name)
            XCTAssertFalse(s.hasExpertMap)
            XCTAssertEqual(s.numStored, 4)
            XCTAssertEqual(try c.config(l.name).numExperts, 4)
            XCTAssertEqual(try c.summary(l.name).expertFileBytes * 2, try a.summary(l.name).expertFileBytes)
            XCTAssertEqual(c.compactGroups(l.name)?.count, 8)
        }
        let ev = try Evaluation.run(original: a, compressed: c, calibration: try CalibrationReader(heldout))
        for l in ev.layers {
            XCTAssertGreaterThan(l.routingAgreement, 0.8, l.name)
            XCTAssertEqual(l.storedBefore, 8)
            XCTAssertEqual(l.storedAfter, 4)
            XCTAssertEqual(l.parametersAfter * 2, l.parametersBefore)
            XCTAssertLessThan(l.relativeError, 1)
        }
        let cmp = try runCLI(["compress", model, "--calib", calib, "--eval-calib", heldout, "--groups", "4", "--router", "compact",
                              "-o", dir + "/cc.h5", "--quiet", "--json"])
        XCTAssertEqual(cmp.status, 0, cmp.stderr)
        XCTAssertTrue(cmp.stdout.contains("\"evaluation_fitted\""), cmp.stdout)
        XCTAssertEqual(try CheckpointReader(dir + "/cc.h5").compactGroups(a.layers[0].name)?.count, 8)
    }

    /// The expert refit under the compact routing, on a trained layer of each fixture (top-1
    /// Switch weights, top-2 renormalised GLU): it does not raise the compact layer's output
    /// error on the calibration tokens (it lowers it here), changes only down and its bias, and
    /// gives the same layer twice; the merge stage does it by default with the compact layout.
    func testCompactRefitLowersTheCalibrationErrorAndIsDeterministic() throws {
        for name in ["trained-switch", "trained-mixtral"] {
            let model = try CheckpointReader(fixture(name + ".h5"))
            let calib = try CalibrationReader(fixture(name + ".calib.h5"))
            let layer = try model.readLayer(model.layers[1].name)
            let stage = try MergeStage(model: model, calibration: calib, stats: nil,
                                       settings: MergeSettings(groups: 4, router: .compact, compactRefit: false))
            let (merged, report) = try stage.process(source: LayerSource(layer), progress: nil)
            let fit = try XCTUnwrap(report.compact)
            XCTAssertNil(fit.refit)
            let tokens = calib.tokenBlocks(layer.name)
            let (refitted, r) = try CompactRefit.refit(merged, original: layer, slotGroups: fit.slotToGroup, tokens: tokens, ridge: 0.1)
            func error(_ l: MoELayer) throws -> Double {
                try Evaluation.evaluate(original: layer, compressed: l, calibration: calib, bytesBefore: 0, bytesAfter: 0,
                                        slotGroups: fit.slotToGroup).relativeError
            }
            let before = try error(merged), after = try error(refitted)
            XCTAssertEqual(r.before, before, accuracy: 1e-12, name)
            XCTAssertEqual(r.after, after, accuracy: 1e-12, name)
            XCTAssertLessThan(after, before * 0.95, name)
            XCTAssertEqual(r.tokens.reduce(0, +), 1024 * layer.config.topK, name)
            XCTAssertEqual(refitted.router, merged.router)
            for (a, b) in zip(refitted.experts, merged.experts) {
                XCTAssertEqual(a.up, b.up)
                XCTAssertEqual(a.gate, b.gate)
                XCTAssertNotEqual(a.down, b.down)
            }
            let (again, r2) = try CompactRefit.refit(merged, original: layer, slotGroups: fit.slotToGroup, tokens: tokens, ridge: 0.1)
            XCTAssertEqual(again, refitted, name)
            XCTAssertEqual(r2, r, name)
            // The default with the compact layout: the same refit inside the stage.
            let byDefault = try MergeStage(model: model, calibration: calib, stats: nil, settings: MergeSettings(groups: 4, router: .compact))
            let (staged, sr) = try byDefault.process(source: LayerSource(layer), progress: nil)
            XCTAssertEqual(staged, refitted, name)
            XCTAssertEqual(sr.compact?.refit, r, name)
            XCTAssertEqual(byDefault.historyEntry([sr])["compact_refit"], .bool(true))
            XCTAssertEqual(stage.historyEntry([report])["compact_refit"], .bool(false))
        }
    }

    /// Asking for the refit without the compact layout is a setting error naming both settings;
    /// on the command line, one `error:` line naming the flags.
    func testCompactRefitNeedsTheCompactRouter() throws {
        let model = try CheckpointReader(fixture("trained-switch.h5"))
        let calib = try CalibrationReader(fixture("trained-switch.calib.h5"))
        XCTAssertThrowsError(try MergeStage(model: model, calibration: calib, stats: nil,
                                            settings: MergeSettings(groups: 4, compactRefit: true))) { e in
            let err = e as? SMoEError
            XCTAssertEqual(err?.setting, .compactRefit)
            XCTAssertEqual(err?.message, "compact-refit: refits the experts of a compact layer under its fitted router, so it needs router compact")
        }
        // Turning it off without the compact layout changes nothing and is accepted.
        XCTAssertNoThrow(try MergeStage(model: model, calibration: calib, stats: nil, settings: MergeSettings(groups: 4, compactRefit: false)))
        let res = try runCLI(["merge", fixture("trained-switch.h5"), "--calib", fixture("trained-switch.calib.h5"), "--groups", "4",
                              "--compact-refit", "-o", temporaryDirectory(self) + "/x.h5"])
        XCTAssertNotEqual(res.status, 0)
        XCTAssertEqual(res.stderr, "error: --compact-refit: refits the experts of a compact layer under its fitted router, so it needs --router compact\n")
    }

    /// A checkpoint not made by `import` exports by its root architecture, with a config.json
    /// built from its layers and /dense; the compact merge of a trained fixture exports with half
    /// the expert bytes and the expert count set to 4.
    func testExportOfTrainedFixturesAndTheirCompactMerges() throws {
        let dir = temporaryDirectory(self)
        for (name, key) in [("trained-switch", "num_experts"), ("trained-mixtral", "num_local_experts")] {
            let full = try HFExport.run(checkpoint: fixture(name + ".h5"), outputDirectory: dir + "/\(name)")
            XCTAssertNotNil(full.synthesisedConfigGuesses)
            let config = try JSONValue.parse(try String(contentsOfFile: dir + "/\(name)/config.json", encoding: .utf8))
            XCTAssertEqual(config[key]?.intValue, 8)
            let compact = dir + "/\(name)-c.h5"
            let m = try runCLI(["merge", fixture(name + ".h5"), "--calib", fixture(name + ".calib.h5"), "--groups", "4",
                                "--router", "compact", "-o", compact, "--quiet"])
            XCTAssertEqual(m.status, 0, m.stderr)
            try HFExport.run(checkpoint: compact, outputDirectory: dir + "/\(name)-c")
            let cconfig = try JSONValue.parse(try String(contentsOfFile: dir + "/\(name)-c/config.json", encoding: .utf8))
            XCTAssertEqual(cconfig[key]?.intValue, 4)
            func expertBytes(_ folder: String) throws -> Int {
                try readFolder(folder).filter { $0.key.contains(".experts.") }.reduce(0) { $0 + $1.value.2.count }
            }
            XCTAssertEqual(try expertBytes(dir + "/\(name)-c") * 2, try expertBytes(dir + "/\(name)"), name)
        }
        // No known family: the error says what to pass.
        do {
            try HFExport.run(checkpoint: fixture("planted-switch.h5"), outputDirectory: dir + "/planted")
            XCTFail("exported a checkpoint of no known family")
        } catch let e as SMoEError {
            XCTAssertEqual(e.setting, .family)
            XCTAssertTrue(e.message.contains("synthetic-switch") && e.message.contains("mixtral, switch-transformers"), e.message)
        }
    }
}
