import Foundation
import SMoECompress

/// Fidelity at a memory budget (issue 17) on the bundled trained fixtures: a uniform sweep of
/// `compress --groups G --rank r` (and merge alone, r = dense), then `compress --target-size F`
/// for F = 0.5 and 0.25, every figure the mean relative layer output error on the held-out
/// capture (`.heldout.h5`; calibration on `.calib.h5`). Also the low-rank objective (weight SVD
/// against whitened at three ridges) at merge 4 + rank 16 and 32.
/// First the "merge or prune?" rows (`MergeOrPrune.swift`).
/// Options: `--fixtures DIR` (default: Fixtures), `--fractions 0.5,0.25`, `--ranks 4,8,...`,
/// `--merge-or-prune` (those rows only), `--split C/N` (the plans hold every N-th chunk of C
/// tokens apart), `--splits` (only the planner's held-apart splits with the
/// bundled sensitivities, `splitRows`), `--fixture NAME` (one of the two only), `--plans-only`
/// (with `--merge-or-prune`: the planner's three plans only), `--tolerances 0,1` (each plan also
/// chosen with these `PlannerSettings.noiseTolerance`s, from the same measurement, with the
/// per-layer bytes and planned → held-out errors), `--folds K` (`PlannerSettings.folds`).
/// Beside the grid's rows at each fraction, the end-to-end held-out loss of the merge-alone, best
/// grid, planner and `--sensitivity --fp8` planner checkpoints and of the original (`EndToEndLoss`: the release smoe-compress and
/// tools/eval_loss.py, every `--loss-every K`-th window, default 4; skipped, saying why, without
/// torch and transformers; `--no-loss` skips it).
func fidelityBench(_ args: [String]) throws {
    func value(_ name: String) -> String? {
        guard let i = args.firstIndex(of: name), i + 1 < args.count else { return nil }
        return args[i + 1]
    }
    let dir = value("--fixtures") ?? "Fixtures"
    let fractions = (value("--fractions") ?? "0.5,0.25").split(separator: ",").compactMap { Double($0) }
    let split = value("--split").map { $0.split(separator: "/").compactMap { Int($0) } }.flatMap { $0.count == 2 ? ($0[0], $0[1]) : nil }
    let ranks = (value("--ranks") ?? "4,8,12,16,20,24,32,40").split(separator: ",").compactMap { Int($0) }
    let tolerances = value("--tolerances").map { $0.split(separator: ",").compactMap { Double($0) } }
    let lossEvery = value("--loss-every").flatMap { Int($0) } ?? 4
    for name in ["trained-switch", "trained-mixtral"] where value("--fixture").map({ $0 == name }) ?? true {
        let model = try CheckpointReader("\(dir)/\(name).h5")
        let calib = try CalibrationReader("\(dir)/\(name).calib.h5")
        let heldout = try CalibrationReader("\(dir)/\(name).heldout.h5")
        let storage = StorageType.f16  // the fixtures store float16; `compress` keeps the input type
        func run(_ settings: CompressSettings) throws -> (bytes: Int, error: Double, plan: SizePlan?) {
            let stage = try CompressStage(model: model, calibration: calib, evaluation: heldout, stats: nil, settings: settings,
                                          storage: storage)
            let report = stage.report(try stage.run(model: model) { _ in }.reports)
            return (report.bytesFinal, report.evaluation.meanRelativeError, stage.plan)
        }
        let experts = model.layers.map(\.numExperts).max() ?? 1
        print("\n\(name) (held-out mean layer output error; expert bytes as stored, float16)")
        if args.contains("--splits") {
            try splitRows(model: model, calib: calib, heldout: heldout, storage: storage, fractions: fractions,
                          sensitivity: try LayerSensitivity.read("\(dir)/\(name).sensitivity.json"))
            continue
        }
        try mergeOrPruneRows(model: model, calib: calib, heldout: heldout, storage: storage, fractions: fractions, split: split,
                              tolerances: tolerances, plansOnly: args.contains("--plans-only"),
                              folds: value("--folds").flatMap { Int($0) }, fp8: args.contains("--fp8"))
        if args.contains("--merge-or-prune") { continue }
        // The low-rank objective.
        for r in [16, 32] {
            var row = "  merge 4 + rank \(r):"
            for (label, objective, ridge) in [("weight SVD", LowRankObjective.weight, 0.0), ("whitened 1e-3", .output, 1e-3),
                                              ("1e-2", .output, 1e-2), ("1e-1", .output, 1e-1)] {
                var o = LowRankOptions(rank: .fixed(r), objective: objective)
                o.whiteningRidge = ridge
                let res = try run(CompressSettings(merge: MergeSettings(groups: 4), lowRank: o))
                row += "  \(label) \(String(format: "%.4f", res.error))"
            }
            printRow(row)
        }
        // The uniform grid.
        var grid: [(groups: Int, rank: Int?, bytes: Int, error: Double)] = []
        for g in 1...experts {
            for r in [nil] + ranks.map(Optional.some) {
                let res = try run(CompressSettings(merge: MergeSettings(groups: g), lowRank: r.map { LowRankOptions(rank: .fixed($0)) }))
                grid.append((g, r, res.bytes, res.error))
            }
        }
        let original = try model.layers.reduce(0) { $0 + (try model.summary($1.name).expertFileBytes) }
        let (e2e, skipped) = args.contains("--no-loss") ? (nil, "--no-loss") : EndToEndLoss.make(fixture: "\(dir)/\(name).h5", every: lossEvery)
        defer { e2e?.remove() }
        if let e2e {
            printRow(String(format: "  end-to-end held-out loss (tools/eval_loss.py, every %dth window, nats/byte): original %.4f", lossEvery, e2e.original))
        } else {
            printRow("  end-to-end loss: skipped (\(skipped))")
        }
        printRow("  grid: G 1…\(experts) × rank {dense, \(ranks.map(String.init).joined(separator: ", "))}, \(grid.count) points; original \(original) B")
        printRow("  target   budget B  merge alone (G, err)   best grid point (G, rank, bytes, err)   planner (ranks per layer, bytes, err)   planner s")
        for f in fractions {
            let budget = Int((f * Double(original)).rounded(.down))
            let fits = grid.filter { $0.bytes <= budget }
            let mergeOnly = fits.filter { $0.rank == nil }.min { $0.error < $1.error }
            let best = fits.min { $0.error < $1.error }
            var settings = CompressSettings(merge: MergeSettings(groups: 1), lowRank: nil)
            settings.target = PlannerSettings(target: .fraction(f))
            let (planned, seconds) = try timed { try run(settings) }
            let perLayer = planned.plan!.layers.map { "G\($0.groups) r\($0.rankSummary)" }.joined(separator: "; ")
            func fmt(_ e: Double?) -> String { e.map { String(format: "%.4f", $0) } ?? "-" }
            printRow("  \(f)  \(budget)  " + (mergeOnly.map { "G\($0.groups) \(fmt($0.error))" } ?? "none")
                     + "   " + (best.map { "G\($0.groups) r\($0.rank.map(String.init) ?? "dense") \($0.bytes) \(fmt($0.error))" } ?? "none")
                     + "   [\(perLayer)] \(planned.bytes) \(fmt(planned.error))   \(String(format: "%.1f", seconds))")
            if let e2e {
                func measured(_ label: String, _ args: [String]?) throws -> String {
                    guard let args else { return "\(label) -" }
                    let r = try e2e.compressed(model: "\(dir)/\(name).h5", calib: "\(dir)/\(name).calib.h5", heldout: "\(dir)/\(name).heldout.h5", args)
                    return "\(label) " + String(format: "%.4f (err %.4f)", r.loss, r.error)
                }
                let rows = [try measured("merge alone", mergeOnly.map { ["--groups", "\($0.groups)"] }),
                            try measured("best grid point", best.map { b in ["--groups", "\(b.groups)"] + (b.rank.map { ["--rank", "\($0)"] } ?? []) }),
                            try measured("planner", ["--target-size", "\(f)"]),
                            // The plan of issue 28's criteria: weighted by the bundled sensitivities, FP8 options.
                            try measured("planner --sensitivity --fp8", ["--target-size", "\(f)", "--sensitivity", "\(dir)/\(name).sensitivity.json", "--fp8"])]
                printRow("    loss at \(f): " + rows.joined(separator: ", ") + String(format: "; original %.4f", e2e.original))
            }
        }
    }
}

