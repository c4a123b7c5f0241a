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
    @OptionGroup var mergeOptions: MergeOptionGroup
    @OptionGroup var lowrank: LowRankOptionGroup
    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        if lowrank.rule == nil && lowrank.sparsity > 0 { throw ValidationError("--sparsity needs --rank or --energy") }
    }

    func run() throws {
        let inputs = [calib] + [evalCalib, mergeOptions.stats].compactMap { $0 }
        let reader = try CheckpointReader(model)
        let writer = try output.writer(from: reader, stage: "compress", inputs: inputs)
        let storage = output.writeOptions(for: reader).dtype
        let settings = CompressSettings(merge: mergeOptions.settings, lowRank: lowrank.options(floatBytes: storage.byteSize),
                                        activationAware: activationAware)
        let progress = global.progress
        let shard = try output.shardValue()
        let (stage, result) = try namingFile(model, inputs: inputs) {
            let stage = try CompressStage(model: reader, calibration: try CalibrationReader(calib),
                                          evaluation: try evalCalib.map(CalibrationReader.init),
                                          stats: try mergeOptions.stats.map(StatsReader.init), settings: settings,
                                          storage: storage, shard: shard, progress: progress.callback)
            return (stage, try stage.run(model: reader, shard: shard, progress: progress.stage) { try writer.write($0) })
        }
        progress.finish()
        try output.commit(writer, stage: stage, result: result, model: reader)
        render(stage.report(result.reports), timing: result.layers)
    }

    func render(_ report: CompressReport, timing: [FinishedLayer]) {
        printMergeWarnings(report.layers.compactMap(\.merge))
        if global.json {
            return printJSON(.object([("model", .string(model)), ("output", .string(output.output)),
                                      ("report", report.json), timingJSON(timing)]))
        }
        var t = Table(["layer", "groups", "rank", "bytes original", "merged", "final", "error merged", "error final", "cosine"])
        for l in report.layers {
            let ranks = l.lowRank.map { r -> String in
                let rs = r.matrices.filter { !$0.keptDense }.map(\.rank)
                guard let lo = rs.min(), let hi = rs.max() else { return "dense" }
                return lo == hi ? "\(lo)" : "\(lo)-\(hi)"
            } ?? "-"
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
        print("wrote \(output.output)")
    }
}
