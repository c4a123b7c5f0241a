import Foundation
import XCTest
@testable import SMoECompress

final class PruningTests: XCTestCase {
    /// REAP's rule, computed here independently of `Pruning`: the routing from the capture's own
    /// router logits (softmax in Float64, top-k with ties to the lower slot, renormalised for
    /// Mixtral), each routed token's weight times the Float64 norm of the expert's output (the
    /// expert forward itself, checked against the captures by ForwardTests), averaged over the
    /// routed tokens. The tool's saliencies agree to 1e-5 relative (its routing weights come
    /// from float32 logits it computes itself, within 1e-6 of the captured ones), and the kept
    /// sets are the same (the closest G-th/(G+1)-th saliency gap of any layer is far larger).
    func testREAPSaliencyAndKeptSetOnTheTrainedFixture() throws {
        let model = try CheckpointReader(fixture("trained-mixtral.h5"))
        let calib = try CalibrationReader(fixture("trained-mixtral.calib.h5"))
        var keptSets: [[Int]] = []
        for cfg in model.layers {
            let layer = try model.readLayer(cfg.name)
            let x = try calib.hiddenStates(cfg.name), z = try calib.routerLogits(cfg.name)
            let e = cfg.numExperts, k = cfg.topK, d = cfg.dModel
            let outputs = layer.experts.map { $0.forward(x, activation: cfg.activation) }
            var sum = [Double](repeating: 0, count: e), count = [Int](repeating: 0, count: e)
            for t in 0..<x.rows {
                let logits = (0..<e).map { Double(z[t, $0]) }
                let mx = logits.max()!
                let p = logits.map { Foundation.exp($0 - mx) }
                let chosen = (0..<e).sorted { p[$0] > p[$1] || (p[$0] == p[$1] && $0 < $1) }.prefix(k)
                let norm = chosen.reduce(0) { $0 + p[$1] }
                for j in chosen {
                    let sq = (0..<d).reduce(0.0) { $0 + Double(outputs[j][t, $1]) * Double(outputs[j][t, $1]) }
                    sum[j] += p[j] / norm * sq.squareRoot()
                    count[j] += 1
                }
            }
            let expected = (0..<e).map { count[$0] > 0 ? sum[$0] / Double(count[$0]) : 0 }
            let tokens: TokenBlocks = { body in try body(x) }
            let (saliency, routed) = try Pruning.saliency(LayerSource(layer), method: .reap, tokens: tokens)
            XCTAssertEqual(routed, count, cfg.name)
            for j in 0..<e { XCTAssertEqual(saliency[j], expected[j], accuracy: 1e-5 * max(expected[j], 1e-3), "\(cfg.name) expert \(j)") }
            let order = expected.indices.sorted { expected[$0] > expected[$1] }
            XCTAssertGreaterThan(expected[order[3]] - expected[order[4]], 1e-3, "\(cfg.name): the kept set is decided by a clear gap")
            let kept = Pruning.keep(saliency, groups: 4)
            XCTAssertEqual(kept, order.prefix(4).sorted(), cfg.name)
            keptSets.append(kept)
        }
        // The known answer on this fixture (layer 2's expert 3 is never routed: saliency 0).
        XCTAssertEqual(keptSets, [[0, 1, 3, 6], [1, 3, 4, 7], [0, 1, 4, 7], [0, 2, 5, 7]])
    }

