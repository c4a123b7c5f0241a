import ArgumentParser
import Foundation
import SMoECompress

/// Options shared by `merge` and `compress`.
struct MergeOptionGroup: ParsableArguments {
    @Option(help: "Groups (stored experts) per merged layer; with --adaptive, the average per merged layer; with compress --target-size, the one G the planner may use.")
    var groups: Int?

    @Option(help: "Routing statistics from `stats` (computed on the fly when absent).")
    var stats: String?

    @Option(help: "Similarity used to group: router-logits, weight, feature or expert-output (default: router-logits; expert-output with --method hierarchical).")
    var similarity: SimilarityBase?

    @Flag(help: "Share one budget of groups across layers (the paper's setting).")
    var adaptive = false

    @Option(help: "Grouping: dominant (MC-SMoE) or hierarchical (HC-SMoE average linkage).")
    var method: GroupingMethod = .dominant

    @Option(help: "How a group becomes one expert: frequency, regmean or regmean+refit.")
    var mergeMethod: MergeMethod = .regmeanRefit

    @Option(help: "RegMean off-diagonal scale α in [0, 1].")
    var regmeanAlpha: Double = 0.9

    @Option(help: "RegMean ridge, relative to the mean Gram diagonal.")
    var regmeanRidge: Double = 1e-2

    @Option(help: "Refit ridge, relative to the mean diagonal of the normal matrix.")
    var refitRidge: Double = 0.1

    @Option(help: "A group needs this many distinct routed calibration tokens for RegMean; below it falls back to the frequency-weighted average (default: d_model; 1 always solves, the ridge keeps the system well posed).")
    var regmeanMinTokens: Int?

    @Flag(help: "Average members without aligning their neurons first (for comparison).")
    var noAlign = false

    @Option(help: "Router of a merged layer: slots (all E router slots and an expert_map) or compact (G fitted router rows and G experts: a standard smaller MoE layer that export writes with the expert count set to G).")
    var router: RouterLayout = .slots

    @Flag(inversion: .prefixedNo, help: "With --router compact: after the router fit, refit each expert's down projection (and bias) by ridge least squares (--refit-ridge) to the original layer's output under the compact routing. Default: on with --router compact.")
    var compactRefit: Bool? = nil

    @Option(help: "Prune instead of merging: keep the --groups experts of largest saliency on the calibration tokens with their router rows (reap: mean routing weight × output norm over the routed tokens; frequency: summed routing weight). The layer becomes compact (G experts, no expert_map); the kept experts are refitted unless --no-compact-refit.")
    var prune: PruneMethod?

    @Option(help: "What the refits of the experts' down projections aim at: layer (the original layer's output on the capture's inputs) or capture (the outputs stored in the capture: with a capture made by `capture_calibration.py --reference ORIGINAL` on a model whose earlier layers are already compressed, the original model's own outputs, so each layer also undoes the drift before it; with E router slots this adds a refit of the merged experts).")
    var refitTargets: RefitTargets = .layer

    @OptionGroup var layers: LayerOptions
    @OptionGroup var tokens: TokenOptions

    var settings: MergeSettings {
        var s = MergeSettings(groups: groups, adaptive: adaptive, grouping: method, similarity: similarity, layers: layers.names,
                      merging: MergeOptions(method: mergeMethod, align: !noAlign, alpha: regmeanAlpha, ridge: regmeanRidge,
                                            refitRidge: refitRidge, minTokens: regmeanMinTokens),
                      tokens: tokens.settings, router: router, compactRefit: compactRefit, prune: prune)
        s.refitTargets = refitTargets
        return s
    }

    /// The settings with --max-memory, which the stage applies to its planned groupings.
    func settings(fitting model: CheckpointReader) throws -> MergeSettings {
        var s = settings
        s.maxMemory = try tokens.maxMemory.map { try parseByteSize($0, for: .maxMemory) }
        return s
    }
}

