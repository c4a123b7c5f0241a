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
        if activationAware && lowrank.sparsity == 0 {
            throw ValidationError("--activation-aware ranks sparse entries: give --sparsity > 0 too")
        }
        if lowrank.rank == nil && lowrank.energy == nil && lowrank.sparsity > 0 {
            throw ValidationError("--sparsity needs --rank or --energy")
        }
    }

    func run() throws {
        let inputs = [calib] + [evalCalib, mergeOptions.stats].compactMap { $0 }
        try ensureOutputDiffers(output.output, from: [model] + inputs)
        let reader = try CheckpointReader(model)
        let calibration = try CalibrationReader(calib)
        let evaluation = try evalCalib.map { try CalibrationReader($0) }
        let stats = try mergeOptions.stats.map { try StatsReader($0) }
        let writeOptions = output.writeOptions(for: reader)
        let floatBytes = writeOptions.dtype.byteSize
        let settings = CompressSettings(
            merge: mergeOptions.settings,
            lowRank: lowrank.rank == nil && lowrank.energy == nil ? nil : lowrank.options(floatBytes: floatBytes),
            activationAware: activationAware, blockSize: mergeOptions.blockSize, maxTokens: mergeOptions.maxTokens)
        let writer = try CheckpointWriter(destination: output.output, derivedFrom: reader, entry: ["stage": "compress"],
                                          options: writeOptions)
        let progress = global.progress
        let report = try namingFile(model, inputs: inputs) {
            try CompressPipeline.run(model: reader, calibration: calibration, evaluation: evaluation, stats: stats,
                                     settings: settings, storage: writeOptions.dtype, progress: progress.callback) { layer in
                _ = try writer.write(layer)
            }
        }
        progress.finish()
        writer.updateEntry(CompressPipeline.historyEntry(settings, calibration: calib, report: report))
        try writer.commit()
        printMergeWarnings(report.layers.compactMap(\.merge))
        if global.json {
            return printJSON(.object([("model", .string(model)), ("output", .string(output.output)),
                                      ("report", report.json)]))
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
        print("errors: relative layer output error ‖y′ − y‖/‖y‖ against the original on \(report.evaluationSource) "
              + "(mean \(fixed(report.mergedEvaluation.meanRelativeError, 4)) after merging, "
              + "\(fixed(report.evaluation.meanRelativeError, 4)) final)")
        print("expert bytes: \(formatBytes(report.bytesOriginal)) → \(formatBytes(report.bytesMerged)) merged → "
              + "\(formatBytes(report.bytesFinal)) final (\(fixed(report.ratio, 2))× smaller)")
        print("wrote \(output.output)")
    }
}