    /// Frequency saliency is the summed routing weight: k per token in all (top-k weights
    /// renormalised to 1), and the routed-token counts sum to k per token.
    func testFrequencySaliencySumsTheRoutingWeights() throws {
        var rng = SplitMix64(seed: 27)
        let layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 6, k: 2)
        let x = randomMatrix(300, 12, &rng)
        let tokens: TokenBlocks = { body in try body(x.rowBlock(0, 100)); try body(x.rowBlock(100, 200)) }
        let (s, counts) = try Pruning.saliency(LayerSource(layer), method: .frequency, tokens: tokens)
        XCTAssertEqual(s.reduce(0, +), 300, accuracy: 1e-3)
        XCTAssertEqual(counts.reduce(0, +), 600)
        let r = layer.route(x)
        for j in 0..<6 {
            let expected = (0..<(300 * 2)).filter { r.slots[$0] == j }.reduce(0.0) { $0 + Double(r.weights[$1]) }
            XCTAssertEqual(s[j], expected, accuracy: 1e-9)
        }
    }

    func testKeepBreaksTiesToTheLowerIndex() {
        XCTAssertEqual(Pruning.keep([1, 2, 2, 1], groups: 2), [1, 2])
        XCTAssertEqual(Pruning.keep([1, 2, 2, 1], groups: 3), [0, 1, 2])
        XCTAssertEqual(Pruning.keep([0, 0, 0], groups: 2), [0, 1])
        XCTAssertEqual(Pruning.keep([0.5, 3, 0.1, 3], groups: 1), [1])
    }

    /// The pruned layer is the kept slots as they were: router rows and bias entries bit for
    /// bit, the experts unchanged, G router rows and no expert map; with every slot kept it is
    /// the original layer.
    func testPrunedLayerKeepsRowsAndExpertsExactly() throws {
        var rng = SplitMix64(seed: 3)
        let layer = randomLayer(&rng, type: .mlp, router: .softmax_topk, E: 6, k: 1, biases: true)
        let kept = [1, 4, 5]
        let p = try Pruning.pruned(LayerSource(layer), kept: kept)
        XCTAssertEqual(p.config.numExperts, 3)
        XCTAssertNil(p.expertMap)
        XCTAssertEqual(p.experts, kept.map { layer.experts[$0] })
        XCTAssertEqual(p.routerBias, kept.map { layer.routerBias![$0] })
        for (g, s) in kept.enumerated() { for c in 0..<12 { XCTAssertEqual(p.router[g, c], layer.router[s, c]) } }
        XCTAssertEqual(try Pruning.pruned(LayerSource(layer), kept: Array(0..<6)), layer)
        // A merged layer (slots sharing experts) is refused.
        var merged = layer
        merged.experts = Array(layer.experts.prefix(3))
        merged.expertMap = [0, 1, 2, 0, 1, 2]
        XCTAssertThrowsError(try Pruning.saliency(LayerSource(merged), method: .frequency, tokens: { _ in }))
    }

    /// `merge --prune` end to end: a compact checkpoint of G experts whose history names the
    /// kept and dropped slots; the refit lowers the calibration error; eval compares it with
    /// the original through that history (routing agrees: the kept rows rank the kept experts
    /// as the original does); --json carries the saliencies.
    func testMergePruneCommand() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("trained-mixtral.h5"), c = fixture("trained-mixtral.calib.h5")
        let plain = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--prune", "reap", "--no-compact-refit", "-o", dir + "/p.h5", "--json"])
        XCTAssertEqual(plain.status, 0, plain.stderr)
        let refit = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--prune", "reap", "-o", dir + "/r.h5", "--json"])
        XCTAssertEqual(refit.status, 0, refit.stderr)
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(refit.stdout.utf8)) as? [String: Any])
        let layers = try XCTUnwrap(json["layers"] as? [[String: Any]])
        let prune = try XCTUnwrap(layers[0]["prune"] as? [String: Any])
        XCTAssertEqual(prune["kept"] as? [Int], [0, 1, 3, 6])
        XCTAssertEqual(prune["dropped"] as? [Int], [2, 4, 5, 7])
        let refitReport = try XCTUnwrap(prune["expert_refit"] as? [String: Any])
        XCTAssertLessThan(try XCTUnwrap(refitReport["calibration_error_after"] as? Double),
                          try XCTUnwrap(refitReport["calibration_error_before"] as? Double))

        let pruned = try CheckpointReader(dir + "/p.h5"), original = try CheckpointReader(m)
        for cfg in original.layers {
            let b = try pruned.readLayer(cfg.name)
            XCTAssertEqual(b.config.numExperts, 4)
            XCTAssertNil(b.expertMap)
            // Without the refit the kept experts are the originals, as stored (float16 in, float16 out).
            XCTAssertEqual(b.experts.count, 4)
        }
        let l0 = try pruned.readLayer("model.layers.0.block_sparse_moe"), o0 = try original.readLayer("model.layers.0.block_sparse_moe")
        XCTAssertEqual(l0.experts, [0, 1, 3, 6].map { o0.experts[$0] })

        let ev = try runCLI(["eval", m, dir + "/r.h5", "--calib", fixture("trained-mixtral.heldout.h5"), "--json"])
        XCTAssertEqual(ev.status, 0, ev.stderr)
        let evJSON = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(ev.stdout.utf8)) as? [String: Any])
        let evaluation = try XCTUnwrap(evJSON["evaluation"] as? [String: Any])
        for l in try XCTUnwrap(evaluation["layers"] as? [[String: Any]]) {
            XCTAssertEqual(l["routing_agreement"] as? Double, 1)
        }

        let bad = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--prune", "reap", "--adaptive", "-o", dir + "/x.h5"])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertEqual(bad.stderr, "error: --prune: keeps the same number of experts in every layer (a Hugging Face config holds one expert count): drop --adaptive\n")
        let noCalib = try runCLI(["merge", m, "--groups", "4", "--prune", "frequency", "-o", dir + "/x.h5"])
        XCTAssertEqual(noCalib.stderr, "error: --prune: frequency ranks the experts on calibration tokens (--calib)\n")
        let k = try runCLI(["merge", m, "--calib", c, "--groups", "1", "--prune", "reap", "-o", dir + "/x.h5"])
        XCTAssertTrue(k.stderr.hasPrefix("error: --prune: keeps top_k ≤ --groups"), k.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/x.h5"))
    }
}

