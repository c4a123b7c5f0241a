import Foundation
import SMoECompress

/// The "merge or prune?" rows of `smoe-bench fidelity` (issue 27): at G = E/2 and G = E/4
/// experts per layer (50 % and 25 % of the expert bytes), the held-out mean layer output error
/// of the merge methods (E router slots, and compact) beside REAP and frequency pruning with and
/// without the refit of the kept experts; calibration on `calib`, measured on `heldout`. Then
/// `--target-size F` at the same fractions with pruning (each method, refitted) measured beside
/// merging, chosen three ways from one measurement: merge-only, prune-only, per-layer choice
/// (`fp8`: every dense option also in FP8, `--fp8`).
func mergeOrPruneRows(model: CheckpointReader, calib: CalibrationReader, heldout: CalibrationReader, storage: StorageType,
                      fractions: [Double] = [0.5, 0.25], split: (chunk: Int, every: Int)? = nil, tolerances: [Double]? = nil,
                      plansOnly: Bool = false, folds: Int? = nil, fp8: Bool = false) throws {
    let experts = model.layers.map(\.numExperts).max() ?? 1
    let rows: [(String, (Int) -> MergeSettings)] = [
        ("merge frequency (slots)", { MergeSettings(groups: $0, merging: MergeOptions(method: .frequency)) }),
        ("merge regmean+refit (slots)", { MergeSettings(groups: $0) }),
        ("merge regmean+refit, compact", { MergeSettings(groups: $0, router: .compact) }),
        ("prune reap, no refit", { MergeSettings(groups: $0, compactRefit: false, prune: .reap) }),
        ("prune reap + refit", { MergeSettings(groups: $0, prune: .reap) }),
        ("prune frequency, no refit", { MergeSettings(groups: $0, compactRefit: false, prune: .frequency) }),
        ("prune frequency + refit", { MergeSettings(groups: $0, prune: .frequency) }),
    ]
    let counts = [experts / 2, experts / 4].filter { g in g >= 1 && model.layers.allSatisfy { $0.topK <= g } }
    if !plansOnly { printRow("  merge or prune? (held-out mean layer error) " + counts.map { "G=\($0)" }.joined(separator: "      ")) }
    for (label, settings) in rows where !plansOnly {
        var line = "  " + label.padding(toLength: 32, withPad: " ", startingAt: 0)
        for g in counts {
            let stage = try CompressStage(model: model, calibration: calib, evaluation: heldout, stats: nil,
                                          settings: CompressSettings(merge: settings(g), lowRank: nil), storage: storage)
            let report = stage.report(try stage.run(model: model) { _ in }.reports)
            line += String(format: "  %.4f", report.evaluation.meanRelativeError)
        }
        printRow(line)
    }
    // The planner's three choices from the same measured options (default objective).
    printRow("  plans (held-out mean layer error, planned in brackets; per layer m = merged, p = pruned, G)  " + fractions.map { "F=\($0)" }.joined(separator: "   "))
    for method in [PruneMethod.frequency, .reap] {
        let merge = MergeSettings(groups: 1, prune: method)
        let template = LowRankOptions(rank: .fixed(1), floatBytes: storage.byteSize)
        var base = PlannerSettings(target: .fraction(fractions.first ?? 0.5))
        base.prune = method
        if let (chunk, every) = split { base.chunkTokens = chunk; base.heldOutEvery = every }
        if let k = folds { base.folds = k }
        base.fp8 = fp8
        let merged = MergeSettings(groups: 1)
        var measured = try SizePlanner.measure(model: model, calibration: calib, stats: nil, merge: merged, lowRank: template,
                                               settings: base, storage: storage)
        for tolerance in tolerances ?? [base.noiseTolerance] {
        for methods in PlanMethods.allCases.reversed() {
            var line = "  " + "plan \(methods.label) (\(method.rawValue) + refit)".padding(toLength: 44, withPad: " ", startingAt: 0)
            if tolerances != nil { line += String(format: " tol %.2f", tolerance) }
            for f in fractions {
                var ps = base
                ps.target = .fraction(f)
                ps.methods = methods
                ps.noiseTolerance = tolerance
                // The per-layer choice as `compress` makes it: checked against the pure plans by
                // cross-validation (`PlannerSettings.checkFolds`); the pure plans as the knapsack chose them.
                let plan = methods == .both
                    ? try SizePlanner.choose(&measured, settings: ps, model: model, calibration: calib, merge: merged, lowRank: template, storage: storage)
                    : try SizePlanner.choose(measured, settings: ps)
                var settings = CompressSettings(merge: merge, lowRank: template)
                settings.target = ps
                let stage = try CompressStage(model: model, calibration: calib, evaluation: heldout, stats: nil, settings: settings,
                                              storage: storage, plan: plan)
                let report = stage.report(try stage.run(model: model) { _ in }.reports)
                let layers = plan.layers.map { "\($0.prune == nil ? "m" : "p")\($0.groups)" + ($0.ranks.isEmpty ? "" : "r") + ($0.encoding.isFP8 ? "f8" : "") }.joined(separator: ",")
                line += String(format: "  %.4f (%.4f) ", report.evaluation.meanRelativeError, plan.meanEstimatedError) + layers
                if let taken = plan.taken {
                    line += " [took \(taken.rawValue); cv " + plan.checks.map { String(format: "%.4f", $0.crossValidated) }.joined(separator: "/") + "]"
                }
                if tolerances != nil {
                    line += " [" + zip(plan.layers, report.layers).map { l, r in
                        "\(l.bytes)B " + String(format: "%.4f→%.4f", l.estimatedError, r.final.relativeError) }.joined(separator: "; ") + "]"
                }
            }
            printRow(line)
        }
        }
    }
}
