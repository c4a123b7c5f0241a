import Foundation
import XCTest
@testable import SMoECompress

/// `compress --target-size` (ALGORITHM.md §4.3). The full comparison on both trained fixtures
/// at 50 % and 25 % is `smoe-bench fidelity` (README, merging section); here one fixture at 50 %
/// with fewer candidates, to stay well under 20 s in a debug build.
final class SizePlannerTests: XCTestCase {
    let model = try! CheckpointReader(fixture("trained-switch.h5"))
    let calib = try! CalibrationReader(fixture("trained-switch.calib.h5"))
    let heldout = try! CalibrationReader(fixture("trained-switch.heldout.h5"))

    func run(_ settings: CompressSettings) throws -> (report: CompressReport, plan: SizePlan?) {
        let stage = try CompressStage(model: model, calibration: calib, evaluation: heldout, stats: nil, settings: settings, storage: .f16)
        return (stage.report(try stage.run(model: model) { _ in }.reports), stage.plan)
    }

    /// At half the expert bytes the plan fits, and its held-out error is at or below the best
    /// uniform grid point that fits (G 8, rank 16, 442,880 B: `smoe-bench fidelity` sweeps G 1…8 ×
    /// ranks 4…40) and well below merging alone at that size (G 4, the largest that fits).
    func testHalfSizeBeatsTheBestUniformPointAndMerging() throws {
        var settings = CompressSettings(merge: MergeSettings(groups: 1), lowRank: nil)
        var planner = PlannerSettings(target: .fraction(0.5), groupCandidates: [6, 8])
        planner.levels = 8
        settings.target = planner
        let (planned, plan) = try run(settings)
        let budget = 1_048_576 / 2
        XCTAssertLessThanOrEqual(planned.bytesFinal, budget)
        XCTAssertEqual(planned.bytesFinal, plan?.bytes, "the run stores what was planned")
        let grid = try run(CompressSettings(merge: MergeSettings(groups: 8), lowRank: LowRankOptions(rank: .fixed(16)))).report
        let merged = try run(CompressSettings(merge: MergeSettings(groups: 4), lowRank: nil)).report
        XCTAssertLessThanOrEqual(grid.bytesFinal, budget)
        XCTAssertLessThanOrEqual(planned.evaluation.meanRelativeError, grid.evaluation.meanRelativeError)
        XCTAssertLessThan(planned.evaluation.meanRelativeError, 0.6 * merged.evaluation.meanRelativeError)
    }

    /// The plan is a deterministic value; one G everywhere when asked; never over budget; a
    /// budget below the smallest option is one error naming the setting.
    func testPlanIsDeterministicUniformAndWithinBudget() throws {
        var s = PlannerSettings(target: .fraction(0.3), groupCandidates: [2, 4], uniformGroups: true)
        s.levels = 4
        let lr = LowRankOptions(rank: .fixed(1), floatBytes: 2)
        let plan = { try SizePlanner.plan(model: self.model, calibration: self.calib, stats: nil, merge: MergeSettings(groups: 1),
                                          lowRank: lr, settings: s, storage: .f16) }
        let a = try plan(), b = try plan()
        XCTAssertEqual(a, b)
        XCTAssertEqual(Set(a.layers.map(\.groups)).count, 1)
        XCTAssertLessThanOrEqual(a.bytes, a.budget)
        s.target = .bytes(1000)
        XCTAssertThrowsError(try plan()) { XCTAssertEqual(($0 as? SMoEError)?.setting, .targetSize) }
    }

    func testTargetSizeParsing() throws {
        XCTAssertEqual(try TargetSize.parse("0.25"), .fraction(0.25))
        XCTAssertEqual(try TargetSize.parse("20GB"), .bytes(20_000_000_000))
        XCTAssertEqual(try TargetSize.parse("300000"), .bytes(300_000))
        XCTAssertThrowsError(try TargetSize.parse("0")) { XCTAssertEqual(($0 as? SMoEError)?.setting, .targetSize) }
        XCTAssertThrowsError(try TargetSize.parse("big")) { XCTAssertEqual(($0 as? SMoEError)?.setting, .targetSize) }
    }