struct Merge: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Group experts the router treats alike, align them and merge each group into one expert.")

    @Argument(help: "The checkpoint to merge.") var model: String
    @Option(help: "Calibration capture (needed unless --stats is given with --merge-method frequency).") var calib: String?
    @OptionGroup var mergeOptions: MergeOptionGroup
    @OptionGroup var output: OutputOptions
    @OptionGroup var resumeOptions: ResumeOptions
    @OptionGroup var global: GlobalOptions
    @OptionGroup var reportOptions: ReportOptions

    func validate() throws {
        try output.requireOutput()
        if mergeOptions.groups == nil { throw ValidationError("Missing expected argument '--groups <groups>'") }
    }

    func run() throws {
        let inputs = [calib, mergeOptions.stats].compactMap { $0 }
        try reportOptions.check(against: [model, output.path] + inputs)
        let reader = try CheckpointReader(model)
        let writer = try output.writer(from: reader, stage: "merge", inputs: inputs)
        let progress = global.progress
        let floatBytes = output.writeOptions(for: reader).dtype.byteSize
        var after = 0  // expert bytes of every layer as stored in the output
        let shard = try output.shardValue()
        let stage = try namingFile(model, inputs: inputs) {
            try MergeStage(model: reader, calibration: try calib.map(CalibrationReader.init),
                           stats: try mergeOptions.stats.map(StatsReader.init), settings: try mergeOptions.settings(fitting: reader),
                           shard: shard, progress: progress.callback)
        }
        let resumeInputs = [("--calib", calib), ("--stats", mergeOptions.stats)].compactMap { r, p in p.map { ResumeInput(role: r, path: $0) } }
        let work = try resumeOptions.open(stage, model: reader, inputs: resumeInputs, writer: writer, output: output)
        let result = try work.run(stage, model: reader, path: model, inputs: inputs, shard: shard, writer: writer,
                                  progress: progress) { after += $0.expertBytes(floatBytes: floatBytes) }
        if !result.reused.isEmpty {
            // Reused layers went to the output without passing through this run: as written.
            let written = try CheckpointReader(output.path)
            for name in result.reused { after += try written.summary(name).expertParameters * floatBytes }
        }
        printMergeWarnings(result.reports)
        let written = Set(result.layers.map(\.name))
        let before = try reader.layers.filter { written.contains($0.name) }
            .reduce(0) { $0 + (try reader.summary($1.name).expertFileBytes) }
        try reportOptions.write(document(result.reports, expertBytes: (before, after), timing: result.layers, reused: result.reused, work: work,
                                         record: stage.settingsRecord))
        render(result.reports, expertBytes: (before, after), timing: result.layers, reused: result.reused, work: work,
               record: stage.settingsRecord)
    }

    /// The `--json` document (the report's source).
    func document(_ reports: [LayerMergeReport], expertBytes: (before: Int, after: Int), timing: [FinishedLayer],
                  reused: [String] = [], work: ResumeWork? = nil, record: JSONValue? = nil) -> JSONValue {
        let settings = mergeOptions.settings
        return .object([
            ("output", .string(output.path)), ("merge_method", .string(settings.merging.method.rawValue)),
            ("similarity", .string(settings.similarityBase.rawValue)), ("layers", .array(reports.map(\.json))),
            ("expert_bytes_before", .int(expertBytes.before)), ("expert_bytes_after", .int(expertBytes.after)), timingJSON(timing),
        ] + (record.map { [("settings", $0)] } ?? []) + reusedJSON(reused, work: work))
    }

    func render(_ reports: [LayerMergeReport], expertBytes: (before: Int, after: Int), timing: [FinishedLayer],
                reused: [String] = [], work: ResumeWork? = nil, record: JSONValue? = nil) {
        let settings = mergeOptions.settings
        let (before, after) = expertBytes
        if global.json { return printJSON(document(reports, expertBytes: expertBytes, timing: timing, reused: reused, work: work, record: record)) }
        for r in reports {
            if let p = r.prune {
                print(pruneLine(r.name, p))
                continue
            }
            print("\(r.name): \(r.groups.count) groups")
            for g in r.groups {
                let members = zip(g.members, g.frequency).map { "\($0)(\(String(format: "%.1f%%", 100 * $1)))" }.joined(separator: " ")
                var line = "  expert \(g.dominant) ← [\(members)]  \(g.how)"
                if g.members.count > 1 { line += String(format: ", aligned cosine %.3f", g.alignedCosine) }
                if !g.notes.isEmpty { line += "  [" + g.notes.joined(separator: "; ") + "]" }
                if g.warning != nil { line += "  (fallback: see warning)" }
                print(line)
            }
            if let c = r.compact { print(compactRouterLine(c)) }
        }
        if let line = reusedLine(reused, work: work) { print(line) }
        let how = settings.prune.map { "\($0.rawValue) pruning" } ?? "\(settings.merging.method.rawValue) merge"
        print("wrote \(output.path): expert bytes \(formatBytes(before)) → \(formatBytes(after)) (\(String(format: "%.2f", Double(before) / Double(max(after, 1))))×), \(how)")
    }
}

/// The per-group merge warnings (e.g. a RegMean fallback for too few routed tokens), one
/// `warning:` line each on stderr, in every mode: stdout stays the report (one JSON document
/// with --json), and --quiet silences progress only.
func printMergeWarnings(_ reports: [LayerMergeReport]) {
    for r in reports {
        for g in r.groups {
            guard let w = g.warning else { continue }
            printWarning("\(r.name): group of expert \(g.dominant) [\(g.members.map(String.init).joined(separator: " "))]: \(w)")
        }
    }
}

/// A pruned layer: the kept and dropped slots with their saliencies, and the refit.
func pruneLine(_ name: String, _ p: PruneReport) -> String {
    func list(_ slots: [Int]) -> String { slots.map { "\($0)(\(String(format: "%.4g", p.saliency[$0])))" }.joined(separator: " ") }
    var line = "\(name): kept \(p.kept.count) of \(p.saliency.count) experts by \(p.method.rawValue) saliency: kept [\(list(p.kept))], dropped [\(list(p.dropped))]"
    if let r = p.refit {
        line += "\n  experts refitted: calibration output error \(fixed(r.before, 4)) → \(fixed(r.after, 4))"
        if !r.notes.isEmpty { line += " [" + r.notes.joined(separator: "; ") + "]" }
    }
    return line
}

/// One line on a layer's compact router fit: cross-entropy and top-k group agreement of the
/// fitted rows against the most-used-slot rows it started from (and on evaluation tokens).
func compactRouterLine(_ c: CompactRouterReport) -> String {
    func figures(_ a: RouterFitMeasure, _ b: RouterFitMeasure) -> String {
        "cross-entropy \(fixed(b.crossEntropy, 4)) (start \(fixed(a.crossEntropy, 4)), floor \(fixed(b.entropy, 4))), "
            + "top-k agreement \(fixed(b.topKAgreement, 3)) (start \(fixed(a.topKAgreement, 3)))"
    }
    var line = "  compact router (\(c.groups.count) rows, \(c.iterations) iterations\(c.converged ? "" : ", not converged")): "
        + figures(c.initial, c.fitted) + " on calibration"
    if let e = c.evaluation { line += "; " + figures(e.initial, e.fitted) + " on evaluation tokens" }
    if let r = c.refit {
        line += "; experts refitted: calibration output error \(fixed(r.before, 4)) → \(fixed(r.after, 4))"
        if !r.notes.isEmpty { line += " [" + r.notes.joined(separator: "; ") + "]" }
    }
    return line
}
