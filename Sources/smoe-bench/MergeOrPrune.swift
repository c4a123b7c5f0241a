import Foundation
import SMoECompress

/// The "merge or prune?" rows of `smoe-bench fidelity` (issue 27): at G = E/2 and G = E/4
/// experts per layer (50 % and 25 % of the expert bytes), the held-out mean layer output error
/// of the merge methods (E router slots, and compact) beside REAP and frequency pruning with and
/// without the refit of the kept experts; calibration on `calib`, measured on `heldout`.
func mergeOrPruneRows(model: CheckpointReader, calib: CalibrationReader, heldout: CalibrationReader, storage: StorageType) throws {
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
    printRow("  merge or prune? (held-out mean layer error) " + counts.map { "G=\($0)" }.joined(separator: "      "))
    for (label, settings) in rows {
        var line = "  " + label.padding(toLength: 32, withPad: " ", startingAt: 0)
        for g in counts {
            let stage = try CompressStage(model: model, calibration: calib, evaluation: heldout, stats: nil,
                                          settings: CompressSettings(merge: settings(g), lowRank: nil), storage: storage)
            let report = stage.report(try stage.run(model: model) { _ in }.reports)
            line += String(format: "  %.4f", report.evaluation.meanRelativeError)
        }
        printRow(line)
    }
}