    /// `--plan-only` prints the plan and writes nothing.
    func testPlanOnlyWritesNothing() throws {
        let out = temporaryDirectory(self) + "/never.h5"
        let res = try runCLI(["compress", fixture("trained-switch.h5"), "--calib", fixture("trained-switch.calib.h5"),
                              "--target-size", "0.5", "--groups", "8", "--plan-only", "--json", "--quiet", "-o", out])
        XCTAssertEqual(res.status, 0, res.stderr)
        let plan = try XCTUnwrap(try JSONValue.parse(res.stdout)["plan"])
        XCTAssertLessThanOrEqual(try XCTUnwrap(plan["expert_bytes"]?.intValue), 524_288)
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        // Without -o: the same plan; without --plan-only, -o is required (one usage error naming it).
        let bare = try runCLI(["compress", fixture("trained-switch.h5"), "--calib", fixture("trained-switch.calib.h5"),
                               "--target-size", "0.5", "--groups", "8", "--plan-only", "--json", "--quiet"])
        XCTAssertEqual(bare.status, 0, bare.stderr)
        XCTAssertEqual(try JSONValue.parse(bare.stdout)["plan"], plan)
        for args in [["compress", fixture("trained-switch.h5"), "--calib", fixture("trained-switch.calib.h5"), "--target-size", "0.5"],
                     ["merge", fixture("trained-switch.h5"), "--groups", "4"], ["lowrank", fixture("trained-switch.h5"), "--rank", "4"],
                     ["align", fixture("trained-switch.h5")], ["expand", fixture("trained-switch.h5")]] {
            let r = try runCLI(args)
            XCTAssertNotEqual(r.status, 0, args.joined(separator: " "))
            XCTAssertTrue(r.stderr.hasPrefix("error: Missing expected argument '--output <output>'"), "\(args[0]): \(r.stderr)")
        }
    }

    /// The knapsack with sensitivities, on a planted case with a known answer: two layers with the
    /// same options (100 B → error 0.1, 50 B → 0.3, 25 B → 0.5) and 150 B. Unweighted the two
    /// splits 100 + 50 tie (0.4) and the lower-index choice wins; with c = (10, 1) the cost of
    /// giving layer 0 the 100 B is 10·0.01 + 0.09 = 0.19 against 10·0.09 + 0.01 = 0.91 the other
    /// way, so layer 0 gets them; with c = (1, 10) layer 1 does.
    func testSensitivityMovesBytesToTheSensitiveLayer() throws {
        let g = LayerGrouping(groups: [[0]], dominant: [0])
        let opts = [(100, 0.1), (50, 0.3), (25, 0.5)].map { SizePlanner.Option(groups: 1, grouping: g, ranks: [:], bytes: $0.0, error: $0.1) }
        func pick(_ c: [Double]) -> [Int]? {
            let s = LayerSensitivity(path: "s.json", weights: ["a": c[0], "b": c[1]])
            var p = PlannerSettings(target: .bytes(150), sensitivity: s)
            p.levels = 1
            let costs = zip(["a", "b"], [opts, opts]).map { name, o in o.map { p.cost(name, error: $0.error) } }
            return SizePlanner.choose([opts, opts], costs: costs, allowed: [[0, 1, 2], [0, 1, 2]], budget: 150)
        }
        XCTAssertEqual(pick([10, 1]), [0, 1])
        XCTAssertEqual(pick([1, 10]), [1, 0])
        XCTAssertEqual(PlannerSettings(target: .bytes(150)).cost("a", error: 0.3), 0.3, "without sensitivities: the error itself")
    }

