import Foundation

/// What `compress` does: statistics → merge (with alignment) → low-rank plus sparse, in one
/// pass over the model, one layer in memory at a time.
public struct CompressSettings: Sendable {
    /// The merge settings; their layers and tokens are the whole run's.
    public var merge: MergeSettings
    /// nil: merge only.
    public var lowRank: LowRankOptions?
    /// Rank the sparse residual entries by |S_ij|·‖X_j‖ over the calibration tokens.
    public var activationAware: Bool
    /// Plan groups and ranks per layer for a size (`SizePlanner`); `merge.groups` is then unused
    /// unless it is the planner's only candidate, and `lowRank` supplies all but the rank.
    public var target: PlannerSettings? = nil
    /// Without a target: store every layer's (dense) experts in block-scaled FP8. With a target,
    /// `target.fp8` lets the plan choose FP8 per layer instead.
    public var fp8 = false

    public init(merge: MergeSettings, lowRank: LowRankOptions?, activationAware: Bool = false) {
        self.merge = merge
        self.lowRank = lowRank
        self.activationAware = activationAware
    }

    /// With a target size, pruning is a per-layer option of the plan beside merging (ALGORITHM.md
    /// §4.3): the prune method moves to `target`, and the merge settings merge (merged layers keep
    /// the E router slots; a pruned layer is compact by construction).
    public mutating func movePruneIntoPlan() {
        guard var t = target, let method = merge.prune else { return }
        t.prune = method
        t.pruneRefit = merge.compactRefit ?? true
        merge.prune = nil
        merge.router = .slots
        target = t
    }

