/// How groups are formed.
public enum GroupingMethod: String, Sendable, CaseIterable {
    /// MC-SMoE: the most used slots are dominant, the others join the most similar one
    case dominant
    /// HC-SMoE: average-linkage clustering (on expert outputs by default)
    case hierarchical
}

/// The per-layer inputs grouping needs: usage and one similarity matrix (row-major E×E,
/// larger = more alike).
public struct GroupingInput: Sendable {
    public var frequency: [Double]
    public var similarity: [Double]

    public init(frequency: [Double], similarity: [Double]) {
        self.frequency = frequency
        self.similarity = similarity
    }
}

/// Settings of the `merge` stage.
public struct MergeSettings: Sendable {
    /// Groups per merged layer (uniform), or the average per merged layer (adaptive).
    public var groups: Int
    public var adaptive = false
    public var grouping: GroupingMethod = .dominant
    /// Similarity base name (router-logits, weight, feature, expert-output).
    public var similarity = "router-logits"
    /// Layers to merge (nil = all); others are copied unchanged.
    public var layers: [String]? = nil
    public var merge = MergeOptions(method: .regmeanRefit)

    public init(groups: Int, adaptive: Bool = false, grouping: GroupingMethod = .dominant, similarity: String = "router-logits",
                layers: [String]? = nil, merge: MergeOptions = MergeOptions(method: .regmeanRefit)) {
        self.groups = groups
        self.adaptive = adaptive
        self.grouping = grouping
        self.similarity = similarity
        self.layers = layers
        self.merge = merge
    }

    /// Checks the settings against the model's layers; returns the names of the merged layers.
    public func mergedLayers(of configs: [LayerConfig], file: String) throws -> [String] {
        try merge.validate()
        if let wanted = layers {
            for n in wanted where !configs.contains(where: { $0.name == n }) {
                throw SMoEError.option("--layers", "\(file) has no MoE layer named '\(n)'")
            }
        }
        let names = configs.map(\.name).filter { layers?.contains($0) ?? true }
        guard groups >= 1 else { throw SMoEError.option("--groups", "must be at least 1 (got \(groups))") }
        for c in configs where names.contains(c.name) && groups > c.numExperts {
            throw SMoEError.option("--groups", "\(groups) is more than the \(c.numExperts) experts of layer \(c.name)")
        }
        if adaptive && grouping == .hierarchical {
            throw SMoEError.option("--adaptive", "applies to --method dominant only")
        }
        return names
    }
}

/// What merging did to one layer.
public struct LayerMergeReport: Sendable {
    public var name: String
    public var grouping: LayerGrouping
    public var groups: [MergedGroup]

    public var json: JSONValue {
        .object([("name", .string(name)), ("groups", .int(groups.count)), ("expert_map", JSONValue(grouping.slotToGroup)),
                 ("members", .array(groups.map(\.json)))])
    }

    /// The compact form recorded in the checkpoint history.
    public var historyJSON: JSONValue {
        .object([("name", .string(name)), ("groups", .array(grouping.groups.map { JSONValue($0) })),
                 ("dominant", JSONValue(grouping.dominant))])
    }
}

/// The merge stage over a whole model: plan groupings (adaptive budgets need every layer's
/// usage), then merge layer by layer.
public enum MergeStage {
    /// Groupings of the merged layers, from their usage and similarity.
    public static func plan(_ inputs: [(name: String, input: GroupingInput)], settings: MergeSettings) throws -> [String: LayerGrouping] {
        var out: [String: LayerGrouping] = [:]
        if settings.adaptive {
            let dominants = try Grouping.adaptiveDominants(frequencies: inputs.map(\.input.frequency), groupsPerLayer: settings.groups)
            for (i, (name, input)) in inputs.enumerated() {
                out[name] = Grouping.assign(dominant: dominants[i], frequency: input.frequency, similarity: input.similarity)
            }
            return out
        }
        for (name, input) in inputs {
            switch settings.grouping {
            case .dominant:
                out[name] = try Grouping.uniform(frequency: input.frequency, similarity: input.similarity, groups: settings.groups)
            case .hierarchical:
                // Average linkage is unchanged by adding a constant, so −similarity is a distance.
                out[name] = try Grouping.hierarchical(distance: input.similarity.map { -$0 }, frequency: input.frequency,
                                                      groups: settings.groups)
            }
        }
        return out
    }

    /// What merging a factored layer says: alignment and averaging work on dense weights only.
    static let factoredMessage = "merge needs dense experts, but this layer is factored (merge before lowrank, or run expand first)"

    /// Throws unless every merged layer of `model` stores dense experts (checked from the file's
    /// layout, before any work), naming the file and the first factored layer.
    public static func checkDense(model: CheckpointReader, layers names: [String]) throws {
        for name in names where try model.summary(name).isCompressed {
            throw SMoEError.dataset(model.path, name, factoredMessage)
        }
    }