    /// The same on a fixture: a sensitivity file that weights layer 0 a hundred times the others
    /// gives layer 0 its lowest-error option (G 4 dense, half its bytes: the budget, 35 % of the
    /// four layers, leaves the others 0.9 layer's worth, enough for their 1/8-levels), more bytes
    /// than any other layer and at least what the unweighted plan gives it; the plan records the
    /// file's values and fingerprint.
    func testSensitivityFileOnAFixture() throws {
        let names = model.layers.map(\.name)
        let path = temporaryDirectory(self) + "/sensitivity.json"
        let layers = names.enumerated().map { "\"\($0.element)\": \($0.offset == 0 ? "100" : "1")" }.joined(separator: ", ")
        try "{\"format\": \"smoe-compress layer sensitivity\", \"version\": 1, \"layers\": {\(layers)}}".write(toFile: path, atomically: true, encoding: .utf8)
        var s = PlannerSettings(target: .fraction(0.35), groupCandidates: [4])
        s.levels = 8
        let lr = LowRankOptions(rank: .fixed(1), floatBytes: 2)
        let plain = try SizePlanner.plan(model: model, calibration: calib, stats: nil, merge: MergeSettings(groups: 1), lowRank: lr,
                                         settings: s, storage: .f16)
        s.sensitivity = try LayerSensitivity.read(path)
        let weighted = try SizePlanner.plan(model: model, calibration: calib, stats: nil, merge: MergeSettings(groups: 1), lowRank: lr,
                                            settings: s, storage: .f16)
        XCTAssertLessThanOrEqual(weighted.bytes, weighted.budget)
        XCTAssertGreaterThanOrEqual(weighted.layers[0].bytes, plain.layers[0].bytes)
        XCTAssertLessThanOrEqual(weighted.layers[0].estimatedError, plain.layers[0].estimatedError)
        let best = try XCTUnwrap(weighted.candidates[0].min { $0.error < $1.error })
        XCTAssertEqual(weighted.layers[0].bytes, best.bytes)
        XCTAssertEqual(weighted.layers[0].estimatedError, best.error)
        XCTAssertTrue(weighted.layers.dropFirst().allSatisfy { $0.bytes < weighted.layers[0].bytes }, "\(weighted.layers.map(\.bytes))")
        let recorded = try XCTUnwrap(weighted.json["sensitivity"])
        XCTAssertEqual(recorded["layers"]?[names[0]]?.doubleValue, 100)
        XCTAssertEqual(recorded["fingerprint"]?.stringValue?.count, 16)
    }

    /// A bad sensitivity file is one error naming the file: not JSON, a negative value, a layer
    /// of another model, a missing layer.
    func testBadSensitivityFiles() throws {
        let names = model.layers.map(\.name)
        let dir = temporaryDirectory(self)
        func write(_ body: String) throws -> String {
            let p = dir + "/s\(body.hashValue & 0xffff).json"
            try body.write(toFile: p, atomically: true, encoding: .utf8)
            return p
        }
        func doc(_ layers: [(String, String)]) -> String {
            "{\"format\": \"smoe-compress layer sensitivity\", \"version\": 1, \"layers\": {"
                + layers.map { "\"\($0.0)\": \($0.1)" }.joined(separator: ", ") + "}}"
        }
        let bad = try write("{not json")
        XCTAssertThrowsError(try LayerSensitivity.read(bad)) { XCTAssertEqual(($0 as? SMoEError)?.file, bad) }
        let negative = try write(doc(names.map { ($0, "-1") }))
        XCTAssertThrowsError(try LayerSensitivity.read(negative)) { XCTAssertEqual(($0 as? SMoEError)?.file, negative) }
        let other = try LayerSensitivity.read(try write(doc(names.map { ($0, "1") } + [("x.mlp", "1")])))
        XCTAssertThrowsError(try other.validate(allLayers: names)) { XCTAssertEqual(($0 as? SMoEError)?.file, other.path) }
        let short = try LayerSensitivity.read(try write(doc(names.dropLast().map { ($0, "1") })))
        XCTAssertThrowsError(try short.validate(allLayers: names)) {
            XCTAssertEqual(($0 as? SMoEError)?.file, short.path)
            XCTAssertTrue("\($0)".contains(names.last!), "\($0)")
        }
    }