    /// The checks `MergeSettings` and `LowRankOptions` do not make themselves.
    func validate() throws {
        try lowRank?.validate()
        if fp8 && target == nil && lowRank != nil {
            throw SMoEError.setting(.fp8, "stores dense experts in FP8: give no {rank} or {energy} (or plan with {target-size})")
        }
        if activationAware && (lowRank?.sparsity ?? 0) == 0 {
            throw SMoEError.setting(.activationAware, "ranks sparse entries: give {sparsity} > 0 (and {rank} or {energy}) too")
        }

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

/// The `compress` stage: each selected layer is merged (with alignment), rounded to the output
/// type, factored when low rank is asked for, and measured against the original after each step.
public struct CompressStage: LayerStage {
    public let name = "compress"
    public let settings: CompressSettings
    public let merge: MergeStage
    public let calibration: CalibrationReader
    /// The tokens the errors are measured on.
    public let evaluation: CalibrationReader
    /// The output float type: the figures describe the layers as stored in it.
    public let storage: StorageType
    /// With a target size: the plan every layer follows (decided once, in `init`).
    public let plan: SizePlan?
    let model: CheckpointReader
    let denseBytes: Int

    public var layers: [String] { merge.layers }

    /// Validates every setting once and plans the merge. `evaluation` supplies the tokens the
    /// errors are measured on (default: the calibration tokens; a held-out capture is the honest
    /// choice).
    public init(model: CheckpointReader, calibration: CalibrationReader, evaluation: CalibrationReader? = nil,
                stats: StatsReader?, settings: CompressSettings, storage: StorageType, plan: SizePlan? = nil,
                shard: Shard? = nil, progress: ProgressCallback? = nil) throws {
        var settings = settings
        settings.lowRank?.floatBytes = storage.byteSize
        try settings.validate()
        var mergeSettings = settings.merge
        if var target = settings.target {
            // With a target size pruning is a per-layer option of the plan beside merging
            // (ALGORITHM.md §4.3): the merge stage merges, and prunes the layers the plan says.
            settings.movePruneIntoPlan()
            target = settings.target!
            mergeSettings = settings.merge
            // The planner chooses G per layer; the merge stage validates the largest and names the
            // layers. A compact router needs one G in every layer (the serving config holds one).
            if settings.merge.router == .compact && !target.uniformGroups {
                throw SMoEError.setting(.router, "compact needs one G in every layer: plan {target-size} with {uniform-groups}")
            }
            // A compact layer routes top_k of its G experts, so the plan may not go below top_k.
            if settings.merge.router == .compact {
                let k = model.layers.map(\.topK).max() ?? 1, e = model.layers.map(\.numExperts).max() ?? 1
                target.groupCandidates = (target.groupCandidates ?? Array(1...e)).filter { $0 >= k }
                if target.groupCandidates!.isEmpty {
                    throw SMoEError.setting(.router, "compact needs G ≥ top_k (\(k)), and no group candidate is")
                }
            }
            let template = settings.lowRank ?? LowRankOptions(rank: .fixed(1), floatBytes: storage.byteSize)
            let sizePlan = try plan ?? SizePlanner.plan(model: model, calibration: calibration, stats: stats, merge: settings.merge,
                                                        lowRank: template, settings: target, storage: storage, progress: progress)
            self.plan = sizePlan
            mergeSettings.groups = sizePlan.layers.map(\.groups).max() ?? 1
            mergeSettings.adaptive = false
            settings.lowRank = template
        } else {
            self.plan = nil
        }
        mergeSettings.factoredAfter = settings.lowRank != nil
        mergeSettings.factoredLargeGram = settings.lowRank?.needsLargeGram(hasTokens: true) ?? false
        self.merge = try MergeStage(model: model, calibration: calibration, stats: stats, settings: mergeSettings,
                                    shard: shard, progress: progress)
        if let p = self.plan, p.layers.map(\.name) != merge.layers {
            throw SMoEError.setting(.targetSize, "the plan covers layers \(p.layers.map(\.name)), the run \(merge.layers)")
        }
        let evaluation = evaluation ?? calibration
        try evaluation.checkMatches(model, layers: merge.layers)
        self.settings = settings
        self.calibration = calibration
        self.evaluation = evaluation
        self.storage = storage
        self.model = model
        self.denseBytes = try model.denseSummary().bytes
    }

    /// The original experts are read a group at a time for merging and one at a time for the
    /// evaluation, never all at once.
    public func process(source original: LayerSource, progress: ProgressCallback?) throws -> (output: MoELayer, report: LayerCompressReport) {
        let tokens = settings.merge.tokens
        let layerPlan = plan?[original.name]
        var (merged, mergeReport) = try layerPlan.map { p in
            if let method = p.prune {
                return try merge.prune(original, method: method, groups: p.groups, refit: plan!.settings.pruneRefit, progress: progress)
            }
            return try merge.merge(original, grouping: p.grouping, frequency: p.frequency, progress: progress)
        } ?? merge.process(source: original, progress: progress)
        if let p = layerPlan, !p.similarity.isEmpty { mergeReport.similarity = (merge.settings.similarityBase.rawValue, p.similarity) }
        // Rounded in place and moved: a second copy of the merged layer (G float32 experts) would
        // double the peak (docs/ALGORITHM.md "Scale").
        merged.roundForStorage(storage)
        // A layer the plan (or the setting) stores in FP8 is then rounded through it and written
        // so: FP8 of the output float type's values, as the planner measured it.
        let encoding = layerPlan?.encoding ?? (settings.fp8 ? .fp8 : .float)
        if encoding.isFP8 {
            merged.expertEncoding = encoding
            merged.roundForStorage(storage)
        }
        let mergedLayer = consume merged
        var final = mergedLayer
        var lowRankReport: LayerLowRankReport? = nil
        var lowRank = settings.lowRank
        if let p = layerPlan { lowRank = p.ranks.isEmpty ? nil : lowRank.map { var o = $0; o.ranks = p.ranks; return o } }
        if let options = lowRank {
            // Output objective (the default): whitened on the calibration tokens; weight: plain SVD,
            // sparse entries ranked by |S_ij|·‖X_j‖ with the activation-aware setting.
            let blocks = calibration.tokenBlocks(original.name, tokens)
            let whiten = options.objective(hasTokens: true) == .output
            let norms = settings.activationAware && !whiten ? try LowRankStage.inputNorms(mergedLayer, tokens: blocks) : nil
            (final, lowRankReport) = try LowRankStage.compressLayer(mergedLayer, options: options, inputNorms: norms,
                                                                    whitenOn: whiten ? blocks : nil, progress: progress)
            final.roundForStorage(storage)
        }
        // Both steps measured against the original on the same tokens, one block at a time.
        let groups = mergeReport.compactSlots
        var accMerged = try EvaluationAccumulator(original: original, compressed: mergedLayer, slotGroups: groups)
        var accFinal = try EvaluationAccumulator(original: original, compressed: final, slotGroups: groups)
        if let fit = mergeReport.compact {
            mergeReport.compact!.evaluation = try CompactRouter.measure(
                slotLayer: original.header, groups: fit.groups, start: fit.start, compact: mergedLayer,
                tokens: evaluation.tokenBlocks(original.name, tokens))
        }
        let info = try evaluation.info(original.name)
        let total = min(info.numTokens, tokens.maxTokens ?? Int.max)
        try evaluation.forEachBlock(original.name, blockSize: tokens.blockSize, maxTokens: tokens.maxTokens) { start, x in
            let r0 = original.route(x)
            let y0 = try original.forward(x, routing: r0)
            accMerged.add(x, original: r0, output: y0)
            accFinal.add(x, original: r0, output: y0)
            progress?("eval \(original.name)", start + x.rows, total)
        }
        let before = try model.summary(original.name).expertFileBytes
        let bytesMerged = mergedLayer.expertBytes(floatBytes: storage.byteSize)
        let bytesFinal = final.expertBytes(floatBytes: storage.byteSize)
        let report = LayerCompressReport(
            name: original.name, merge: mergeReport, lowRank: lowRankReport,
            bytesOriginal: before, bytesMerged: bytesMerged, bytesFinal: bytesFinal,
            afterMerge: accMerged.result(bytesBefore: before, bytesAfter: bytesMerged),
            final: accFinal.result(bytesBefore: before, bytesAfter: bytesFinal))
        guard [report.afterMerge, report.final].allSatisfy({ $0.relativeError.isFinite && $0.meanCosine.isFinite }) else {
            throw SMoEError("the output error is not finite: the layer's outputs overflow float32 or hold NaN")
        }
        return (final, report)
    }

    /// `compress --fp8` without a plan: every layer's experts in FP8, recorded once in the history
    /// and the settings shards agree on (a plan records its encodings per layer).
    var fixedEncodingRecord: [(String, JSONValue)] {
        settings.fp8 && plan == nil ? [("expert_encoding", .string(ExpertEncoding.fp8.description))] : []
    }

    /// The whole-model report of the computed layers.
    public func report(_ layers: [LayerCompressReport]) -> CompressReport {
        CompressReport(layers: layers, denseBytes: denseBytes, evaluationSource: evaluation.path)
    }

    /// The history entry: one record with every stage's options and per-layer results.
    public func historyEntry(_ reports: [LayerCompressReport]) -> JSONValue {
        let report = report(reports)
        var kv: [(String, JSONValue)] = [("stage", "compress"), ("tool", .string("smoe-compress \(smoeCompressVersion)"))]
        kv.append(("merge", merge.historyEntry(reports.compactMap(\.merge))))
        if let p = plan { kv.append(("plan", p.json)) }
        kv += fixedEncodingRecord
        if let l = settings.lowRank {
            var l = l
            l.objective = l.objective(hasTokens: true)
            let usesTokens = settings.activationAware || l.objective == .output
            kv.append(("lowrank", LowRankStage.historyEntry(l, calibration: usesTokens ? calibration.path : nil,
                                                            reports: reports.compactMap(\.lowRank))))
        }
        kv.append(("evaluation_tokens", .string(report.evaluationSource)))
        kv.append(("mean_relative_error", .double(report.evaluation.meanRelativeError)))
        return .object(kv)
    }
}

// MARK: what shards of one run must agree on

extension CompressStage {
    public var settingsRecord: JSONValue {
        var kv: [(String, JSONValue)] = [("stage", .string(name)), ("merge", merge.settingsRecord),
                                         ("activation_aware", .bool(settings.activationAware)),
                                         ("evaluation_tokens", .string(evaluation.path)), ("storage", .string(storage.rawValue))]
                                         + fixedEncodingRecord
        if let l = settings.lowRank { kv.append(("lowrank", .object(l.historyJSON))) }
        return .object(kv)
    }
}

// MARK: resumed runs

extension CompressStage {
    /// As the default, and `mean_relative_error` the mean of the layers' errors (summed in index
    /// order, as `ModelEvaluation.meanRelativeError`: a one-layer entry holds its layer's error).
    public func historyEntry(combining layerEntries: [JSONValue]) throws -> JSONValue {
        let errors = try layerEntries.map { e -> Double in
            guard let x = e["mean_relative_error"]?.doubleValue else {
                throw SMoEError("cannot combine the layers' history entries: one has no mean_relative_error")
            }
            return x
        }
        let combined = try combineLayerEntries(layerEntries.map { $0.replacing("mean_relative_error", with: .double(0)) },
                                               empty: historyEntry([]))
        let mean = errors.isEmpty ? 0 : errors.reduce(0) { $0 + $1 } / Double(errors.count)
        return combined.replacing("mean_relative_error", with: .double(mean))
    }
}
