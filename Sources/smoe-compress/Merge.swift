import ArgumentParser
import Foundation
import SMoECompress

/// Options shared by `merge` and `compress`.
struct MergeOptionGroup: ParsableArguments {
    @Option(help: "Groups (stored experts) per merged layer; with --adaptive, the average per merged layer.")
    var groups: Int

    @Option(help: "Routing statistics from `stats` (computed on the fly when absent).")
    var stats: String?

    @Option(help: "Similarity used to group: router-logits, weight, feature or expert-output (default: router-logits; expert-output with --method hierarchical).")
    var similarity: String?

    @Flag(help: "Share one budget of groups across layers (the paper's setting).")
    var adaptive = false

    @Option(help: "Grouping: dominant (MC-SMoE) or hierarchical (HC-SMoE average linkage).")
    var method: String = "dominant"

    @Option(help: "How a group becomes one expert: frequency, regmean or regmean+refit.")
    var mergeMethod: String = "regmean+refit"

    @Option(help: "RegMean off-diagonal scale α in [0, 1].")
    var regmeanAlpha: Double = 0.9

    @Option(help: "RegMean ridge, relative to the mean Gram diagonal.")
    var regmeanRidge: Double = 1e-2

    @Option(help: "Refit ridge, relative to the mean diagonal of the normal matrix.")
    var refitRidge: Double = 0.1

    @Option(help: "Comma-separated MoE layers to merge (default: all); others are copied unchanged.")
    var layers: String?

    @Flag(help: "Average members without aligning their neurons first (for comparison).")
    var noAlign = false

    @Option(help: "Use at most this many calibration tokens per layer.")
    var maxTokens: Int?

    @Option(help: "Calibration tokens per block (memory does not grow with N).")
    var blockSize: Int = 4096

    func validate() throws {
        guard groups >= 1 else { throw ValidationError("--groups must be at least 1") }
        guard GroupingMethod(rawValue: method) != nil else { throw ValidationError("--method must be dominant or hierarchical") }
        guard MergeMethod(rawValue: mergeMethod) != nil else { throw ValidationError("--merge-method must be frequency, regmean or regmean+refit") }
        if let s = similarity, SimilarityBase(rawValue: s) == nil {
            throw ValidationError("--similarity must be router-logits, weight, feature or expert-output")
        }
        if let m = maxTokens, m < 1 { throw ValidationError("--max-tokens must be at least 1") }
        guard blockSize >= 1 else { throw ValidationError("--block-size must be at least 1") }
    }

    var settings: MergeSettings {
        let grouping = GroupingMethod(rawValue: method)!
        return MergeSettings(
            groups: groups, adaptive: adaptive, grouping: grouping,
            similarity: similarity ?? (grouping == .hierarchical ? "expert-output" : "router-logits"),
            layers: layers.map { $0.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) } },
            merge: MergeOptions(method: MergeMethod(rawValue: mergeMethod)!, align: !noAlign, alpha: regmeanAlpha,
                                ridge: regmeanRidge, refitRidge: refitRidge, blockSize: blockSize))
    }
}

struct Merge: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Group experts the router treats alike, align them and merge each group into one expert.")

    @Argument(help: "The checkpoint to merge.") var model: String
    @Option(help: "Calibration capture (needed unless --stats is given with --merge-method frequency).") var calib: String?
    @OptionGroup var mergeOptions: MergeOptionGroup
    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    func run() throws {
        try ensureOutputDiffers(output.output, from: [model] + [calib, mergeOptions.stats].compactMap { $0 })
        let settings = mergeOptions.settings
        let reader = try CheckpointReader(model)
        let calibration = try calib.map { try CalibrationReader($0) }
        let stats = try mergeOptions.stats.map { try StatsReader($0) }
        let writeOptions = output.writeOptions(for: reader)
        let writer = try CheckpointWriter(destination: output.output, derivedFrom: reader, entry: ["stage": "merge"],
                                          options: writeOptions)
        let progress = global.progress
        var bytes: [(String, Int, Int)] = []
        let reports = try namingFile(model, inputs: [calib, mergeOptions.stats].compactMap { $0 }) { try MergeStage.run(model: reader, calibration: calibration, stats: stats, settings: settings,
                                         blockSize: mergeOptions.blockSize, maxTokens: mergeOptions.maxTokens,
                                         progress: progress.callback) { original, merged, _ in
            try writer.write(merged)
            bytes.append((merged.name, try reader.summary(original.name).expertFileBytes,
                          merged.expertBytes(floatBytes: writeOptions.dtype.byteSize)))
        } }
        progress.finish()
        writer.updateEntry(MergeStage.historyEntry(settings, calibration: calib, reports: reports))
        try writer.commit()
        printMergeWarnings(reports)
        let before = bytes.reduce(0) { $0 + $1.1 }, after = bytes.reduce(0) { $0 + $1.2 }
        if global.json {
            return printJSON(.object([
                ("output", .string(output.output)), ("merge_method", .string(settings.merge.method.rawValue)),
                ("similarity", .string(settings.similarity)), ("layers", .array(reports.map(\.json))),
                ("expert_bytes_before", .int(before)), ("expert_bytes_after", .int(after)),
            ]))
        }
        for r in reports {
            print("\(r.name): \(r.groups.count) groups")
            for g in r.groups {
                let members = zip(g.members, g.frequency).map { "\($0)(\(String(format: "%.1f%%", 100 * $1)))" }.joined(separator: " ")
                var line = "  expert \(g.dominant) ← [\(members)]  \(g.how)"
                if g.members.count > 1 { line += String(format: ", aligned cosine %.3f", g.alignedCosine) }
                if !g.notes.isEmpty { line += "  [" + g.notes.joined(separator: "; ") + "]" }
                if g.warning != nil { line += "  (fallback: see warning)" }
                print(line)
            }
        }
        print("wrote \(output.output): expert bytes \(formatBytes(before)) → \(formatBytes(after)) (\(String(format: "%.2f", Double(before) / Double(max(after, 1))))×), \(settings.merge.method.rawValue) merge")
    }
}

/// The per-group merge warnings (e.g. a RegMean fallback for too few routed tokens), one
/// `warning:` line each on stderr, in every mode: stdout stays the report (one JSON document
/// with --json), and --quiet silences progress only.
func printMergeWarnings(_ reports: [LayerMergeReport]) {
    for r in reports {
        for g in r.groups {
            guard let w = g.warning else { continue }
            let members = g.members.map(String.init).joined(separator: " ")
            FileHandle.standardError.write(Data("warning: \(r.name): group of expert \(g.dominant) [\(members)]: \(w)\n".utf8))
        }
    }
}