    /// Per-layer merge or prune (issue 27): with pruning candidates the knapsack runs over the
    /// union of both kinds of option, so the plan's objective is at most the best merge-only and
    /// the best prune-only plan chosen from the same measured options (both recomputed here from
    /// the plan's candidates); the run applies the plan: pruned layers come out compact (G router
    /// rows, no expert map), merged ones keep the E slots, and the bytes are the planned ones.
    func testPerLayerMergeOrPrune() throws {
        var settings = CompressSettings(merge: MergeSettings(groups: 1, prune: .reap), lowRank: nil)
        var planner = PlannerSettings(target: .fraction(0.3), groupCandidates: [2, 4, 6])
        planner.levels = 4
        settings.target = planner
        let stage = try CompressStage(model: model, calibration: calib, evaluation: heldout, stats: nil, settings: settings, storage: .f16)
        let plan = try XCTUnwrap(stage.plan)
        XCTAssertEqual(plan.settings.prune, .reap)
        let g = LayerGrouping(groups: [[0]], dominant: [0])
        let options = plan.candidates.map { $0.map { SizePlanner.Option(groups: $0.groups, grouping: g, ranks: [:], bytes: $0.bytes, error: $0.error) } }
        XCTAssertTrue(plan.candidates.allSatisfy { c in c.contains { $0.method == "prune reap" } && c.contains { $0.method == "merge" } })
        func best(_ keep: (PlanCandidate) -> Bool) -> Double? {
            let allowed = plan.candidates.map { c in c.indices.filter { keep(c[$0]) } }
            let costs = options.map { $0.map(\.error) }
            return SizePlanner.choose(options, costs: costs, allowed: allowed, budget: plan.budget).map { ch in
                zip(options, ch).reduce(0.0) { $0 + $1.0[$1.1].error }
            }
        }
        let total = plan.layers.reduce(0.0) { $0 + $1.estimatedError }
        let mergeOnly = try XCTUnwrap(best { $0.method == "merge" }), pruneOnly = try XCTUnwrap(best { $0.method != "merge" })
        XCTAssertLessThanOrEqual(total, min(mergeOnly, pruneOnly) + 1e-12)
        let report = stage.report(try stage.run(model: model) { _ in }.reports)
        XCTAssertEqual(report.bytesFinal, plan.bytes)
        XCTAssertLessThanOrEqual(report.bytesFinal, plan.budget)
        for (l, r) in zip(plan.layers, report.layers) {
            XCTAssertEqual(r.merge?.prune != nil, l.prune != nil, l.name)
            if l.prune != nil { XCTAssertEqual(r.merge?.prune?.kept, l.grouping.dominant, l.name) }
        }
    }

    /// Merge-only, prune-only and the per-layer choice from the same measured options, known
    /// answers. Two layers of 4 experts, 100 B each unmerged, budget 100 B (fraction 0.5 of 200):
    /// layer a merged to 2: 50 B, error 0.3; pruned to 2: 50 B, 0.2; layer b merged 0.1, pruned
    /// 0.4; both unmerged: 100 B, error 0. Merge-only: both merged, 0.4; prune-only: both pruned,
    /// 0.6 (one layer unmerged and the other at 0 B does not exist); per layer: a pruned, b
    /// merged, 0.3. The unmerged layer (G = E) is allowed in all three.
    /// The cross-validated choice between methods on constructed options whose check errors are
    /// given (nothing is measured): the per-layer plan is the knapsack's best on the split, but a
    /// pure plan with a lower cross-validated objective is taken; on a tie the per-layer plan.
    func testCrossValidatedChoiceTakesTheLowestMeanOverFolds() throws {
        func option(_ g: Int, _ bytes: Int, _ e: Double, _ prune: PruneMethod? = nil, check: [Double]) -> SizePlanner.Option {
            var o = SizePlanner.Option(groups: g, grouping: LayerGrouping(groups: (0..<g).map { [$0] }, dominant: Array(0..<g)), ranks: [:],
                                       bytes: bytes, error: e, prune: prune)
            o.checkErrors = check
            return o
        }
        // Layer a: merged 0.3 (folds 0.5, 0.5), pruned 0.2 (0.8, 0.6); layer b: merged 0.1 (0.2, 0.2),
        // pruned 0.4 (0.2, 0.4). Split: per-layer 0.3 (prune a, merge b), merge-only 0.4, prune-only 0.6.
        // Folds: per-layer 0.7 + 0.2 = 0.9, merge-only 0.5 + 0.2 = 0.7, prune-only 0.7 + 0.3 = 1.0.
        let layer = [option(4, 100, 0, check: [0, 0])]
        var measured = SizePlanner.Measurements(
            names: ["a", "b"], frequency: [[], []], similarity: [[], []], experts: [4, 4], originals: [100, 100],
            options: [layer + [option(2, 50, 0.3, check: [0.5, 0.5]), option(2, 50, 0.2, .frequency, check: [0.8, 0.6])],
                      layer + [option(2, 50, 0.1, check: [0.2, 0.2]), option(2, 50, 0.4, .frequency, check: [0.2, 0.4])]],
            prune: .frequency, pruneRefit: true)
        var settings = PlannerSettings(target: .fraction(0.5))
        settings.checkFolds = 2
        func choose() throws -> SizePlan {
            try SizePlanner.choose(&measured, settings: settings, model: model, calibration: calib, merge: MergeSettings(groups: 1),
                                   lowRank: LowRankOptions(rank: .fixed(1)), storage: .f16)
        }
        let plan = try choose()
        XCTAssertEqual(plan.checks.map(\.methods), [.both, .merge, .prune])
        for (c, want) in zip(plan.checks.map(\.objective), [0.3, 0.4, 0.6]) { XCTAssertEqual(c, want, accuracy: 1e-12, "split objective") }
        for (c, want) in zip(plan.checks.map(\.crossValidated), [0.9, 0.7, 1.0]) { XCTAssertEqual(c, want, accuracy: 1e-12) }
        XCTAssertEqual(plan.taken, .merge)
        XCTAssertEqual(plan.layers.map(\.method), ["merge", "merge"])
        XCTAssertEqual(plan.settings.methods, .both, "the plan stays a per-layer choice's")
        XCTAssertEqual(plan.bytes, 100)
        // A tie goes to the per-layer plan; one fold (or methods other than both) is the knapsack's plan.
        measured.options[0][2].checkErrors = [0.4, 0.4]
        XCTAssertEqual(try choose().taken, .both)
        settings.checkFolds = 1
        XCTAssertEqual(try choose().layers.map(\.method), ["prune frequency", "merge"])
        XCTAssertTrue(try choose().checks.isEmpty)
        settings.checkFolds = 0
        XCTAssertThrowsError(try choose()) { XCTAssertEqual(($0 as? SMoEError)?.setting, .targetSize) }
    }