    /// Merges one layer with its planned grouping.
    public static func apply(_ layer: MoELayer, grouping: LayerGrouping, frequency: [Double], settings: MergeSettings,
                             tokens: TokenBlocks?, progress: ProgressCallback? = nil) throws -> (layer: MoELayer, report: LayerMergeReport) {
        if layer.experts.contains(where: { $0.namedMatrices.contains { $0.op.isFactored } }) {
            throw SMoEError("\(layer.name): \(factoredMessage)")
        }
        let (merged, groups) = try Merging.mergeLayer(layer, grouping: grouping, frequency: frequency, options: settings.merge,
                                                      tokens: tokens, progress: progress)
        return (merged, LayerMergeReport(name: layer.name, grouping: grouping, groups: groups))
    }

    /// The history entry of a merge.
    public static func historyEntry(_ settings: MergeSettings, calibration: String?, reports: [LayerMergeReport]) -> JSONValue {
        var kv: [(String, JSONValue)] = [
            ("stage", "merge"), ("tool", .string("smoe-compress \(smoeCompressVersion)")), ("groups", .int(settings.groups)),
            ("adaptive", .bool(settings.adaptive)), ("method", .string(settings.grouping.rawValue)),
            ("similarity", .string(settings.similarity)), ("merge_method", .string(settings.merge.method.rawValue)),
            ("align", .bool(settings.merge.align)),
        ]
        if settings.merge.method != .frequency {
            kv.append(("regmean_alpha", .double(settings.merge.alpha)))
            kv.append(("regmean_ridge", .double(settings.merge.ridge)))
            if settings.merge.method == .regmeanRefit { kv.append(("refit_ridge", .double(settings.merge.refitRidge))) }
        }
        if let c = calibration { kv.append(("calibration", .string(c))) }
        kv.append(("layers", .array(reports.map(\.historyJSON))))
        return .object(kv)
    }
}

extension MergeStage {
    /// Usage and similarity of each merged layer: from a statistics file when it has them,
    /// otherwise computed on the calibration tokens.
    public static func groupingInputs(
        model: CheckpointReader, layers names: [String], base: SimilarityBase, stats: StatsReader?,
        calibration: CalibrationReader?, blockSize: Int = Statistics.defaultBlockSize, maxTokens: Int? = nil,
        progress: ProgressCallback? = nil
    ) throws -> [(name: String, input: GroupingInput)] {
        if let s = stats { try s.checkMatches(model, layers: names) }
        return try names.map { name in
            if let s = stats, try s.info(name).bases.contains(base) {
                return (name, GroupingInput(frequency: try s.frequency(name), similarity: try s.similarity(name, base).values))
            }
            guard let calib = calibration else {
                throw SMoEError.option("--calib", "is needed: \(stats.map { "\($0.path) has no \(base.rawValue) similarity for \(name)" } ?? "no --stats given")")
            }
            let st = try Statistics.compute(layer: try model.readLayer(name), calibration: calib, bases: [base],
                                            blockSize: blockSize, maxTokens: maxTokens, progress: progress)
            return (name, GroupingInput(frequency: st.frequency, similarity: st.similarity[base]!.values))
        }
    }

    /// Merges `model` layer by layer, handing every layer (merged, or unchanged when not in
    /// `settings.layers`) to `sink` in index order. Memory: one layer at a time.
    @discardableResult
    public static func run(
        model: CheckpointReader, calibration: CalibrationReader?, stats: StatsReader?, settings: MergeSettings,
        blockSize: Int = Statistics.defaultBlockSize, maxTokens: Int? = nil, progress: ProgressCallback? = nil,
        sink: (_ original: MoELayer, _ result: MoELayer, _ report: LayerMergeReport?) throws -> Void
    ) throws -> [LayerMergeReport] {
        let names = try settings.mergedLayers(of: model.layers, file: model.path)
        try checkDense(model: model, layers: names)
        guard let base = SimilarityBase(rawValue: settings.similarity) else {
            throw SMoEError.option("--similarity", "unknown base '\(settings.similarity)' (router-logits, weight, feature, expert-output)")
        }
        if let c = calibration { try c.checkMatches(model, layers: names) }
        if settings.merge.method != .frequency && calibration == nil {
            throw SMoEError.option("--merge-method", "\(settings.merge.method.rawValue) needs calibration tokens (--calib)")
        }
        let inputs = try groupingInputs(model: model, layers: names, base: base, stats: stats, calibration: calibration,
                                        blockSize: blockSize, maxTokens: maxTokens, progress: progress)
        let plans = try plan(inputs, settings: settings)
        let freq = Dictionary(uniqueKeysWithValues: inputs.map { ($0.name, $0.input.frequency) })
        var reports: [LayerMergeReport] = []
        for c in model.layers {
            let layer = try model.readLayer(c.name)
            guard let grouping = plans[c.name] else {
                try sink(layer, layer, nil)
                continue
            }
            let tokens = calibration.map { $0.tokenBlocks(c.name, blockSize: blockSize, maxTokens: maxTokens) }
            let (merged, report) = try apply(layer, grouping: grouping, frequency: freq[c.name]!, settings: settings,
                                             tokens: tokens, progress: progress)
            reports.append(report)
            try sink(layer, merged, report)
        }
        return reports
    }
}