/// `--refit-targets capture` (sequential calibration, ALGORITHM.md §3d).
final class RefitTargetTests: XCTestCase {
    /// The known answer: top-1 routing, every expert kept, targets 1.5 × the layer's own output.
    /// Each token's output is w·E(x), so the refit of each down (no ridge) is exactly 1.5 × the
    /// down: float32 products and a float64 solve leave 1e-4 relative at most.
    func testRefitToCapturedTargetsRecoversAScaledDown() throws {
        var rng = SplitMix64(seed: 41)
        let layer = randomLayer(&rng, type: .glu, router: .softmax_topk, E: 4, k: 1, d: 8, f: 6)
        let x = randomMatrix(400, 8, &rng)
        var y = layer.forward(x)
        for i in 0..<y.data.count { y.data[i] *= 1.5 }
        let tokens: TokenBlocks = { body in try body(x) }
        let targets: TargetBlocks = { body in try body(x.rowBlock(0, 150), y.rowBlock(0, 150)); try body(x.rowBlock(150, 250), y.rowBlock(150, 250)) }
        let (out, report) = try CompactRefit.refit(layer, original: LayerSource(layer), slotGroups: nil, tokens: tokens, targets: targets, ridge: 0)
        XCTAssertEqual(report.before, 1.0 / 3.0, accuracy: 1e-5)  // ‖y − 1.5y‖ / ‖1.5y‖
        XCTAssertLessThan(report.after, 1e-4)
        for (a, b) in zip(out.experts, layer.experts) {
            guard case .dense(let da) = a.down, case .dense(let db) = b.down else { return XCTFail("factored") }
            for i in 0..<da.data.count { XCTAssertEqual(da.data[i], 1.5 * db.data[i], accuracy: 1e-4 * max(1, abs(db.data[i]))) }
            XCTAssertEqual(a.up, b.up)
        }
    }