    /// The cross-validated choice on trained-switch at half size with frequency pruning: every
    /// option of the three plans is measured once per contiguous fifth of the calibration tokens
    /// (recomputed here for layer 0's taken option from the tokens split by hand), and the plan
    /// taken is the lowest by the mean over the fifths.
    func testCrossValidatedChoiceOnAFixture() throws {
        var planner = PlannerSettings(target: .fraction(0.5), groupCandidates: [6, 7, 8])
        planner.prune = .frequency
        planner.levels = 8
        let merge = MergeSettings(groups: 1), lowRank = LowRankOptions(rank: .fixed(1))
        var measured = try SizePlanner.measure(model: model, calibration: calib, stats: nil, merge: merge, lowRank: lowRank,
                                               settings: planner, storage: .f16)
        let plan = try SizePlanner.choose(&measured, settings: planner, model: model, calibration: calib, merge: merge,
                                          lowRank: lowRank, storage: .f16)
        XCTAssertEqual(plan.checks.map(\.methods), [.both, .merge, .prune])
        for (i, m) in [PlanMethods.merge, .prune].enumerated() {
            var s = planner
            s.methods = m
            XCTAssertEqual(plan.checks[i + 1].objective, try SizePlanner.choose(measured, settings: s).objective, accuracy: 1e-12)
        }
        XCTAssertLessThanOrEqual(plan.checks[0].objective, min(plan.checks[1].objective, plan.checks[2].objective) + 1e-12)
        let lowest = try XCTUnwrap(plan.checks.min { $0.crossValidated < $1.crossValidated })
        XCTAssertEqual(plan.taken, lowest.methods)
        XCTAssertEqual(plan.objective, lowest.objective, accuracy: 1e-12)
        XCTAssertLessThanOrEqual(plan.bytes, plan.budget)
        // Only the three plans' options were checked (at most 3 per layer), each once per fifth.
        for (l, options) in measured.options.enumerated() {
            XCTAssertEqual(options[plan.choice[l]].checkErrors.count, 5, "layer \(l)")
            XCTAssertLessThanOrEqual(options.filter { !$0.checkErrors.isEmpty }.count, 3, "layer \(l)")
            XCTAssertTrue(options.allSatisfy { [0, 5].contains($0.checkErrors.count) }, "layer \(l)")
        }
        // Layer 0's option, fitted on four fifths and measured on the fifth left, by hand.
        let name = measured.names[0], o = measured.options[0][plan.choice[0]], original = try model.readLayer(name)
        var parts: [Matrix] = []
        try calib.forEachBlock(name) { _, x in parts.append(x) }
        let x = Matrix.vstack(parts), n = x.rows, fifth = (n + 4) / 5
        var errors: [Double] = []
        for k in 0..<5 {
            let held = Array((k * fifth)..<min((k + 1) * fifth, n)), fitRows = (0..<n).filter { !held.contains($0) }
            let fit: TokenBlocks = { body in try body(x.gatherRows(fitRows)) }
            var layer: MoELayer
            if let method = o.prune {
                let kept = Pruning.keep(try Pruning.saliency(LayerSource(original), method: method, tokens: fit).saliency, groups: o.groups)
                layer = try CompactRefit.refit(try Pruning.pruned(LayerSource(original), kept: kept), original: LayerSource(original),
                                               slotGroups: (0..<original.config.numExperts).map { kept.firstIndex(of: $0) ?? -1 },
                                               tokens: fit, ridge: merge.merging.refitRidge).layer
            } else {
                var ms = merge
                ms.groups = o.groups
                layer = try MergeStage.apply(original, grouping: o.grouping, frequency: measured.frequency[0], settings: ms, tokens: fit).layer
            }
            layer = layer.roundedForStorage(.f16)
            if !o.ranks.isEmpty {
                var lr = lowRank
                lr.ranks = o.ranks
                layer = try LowRankStage.compressLayer(layer, options: lr, whitenOn: fit).0.roundedForStorage(.f16)
            }
            let h = x.gatherRows(held), y0 = original.forward(h, routing: original.route(h)), y = layer.forward(h, routing: layer.route(h))
            let num = zip(y.data, y0.data).reduce(0.0) { $0 + Double($1.0 - $1.1) * Double($1.0 - $1.1) }
            errors.append((num / y0.data.reduce(0.0) { $0 + Double($1) * Double($1) }).squareRoot())
        }
        // Fold f holds apart chunk class 4 − f, the last fifth first. Float32 sums over the fitting
        // tokens in another blocking: agreement to 1e-4 relative.
        for (got, want) in zip(o.checkErrors, errors.reversed()) { XCTAssertEqual(got, want, accuracy: 1e-4 * want) }
        // A second choice (another budget) measures only options not checked yet.
        let before = measured.options.map { $0.map(\.checkErrors) }
        planner.target = .fraction(0.5)
        _ = try SizePlanner.choose(&measured, settings: planner, model: model, calibration: calib, merge: merge, lowRank: lowRank, storage: .f16)
        XCTAssertEqual(measured.options.map { $0.map(\.checkErrors) }, before)
    }

