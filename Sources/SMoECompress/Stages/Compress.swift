import Foundation

/// What `compress` does: statistics → merge (with alignment) → low-rank plus sparse, in one
/// pass over the model, one layer in memory at a time.
public struct CompressSettings: Sendable {
    public var merge: MergeSettings
    /// nil: merge only.
    public var lowRank: LowRankOptions?
    /// Rank the sparse residual entries by |S_ij|·‖X_j‖ over the calibration tokens.
    public var activationAware: Bool
    public var blockSize: Int
    public var maxTokens: Int?

    public init(merge: MergeSettings, lowRank: LowRankOptions?, activationAware: Bool = false,
                blockSize: Int = 4096, maxTokens: Int? = nil) {
        self.merge = merge
        self.lowRank = lowRank
        self.activationAware = activationAware
        self.blockSize = blockSize
        self.maxTokens = maxTokens
    }
}

/// One layer through the pipeline: sizes after each stage and the output error after each
/// stage (against the original layer, on the evaluation tokens).
public struct LayerCompressReport: Sendable {
    public var name: String
    public var merge: LayerMergeReport?
    public var lowRank: LayerLowRankReport?
    /// Expert bytes as stored: original file, after merging, after low-rank (the output).
    public var bytesOriginal: Int
    public var bytesMerged: Int
    public var bytesFinal: Int
    /// Evaluation of the merged layer and of the final layer.
    public var afterMerge: LayerEvaluation
    public var final: LayerEvaluation

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [
            ("name", .string(name)),
            ("expert_bytes_original", .int(bytesOriginal)), ("expert_bytes_merged", .int(bytesMerged)),
            ("expert_bytes_final", .int(bytesFinal)),
            ("relative_error_merged", .double(afterMerge.relativeError)), ("relative_error_final", .double(final.relativeError)),
            ("evaluation", final.json),
        ]
        if let m = merge { kv.append(("merge", m.json)) }
        if let l = lowRank { kv.append(("lowrank", l.json)) }
        return .object(kv)
    }
}

/// The whole-model report of `compress`.
public struct CompressReport: Sendable {
    public var layers: [LayerCompressReport]
    public var denseBytes: Int
    public var evaluationSource: String

    public var bytesOriginal: Int { layers.reduce(0) { $0 + $1.bytesOriginal } }
    public var bytesMerged: Int { layers.reduce(0) { $0 + $1.bytesMerged } }
    public var bytesFinal: Int { layers.reduce(0) { $0 + $1.bytesFinal } }
    public var ratio: Double { Double(bytesOriginal) / Double(max(bytesFinal, 1)) }
    public var evaluation: ModelEvaluation {
        ModelEvaluation(layers: layers.map(\.final), denseBytesBefore: denseBytes, denseBytesAfter: denseBytes)
    }
    public var mergedEvaluation: ModelEvaluation {
        ModelEvaluation(layers: layers.map(\.afterMerge), denseBytesBefore: denseBytes, denseBytesAfter: denseBytes)
    }

    public var json: JSONValue {
        .object([
            ("evaluation_tokens", .string(evaluationSource)),
            ("layers", .array(layers.map(\.json))),
            ("expert_bytes_original", .int(bytesOriginal)), ("expert_bytes_merged", .int(bytesMerged)),
            ("expert_bytes_final", .int(bytesFinal)), ("dense_bytes", .int(denseBytes)),
            ("compression_ratio", .double(ratio)),
            ("mean_relative_error_merged", .double(mergedEvaluation.meanRelativeError)),
            ("mean_relative_error_final", .double(evaluation.meanRelativeError)),
            ("max_relative_error_final", .double(evaluation.maxRelativeError)),
        ])
    }
}

