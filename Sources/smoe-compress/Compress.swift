import ArgumentParser
import Foundation
import SMoECompress

struct Compress: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "All stages in one command: statistics → merge (with alignment) → low-rank plus sparse.",
        discussion: """
            Reads the model one MoE layer at a time, merges its experts into --groups groups (options as for \
            `merge`), factors the merged experts (options as for `lowrank`; without --rank/--energy the \
            merged experts stay dense) and writes the result. No intermediate files. The final table gives \
            per layer the expert bytes after each stage and the output error after each stage against the \
            original, on --eval-calib tokens (default: the calibration tokens; a held-out capture is the \
            honest figure).
            """)

    @Argument(help: "The checkpoint to compress.") var model: String
    @Option(help: "Calibration capture (statistics, output-aware merging, activation-aware sparsity).") var calib: String
    @Option(help: "Capture whose tokens the errors are reported on (default: --calib). Use a held-out capture.")
    var evalCalib: String?
    @Flag(help: "Rank sparse residual entries by |S_ij|·‖X_j‖ over the calibration tokens (needs --sparsity > 0).")
    var activationAware = false
    @Option(help: "Expert size to reach: a fraction of the original expert bytes (0.5) or a size (20GB). The planner chooses groups and ranks per layer.")
    var targetSize: String?
    @Flag(help: "With --target-size: print the plan and write nothing (no -o needed).")
    var planOnly = false
    @Flag(help: "With --target-size: the same number of groups in every layer.")
    var uniformGroups = false
    @Option(help: "With --target-size: per-layer loss sensitivities (JSON by tools/layer_sensitivity.py); the plan minimises Σ c·error² instead of the mean layer error.")
    var sensitivity: String?
    @Flag(help: "Store experts in block-scaled FP8 (1 byte per weight and a float32 scale per 128×128 block; dense experts only, no --rank/--energy). With --target-size: a layer kept dense may also store its experts so, measured after FP8 rounding like every other option.")
    var fp8 = false
    @OptionGroup var mergeOptions: MergeOptionGroup
    @OptionGroup var lowrank: LowRankOptionGroup
    @OptionGroup var output: OutputOptions
    @OptionGroup var resumeOptions: ResumeOptions
    @OptionGroup var global: GlobalOptions
    @OptionGroup var reportOptions: ReportOptions

    func validate() throws {
        if !planOnly { try output.requireOutput() }  // --plan-only writes nothing: -o is optional there
        if planOnly && resumeOptions.resume { throw ValidationError("--plan-only writes nothing: give no --resume") }
        if targetSize == nil {
            if mergeOptions.groups == nil { throw ValidationError("give --groups, or --target-size") }
            if planOnly || uniformGroups || sensitivity != nil {
                throw ValidationError("--plan-only, --uniform-groups and --sensitivity need --target-size")
            }
            if lowrank.rule == nil && lowrank.sparsity > 0 { throw ValidationError("--sparsity needs --rank or --energy") }
        } else {
            if lowrank.rule != nil { throw ValidationError("--target-size chooses the ranks: give no --rank or --energy") }
            if mergeOptions.adaptive { throw ValidationError("--target-size chooses the groups per layer: give no --adaptive") }
        }
    }

    /// The planner's settings, with --target-size.
    func plannerSettings() throws -> PlannerSettings? {
        try targetSize.map {
            var p = PlannerSettings(target: try TargetSize.parse($0), groupCandidates: mergeOptions.groups.map { [$0] },
                                    uniformGroups: uniformGroups, sensitivity: try sensitivity.map(LayerSensitivity.read))
            p.fp8 = fp8
            return p
        }
    }

    func run() throws {
        let inputs = [calib] + [evalCalib, mergeOptions.stats, sensitivity].compactMap { $0 }
        try reportOptions.check(against: [model] + [output.output].compactMap { $0 } + inputs)
        let reader = try CheckpointReader(model)
        let storage = output.writeOptions(for: reader).dtype
        var settings = CompressSettings(merge: try namingFile(model) { try mergeOptions.settings(fitting: reader) }, lowRank: lowrank.options(floatBytes: storage.byteSize),
                                        activationAware: activationAware)
        settings.target = try plannerSettings()
        settings.fp8 = fp8 && settings.target == nil
        settings.movePruneIntoPlan()
        if settings.target != nil { settings.lowRank = lowrank.options(floatBytes: storage.byteSize, rule: .fixed(1)) }
        let progress = global.progress
        if planOnly {
            let plan = try namingFile(model, inputs: inputs) {
                try SizePlanner.plan(model: reader, calibration: try CalibrationReader(calib), stats: try mergeOptions.stats.map(StatsReader.init),
                                     merge: settings.merge, lowRank: settings.lowRank!, settings: settings.target!,
                                     storage: storage, progress: progress.callback)
            }
            progress.finish()
            let candidates = JSONValue.array(zip(plan.layers, plan.candidates).map { l, c in
                .object([("name", .string(l.name)), ("options", .array(c.map(\.json)))])
            })
            let document = JSONValue.object([("model", .string(model)), ("plan", plan.json), ("candidates", candidates)])
            try reportOptions.write(document)
            return global.json ? printJSON(document) : renderPlan(plan)
        }
        let writer = try output.writer(from: reader, stage: "compress", inputs: inputs)
        let shard = try output.shardValue()
        let stage = try namingFile(model, inputs: inputs) {
            try CompressStage(model: reader, calibration: try CalibrationReader(calib),
                              evaluation: try evalCalib.map(CalibrationReader.init),
                              stats: try mergeOptions.stats.map(StatsReader.init), settings: settings,
                              storage: storage, shard: shard, progress: progress.callback)
        }
        let work = try resumeOptions.open(stage, model: reader, inputs: resumeInputs, writer: writer, output: output)
        let result = try work.run(stage, model: reader, path: model, inputs: inputs, shard: shard, writer: writer,
                                  progress: progress)
        // A shard file holds layers to assemble, not a checkpoint: its bytes are stated by `assemble`.
        let reusedBytes = try result.reused.isEmpty || shard != nil ? nil
            : expertFileBytes(of: result.reused, original: reader, written: output.path)
        try reportOptions.write(document(stage.report(result.reports), plan: stage.plan, timing: result.layers, reused: result.reused, work: work,
                                         settings: stage.settingsRecord, reusedBytes: reusedBytes))
        if let plan = stage.plan, !global.json { renderPlan(plan) }
        render(stage.report(result.reports), plan: stage.plan, timing: result.layers, reused: result.reused, work: work,
               settings: stage.settingsRecord, reusedBytes: reusedBytes)
    }

    /// The input files a resumed run must find unchanged.
    var resumeInputs: [ResumeInput] {
        [ResumeInput(role: "--calib", path: calib)] + [("--eval-calib", evalCalib), ("--stats", mergeOptions.stats), ("--sensitivity", sensitivity)]
            .compactMap { r, p in p.map { ResumeInput(role: r, path: $0) } }
    }

    func renderPlan(_ plan: SizePlan) {
        var t = Table(["layer", "method", "groups", "ranks", "bytes original", "planned", "estimated error"])
        for l in plan.layers {
            t.add([l.name, l.method, "\(l.groups)", l.encoding.isFP8 ? "dense f8" : l.rankSummary, formatBytes(l.bytesOriginal), formatBytes(l.bytes), fixed(l.estimatedError, 4)])
        }
        print("plan for \(formatBytes(plan.budget)) of expert bytes (errors estimated on every \(plan.settings.heldOutEvery)th chunk of \(plan.settings.chunkTokens) calibration tokens, held apart from merging):")
        print(t.render())
        print("planned: \(formatBytes(plan.bytesOriginal)) → \(formatBytes(plan.bytes)), mean estimated error \(fixed(plan.meanEstimatedError, 4))"
              + (plan.settings.sensitivity == nil ? "" : ", Σ c·error² \(fixed(plan.objective, 4)) (sensitivities from \(plan.settings.sensitivity!.path))"))
        if let taken = plan.taken {
            // The cross-validated choice between methods (PlannerSettings.checkFolds).
            print("checked by \(plan.settings.checkFolds)-fold cross-validation (each contiguous \(plan.settings.checkFolds)th of the calibration tokens held apart), objective on the split → mean over the folds: "
                  + plan.checks.map { "\($0.methods.label) \(fixed($0.objective, 4)) → \(fixed($0.crossValidated, 4))" }.joined(separator: ", ")
                  + "; took the \(taken.label) plan")
        }
    }

    /// The `--json` document (the report's source).
    func document(_ report: CompressReport, plan stagePlan: SizePlan?, timing: [FinishedLayer], reused: [String] = [],
                  work: ResumeWork? = nil, settings: JSONValue? = nil, reusedBytes: (before: Int, after: Int)? = nil) -> JSONValue {
        var kv: [(String, JSONValue)] = [("model", .string(model)), ("output", .string(output.path)), ("report", report.json),
                                         timingJSON(timing)]
        if let p = stagePlan { kv.append(("plan", p.json)) }
        if let s = settings { kv.append(("settings", s)) }
        kv += reusedJSON(reused, work: work)
        if let b = reusedBytes {
            // The whole output's expert bytes: this run's layers plus the reused ones.
            kv.append(("output_expert_bytes", .object([("original", .int(report.bytesOriginal + b.before)),
                                                       ("final", .int(report.bytesFinal + b.after))])))
        }
        return .object(kv)
    }

    func render(_ report: CompressReport, plan stagePlan: SizePlan? = nil, timing: [FinishedLayer], reused: [String] = [],
                work: ResumeWork? = nil, settings: JSONValue? = nil, reusedBytes: (before: Int, after: Int)? = nil) {
        printMergeWarnings(report.layers.compactMap(\.merge))
        if global.json {
            return printJSON(document(report, plan: stagePlan, timing: timing, reused: reused, work: work, settings: settings,
                                      reusedBytes: reusedBytes))
        }
        guard !report.layers.isEmpty else {
            // Every layer was reused: no figure of this run to show, only the output's size.
            if let line = reusedLine(reused, work: work) { print(line) }
            if let b = reusedBytes {
                print("expert bytes of the output: \(formatBytes(b.before)) → \(formatBytes(b.after)) "
                      + "(\(fixed(Double(b.before) / Double(max(b.after, 1)), 2))× smaller)")
            }
            return print("wrote \(output.path)")
        }
        var t = Table(["layer", "groups", "rank", "bytes original", "merged", "final", "error merged", "error final", "cosine"])
        for l in report.layers {
            let ranks = l.lowRank.map { rankRange($0.matrices.filter { !$0.keptDense }.map(\.rank)) } ?? "-"
            t.add([l.name, "\(l.final.storedAfter)", ranks, formatBytes(l.bytesOriginal), formatBytes(l.bytesMerged),
                   formatBytes(l.bytesFinal), fixed(l.afterMerge.relativeError, 4), fixed(l.final.relativeError, 4),
                   fixed(l.final.meanCosine, 4)])
        }
        print(t.render())
        for l in report.layers { if let c = l.merge?.compact { print("\(l.name):" + compactRouterLine(c).dropFirst(1)) } }
        print("errors: relative layer output error ‖y′ − y‖/‖y‖ against the original on \(report.evaluationSource) "
              + "(mean \(fixed(report.mergedEvaluation.meanRelativeError, 4)) after merging, "
              + "\(fixed(report.evaluation.meanRelativeError, 4)) final)")
        print("expert bytes: \(formatBytes(report.bytesOriginal)) → \(formatBytes(report.bytesMerged)) merged → "
              + "\(formatBytes(report.bytesFinal)) final (\(fixed(report.ratio, 2))× smaller)")
        if let line = reusedLine(reused, work: work) { print(line) }
        if let b = reusedBytes {
            let before = report.bytesOriginal + b.before, after = report.bytesFinal + b.after
            print("expert bytes of the whole output (reused layers included): \(formatBytes(before)) → \(formatBytes(after)) "
                  + "(\(fixed(Double(before) / Double(max(after, 1)), 2))× smaller)")
        }
        print("wrote \(output.path)")
    }
}