    func testMergeOnlyPruneOnlyAndPerLayerChoiceFromOneMeasurement() throws {
        func option(_ g: Int, _ bytes: Int, _ e: Double, _ prune: PruneMethod? = nil) -> SizePlanner.Option {
            SizePlanner.Option(groups: g, grouping: LayerGrouping(groups: (0..<g).map { [$0] }, dominant: Array(0..<g)), ranks: [:],
                               bytes: bytes, error: e, prune: prune)
        }
        let layer = [option(4, 100, 0)]
        let measured = SizePlanner.Measurements(
            names: ["a", "b"], frequency: [[], []], similarity: [[], []], experts: [4, 4], originals: [100, 100],
            options: [layer + [option(2, 50, 0.3), option(2, 50, 0.2, .frequency)], layer + [option(2, 50, 0.1), option(2, 50, 0.4, .frequency)]],
            prune: .frequency, pruneRefit: true)
        var settings = PlannerSettings(target: .fraction(0.5))
        var chosen: [PlanMethods: [String]] = [:]
        var errors: [PlanMethods: Double] = [:]
        for m in PlanMethods.allCases {
            settings.methods = m
            let plan = try SizePlanner.choose(measured, settings: settings)
            chosen[m] = plan.layers.map(\.method)
            errors[m] = plan.layers.reduce(0) { $0 + $1.estimatedError }
            XCTAssertEqual(plan.bytes, 100)
        }
        XCTAssertEqual(chosen[.merge], ["merge", "merge"])
        XCTAssertEqual(chosen[.prune], ["prune frequency", "prune frequency"])
        XCTAssertEqual(chosen[.both], ["prune frequency", "merge"])
        XCTAssertEqual(errors[.merge]!, 0.4, accuracy: 1e-12)
        XCTAssertEqual(errors[.prune]!, 0.6, accuracy: 1e-12)
        XCTAssertEqual(errors[.both]!, 0.3, accuracy: 1e-12)
        // With 200 B both layers stay unmerged under every method.
        settings.target = .fraction(1)
        for m in PlanMethods.allCases {
            settings.methods = m
            XCTAssertEqual(try SizePlanner.choose(measured, settings: settings).layers.map(\.groups), [4, 4])
        }
        // A prune-only plan needs measured pruning.
        let mergeOnly = SizePlanner.Measurements(names: ["a"], frequency: [[]], similarity: [[]], experts: [4], originals: [100],
                                                 options: [layer], prune: nil, pruneRefit: true)
        settings.methods = .prune
        XCTAssertThrowsError(try SizePlanner.choose(mergeOnly, settings: settings))
    }