public enum CompressPipeline {
    /// Runs every stage on `model` and hands each finished layer to `sink` in index order.
    /// `evaluation` supplies the tokens the errors are measured on (default: the calibration
    /// tokens; a held-out capture is the honest choice). `storage` is the output float type: the
    /// figures describe the layers as stored in it.
    @discardableResult
    public static func run(model: CheckpointReader, calibration: CalibrationReader, evaluation: CalibrationReader? = nil,
                           stats: StatsReader?, settings: CompressSettings, storage: StorageType,
                           progress: ProgressCallback? = nil,
                           sink: (_ layer: MoELayer) throws -> Void) throws -> CompressReport {
        try settings.merge.merge.validate()
        try settings.lowRank?.validate()
        let evalTokens = evaluation ?? calibration
        try evalTokens.checkMatches(model)
        var out: [LayerCompressReport] = []
        let merged = try MergeStage.run(model: model, calibration: calibration, stats: stats, settings: settings.merge,
                                        blockSize: settings.blockSize, maxTokens: settings.maxTokens,
                                        progress: progress) { original, mergedLayer, mergeReport in
            let floatBytes = storage.byteSize
            let mergedLayer = mergedLayer.roundedForStorage(storage)
            var final = mergedLayer
            var lowRankReport: LayerLowRankReport? = nil
            if var options = settings.lowRank {
                options.floatBytes = floatBytes
                let norms = settings.activationAware
                    ? try LowRankStage.inputNorms(mergedLayer, tokens: calibration.tokenBlocks(
                        original.name, blockSize: settings.blockSize, maxTokens: settings.maxTokens))
                    : nil
                (final, lowRankReport) = try LowRankStage.compressLayer(mergedLayer, options: options, inputNorms: norms,
                                                                        progress: progress)
                final = final.roundedForStorage(storage)
            }
            // Both stages measured against the original on the same tokens, one block at a time.
            var accMerged = try EvaluationAccumulator(original: original, compressed: mergedLayer)
            var accFinal = try EvaluationAccumulator(original: original, compressed: final)
            let info = try evalTokens.info(original.name)
            let total = min(info.numTokens, settings.maxTokens ?? Int.max)
            try evalTokens.forEachBlock(original.name, blockSize: settings.blockSize, maxTokens: settings.maxTokens) { start, x in
                accMerged.add(x)
                accFinal.add(x)
                progress?("eval \(original.name)", start + x.rows, total)
            }
            let before = try model.summary(original.name).expertFileBytes
            let bytesMerged = mergedLayer.expertBytes(floatBytes: floatBytes)
            let bytesFinal = final.expertBytes(floatBytes: floatBytes)
            out.append(LayerCompressReport(
                name: original.name, merge: mergeReport, lowRank: lowRankReport,
                bytesOriginal: before, bytesMerged: bytesMerged, bytesFinal: bytesFinal,
                afterMerge: accMerged.result(bytesBefore: before, bytesAfter: bytesMerged),
                final: accFinal.result(bytesBefore: before, bytesAfter: bytesFinal)))
            try sink(final)
        }
        _ = merged
        return CompressReport(layers: out, denseBytes: try model.denseSummary().bytes, evaluationSource: evalTokens.path)
    }

    /// The history entry: one record with every stage's options and per-layer results.
    public static func historyEntry(_ settings: CompressSettings, calibration: String, report: CompressReport) -> JSONValue {
        var kv: [(String, JSONValue)] = [("stage", "compress"), ("tool", .string("smoe-compress \(smoeCompressVersion)"))]
        let merges = report.layers.compactMap(\.merge)
        kv.append(("merge", MergeStage.historyEntry(settings.merge, calibration: calibration, reports: merges)))
        if let l = settings.lowRank {
            kv.append(("lowrank", LowRankStage.historyEntry(l, calibration: settings.activationAware ? calibration : nil,
                                                            reports: report.layers.compactMap(\.lowRank))))
        }
        kv.append(("evaluation_tokens", .string(report.evaluationSource)))
        kv.append(("mean_relative_error", .double(report.evaluation.meanRelativeError)))
        return .object(kv)
    }
}