/// How the planner's held-apart split changes its estimates and plans (issue 28): per split
/// (chunk tokens, every n-th chunk held apart), `--target-size F --sensitivity` planned, then
/// compressed and measured on the held-out capture; per layer the planned and the measured
/// error, and Σ c·e² of both (the predicted loss increase).
func splitRows(model: CheckpointReader, calib: CalibrationReader, heldout: CalibrationReader, storage: StorageType,
               fractions: [Double], sensitivity: LayerSensitivity) throws {
    let tokens = try calib.info(model.layers[0].name).numTokens
    let splits = [(64, 5), (128, 4), (128, 8), ((tokens + 4) / 5, 5)]
    printRow("  split (chunk/every)  F  planned Σc·e²  held-out Σc·e²  per layer: plan planned→held-out")
    for (chunk, every) in splits {
        for f in fractions {
            var ps = PlannerSettings(target: .fraction(f), sensitivity: sensitivity)
            ps.chunkTokens = chunk
            ps.heldOutEvery = every
            var settings = CompressSettings(merge: MergeSettings(groups: 1), lowRank: LowRankOptions(rank: .fixed(1), floatBytes: storage.byteSize))
            settings.target = ps
            let stage = try CompressStage(model: model, calibration: calib, evaluation: heldout, stats: nil, settings: settings, storage: storage)
            let report = stage.report(try stage.run(model: model) { _ in }.reports)
            let plan = stage.plan!
            let measured = zip(plan.layers, report.layers).reduce(0.0) { $0 + sensitivity.weights[$1.0.name]! * $1.1.final.relativeError * $1.1.final.relativeError }
            let layers = zip(plan.layers, report.layers).map { l, r in
                "G\(l.groups) r\(l.rankSummary) " + String(format: "%.3f→%.3f", l.estimatedError, r.final.relativeError)
            }.joined(separator: "; ")
            printRow("  \(chunk)/\(every)  \(f)  " + String(format: "%.4f  %.4f  ", plan.objective, measured) + layers
                     + String(format: "  (bytes %d, mean held-out %.4f)", report.bytesFinal, report.evaluation.meanRelativeError))
        }
    }
}