    /// The noise-aware choice (`PlannerSettings.noiseTolerance`), known answers. Layer a, 4
    /// experts, 4 held-apart chunks with Σ‖y₀‖² = 1 each (R = 4): merged to 2, dense, 50 B, chunk
    /// errors (0.04, 0, 0.04, 0), E = √(0.08/4) = 0.1414; at its 4 experts factored, 50 B,
    /// (0, 0.05, 0, 0.05), E = √(0.1/4) = 0.1581; merged to 3, dense, 50 B, 0.5 each, E = 0.7071;
    /// at 4 experts dense, 100 B, error 0. Layer b: one option, 50 B. Budget 100 B. The knapsack
    /// takes a's G 2 (0.1414). The paired standard error of (G 4 factored − G 2) by the delta
    /// method: per chunk φ = (s − E²)/(2·E·R), differences ±(0.02/(8·0.1414) + 0.025/(8·0.1581))
    /// = ±0.03744, SE = √(4·0.03744²) = 0.07488 > 0.0167 = the difference, so with one standard
    /// error the layer keeps its 4 experts (factored); G 3 is 0.566 worse against an SE of 0.0354
    /// (never within noise), and a's dense G 4 does not fit beside b: never over the budget.
    func testNoiseAwareChoiceKeepsMoreExpertsWithinOneStandardError() throws {
        func option(_ g: Int, _ bytes: Int, _ tokens: [Double], ranks: [String: Int] = [:]) -> SizePlanner.Option {
            SizePlanner.Option(groups: g, grouping: LayerGrouping(groups: (0..<g).map { [$0] }, dominant: Array(0..<g)), ranks: ranks,
                               bytes: bytes, error: (tokens.reduce(0, +) / 4).squareRoot(), chunkErrors: tokens)
        }
        let a = [option(2, 50, [0.04, 0, 0.04, 0]), option(4, 50, [0, 0.05, 0, 0.05], ranks: ["w1": 3]),
                 option(3, 50, [0.5, 0.5, 0.5, 0.5]), option(4, 100, [0, 0, 0, 0])]
        let b = [option(2, 50, [0.01, 0.01, 0.01, 0.01])]
        let references = [[Double]](repeating: [1, 1, 1, 1], count: 2)
        let measured = SizePlanner.Measurements(names: ["a", "b"], frequency: [[], []], similarity: [[], []], experts: [4, 4],
                                                originals: [100, 100], options: [a, b], chunkReferences: references,
                                                prune: nil, pruneRefit: true)
        let se = SizePlanner.pairedStandardError(a[1], a[0], slopeA: 1, slopeB: 1, references: references[0])
        // Tolerance: the value above, rounded to five digits in the comment; the formula exactly.
        XCTAssertEqual(se, 2 * (0.02 / (8 * 0.02.squareRoot()) + 0.025 / (8 * 0.025.squareRoot())), accuracy: 1e-12)
        XCTAssertEqual(se, 0.07488, accuracy: 1e-5)
        XCTAssertEqual(SizePlanner.pairedStandardError(a[2], a[0], slopeA: 1, slopeB: 1, references: references[0]),
                       2 * 0.02 / (8 * 0.02.squareRoot()), accuracy: 1e-12)
        var settings = PlannerSettings(target: .fraction(0.5))
        settings.noiseTolerance = 0
        let exact = try SizePlanner.choose(measured, settings: settings)
        XCTAssertEqual(exact.layers.map(\.groups), [2, 2])
        XCTAssertEqual(exact.layers[0].ranks, [:])
        settings.noiseTolerance = 1
        let aware = try SizePlanner.choose(measured, settings: settings)
        XCTAssertEqual(aware.layers.map(\.groups), [4, 2])
        XCTAssertEqual(aware.layers[0].ranks, ["w1": 3])
        XCTAssertLessThanOrEqual(aware.bytes, aware.budget)
        XCTAssertEqual(aware.layers[0].estimatedError, 0.025.squareRoot(), accuracy: 1e-12)
        XCTAssertEqual(PlannerSettings(target: .fraction(0.5)).noiseTolerance, 0, "off by default")
        // A tolerance of 0.2 SE (0.0150 < 0.0167) keeps the knapsack's choice; a large one still
        // never takes G 4 dense (no room) and never exceeds the budget.
        settings.noiseTolerance = 0.2
        XCTAssertEqual(try SizePlanner.choose(measured, settings: settings).layers.map(\.groups), [2, 2])
        settings.noiseTolerance = 100
        let loose = try SizePlanner.choose(measured, settings: settings)
        XCTAssertEqual(loose.layers[0].bytes, 50)
        XCTAssertLessThanOrEqual(loose.bytes, loose.budget)
        settings.noiseTolerance = -1
        XCTAssertThrowsError(try SizePlanner.choose(measured, settings: settings)) { XCTAssertEqual(($0 as? SMoEError)?.setting, .targetSize) }
        settings.noiseTolerance = 1
        settings.folds = 6
        XCTAssertThrowsError(try SizePlanner.choose(measured, settings: settings)) { XCTAssertEqual(($0 as? SMoEError)?.setting, .targetSize) }
        // With fold errors the standard error is that of the mean paired difference across folds:
        // a's G 2 at (0.10, 0.20, 0.12) (mean 0.14), G 4 factored at (0.16, 0.18, 0.14) (mean
        // 0.16): differences (0.06, −0.02, 0.02), mean 0.02, SD 0.04, SE 0.04/√3 = 0.0231 ≥ 0.02:
        // G 4 factored. Folds (0.16, 0.26, 0.18) (mean 0.2; differences all 0.06, SE 0): G 2 stays.
        func folded(_ g: Int, _ bytes: Int, _ folds: [Double], ranks: [String: Int] = [:]) -> SizePlanner.Option {
            SizePlanner.Option(groups: g, grouping: LayerGrouping(groups: (0..<g).map { [$0] }, dominant: Array(0..<g)), ranks: ranks,
                               bytes: bytes, error: folds.reduce(0, +) / Double(folds.count), foldErrors: folds)
        }
        XCTAssertEqual(SizePlanner.foldStandardError([0.16, 0.18, 0.14], [0.10, 0.20, 0.12])!, 0.04 / 3.0.squareRoot(), accuracy: 1e-12)
        for (g4, expected) in [([0.16, 0.18, 0.14], 4), ([0.16, 0.26, 0.18], 2)] {
            let m = SizePlanner.Measurements(names: ["a", "b"], frequency: [[], []], similarity: [[], []], experts: [4, 4],
                                             originals: [100, 100],
                                             options: [[folded(2, 50, [0.10, 0.20, 0.12]), folded(4, 50, g4, ranks: ["w1": 3]),
                                                        folded(4, 100, [0, 0, 0])], [folded(2, 50, [0.1, 0.1, 0.1])]],
                                             prune: nil, pruneRefit: true)
            var s3 = PlannerSettings(target: .fraction(0.5))
            s3.folds = 3
            s3.noiseTolerance = 1
            let plan = try SizePlanner.choose(m, settings: s3)
            XCTAssertEqual(plan.layers.map(\.groups), [expected, 2], "G 4 folds \(g4)")
            XCTAssertLessThanOrEqual(plan.bytes, plan.budget)
        }
    }

    /// A compact plan never goes below top_k experts: on trained-mixtral (top-2) at 10 % with
    /// G 1 or 2 allowed, the plan used to pick G 1 (the compact router then refused it); now G 2
    /// in every layer, within the budget.
    func testCompactPlanKeepsTopKExperts() throws {
        let mixtral = try CheckpointReader(fixture("trained-mixtral.h5"))
        let mixtralCalib = try CalibrationReader(fixture("trained-mixtral.calib.h5"))
        var settings = CompressSettings(merge: MergeSettings(groups: 1, router: .compact), lowRank: nil)
        var planner = PlannerSettings(target: .fraction(0.1), groupCandidates: [1, 2], uniformGroups: true)
        planner.levels = 16
        settings.target = planner
        let plan = try XCTUnwrap(CompressStage(model: mixtral, calibration: mixtralCalib, stats: nil, settings: settings, storage: .f16).plan)
        XCTAssertEqual(plan.layers.map(\.groups), [2, 2, 2, 2])
        XCTAssertLessThanOrEqual(plan.bytes, plan.budget)
    }
}