    /// On a capture of the original model (outputs = the layer's own, to float32 rounding) the
    /// capture targets give the compact refit of the layer targets, to rounding; E-slot merges
    /// gain a layer refit recorded in --json and history; errors name the flag.
    func testCaptureTargetsOnTheFixture() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("trained-mixtral.h5"), c = fixture("trained-mixtral.calib.h5")
        var errors: [Double] = []
        for targets in ["layer", "capture"] {
            let r = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--router", "compact", "--refit-targets", targets, "-o", dir + "/\(targets).h5", "--json"])
            XCTAssertEqual(r.status, 0, r.stderr)
            let ev = try runCLI(["eval", m, dir + "/\(targets).h5", "--calib", fixture("trained-mixtral.heldout.h5"), "--json"])
            let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(ev.stdout.utf8)) as? [String: Any])
            let evaluation = try XCTUnwrap(json["evaluation"] as? [String: Any])
            errors.append(try XCTUnwrap(evaluation["mean_relative_error"] as? Double))
        }
        XCTAssertEqual(errors[0], errors[1], accuracy: 1e-4)
        let slots = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--refit-targets", "capture", "-o", dir + "/s.h5", "--json"])
        XCTAssertEqual(slots.status, 0, slots.stderr)
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(slots.stdout.utf8)) as? [String: Any])
        let layer0 = try XCTUnwrap((json["layers"] as? [[String: Any]])?.first)
        let refit = try XCTUnwrap(layer0["layer_refit"] as? [String: Any])
        XCTAssertLessThanOrEqual(try XCTUnwrap(refit["calibration_error_after"] as? Double), try XCTUnwrap(refit["calibration_error_before"] as? Double))
        let history = try CheckpointReader(dir + "/s.h5").history
        XCTAssertEqual(history.last?["refit_targets"]?.stringValue, "capture")
        let bad = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--router", "compact", "--no-compact-refit", "--refit-targets", "capture", "-o", dir + "/x.h5"])
        XCTAssertEqual(bad.stderr, "error: --refit-targets: capture needs the refit of the compact experts: drop --compact-refit's no\n")
    }
    /// A size plan that prunes some layers and merges others (trained-mixtral 0.5 with the bundled
    /// sensitivities and G = 4, which keeps the planner's search short: layers 0–1 merged to 4 over
    /// their 8 router slots, layers 2–3 pruned to 4 kept slots) evaluates: merged layers through their expert_map, pruned ones through the kept slots
    /// their history record holds. Known answer: eval's per-layer errors on the held-out capture
    /// are compress's own `--eval-calib` figures for the same capture. Both read the same file's
    /// rounded layers through the same accumulator (float64 sums, same token blocks, same order),
    /// so they agree bit for bit; the JSON prints 9 significant digits either way.
    func testPlannedMixedPruneMergeCheckpointEvaluates() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("trained-mixtral.h5"), heldout = fixture("trained-mixtral.heldout.h5")
        let run = try runCLI(["compress", m, "--calib", fixture("trained-mixtral.calib.h5"), "--eval-calib", heldout,
                              "--target-size", "0.5", "--groups", "4", "--prune", "frequency",
                              "--sensitivity", fixture("trained-mixtral.sensitivity.json"), "-o", dir + "/mix.h5", "--quiet", "--json"])
        XCTAssertEqual(run.status, 0, run.stderr)
        let json = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(run.stdout.utf8)) as? [String: Any])
        let plan = try XCTUnwrap((json["plan"] as? [String: Any])?["layers"] as? [[String: Any]])
        XCTAssertEqual(plan.map { $0["method"] as? String }, ["merge", "merge", "prune frequency", "prune frequency"])
        let compressed = try XCTUnwrap((json["report"] as? [String: Any])?["layers"] as? [[String: Any]])

        let ev = try runCLI(["eval", m, dir + "/mix.h5", "--calib", heldout, "--json"])
        XCTAssertEqual(ev.status, 0, ev.stderr)
        let evJSON = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(ev.stdout.utf8)) as? [String: Any])
        let layers = try XCTUnwrap((evJSON["evaluation"] as? [String: Any])?["layers"] as? [[String: Any]])
        XCTAssertEqual(layers.count, 4)
        for (e, c) in zip(layers, compressed) {
            XCTAssertEqual(e["name"] as? String, c["name"] as? String)
            let cEval = try XCTUnwrap(c["evaluation"] as? [String: Any])
            XCTAssertEqual(try XCTUnwrap(e["relative_error"] as? Double), try XCTUnwrap(c["relative_error_final"] as? Double))
            for key in ["mean_cosine", "routing_agreement", "routing_overlap", "stored_experts_after"] {
                XCTAssertEqual(e[key] as? Double, cEval[key] as? Double, "\(key) \(e["name"] ?? "")")
            }
        }
        // The pruned layers keep their router rows bit for bit: the kept slots' routing agrees.
        XCTAssertEqual(layers.map { $0["stored_experts_after"] as? Double }, [4, 4, 4, 4])
        let reader = try CheckpointReader(dir + "/mix.h5")
        XCTAssertNil(reader.compactGroups("model.layers.1.block_sparse_moe"))
        XCTAssertEqual(reader.compactGroups("model.layers.2.block_sparse_moe")?.filter { $0 >= 0 }, [0, 1, 2, 3])

        // Export still refuses the mixed expert counts, in one line that says why.
        let export = try runCLI(["export", dir + "/mix.h5", "-o", dir + "/hf"])
        XCTAssertNotEqual(export.status, 0)
        XCTAssertEqual(export.stderr.split(separator: "\n").count, 1, export.stderr)
        XCTAssertTrue(export.stderr.contains("different router slot counts"), export.stderr)
        XCTAssertTrue(export.stderr.contains("config.json holds one expert count"), export.stderr)
    }
}
