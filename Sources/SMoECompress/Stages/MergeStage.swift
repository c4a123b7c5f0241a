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
    /// Groups per merged layer (uniform), or the average per merged layer (adaptive); nil when
    /// not given, which only a size plan (`CompressSettings.target`) allows: it chooses them.
    public var groups: Int?
    public var adaptive = false
    public var grouping: GroupingMethod = .dominant
    /// What slots are compared by; nil: router-logits, expert-output with hierarchical grouping.
    public var similarity: SimilarityBase? = nil
    /// Layers to merge (nil = all); others are copied unchanged.
    public var layers: [String]? = nil
    /// How each group becomes one expert.
    public var merging = MergeOptions(method: .regmeanRefit)
    public var tokens = TokenSettings()
    /// E router slots with an `expert_map`, or a compact layer of G fitted router rows.
    public var router: RouterLayout = .slots
    /// With the compact layout: after the router fit, refit each expert's down (and down bias)
    /// to the original layer's output under the compact routing (ALGORITHM.md §3a). nil: on
    /// with the compact layout (it lowers the mean held-out layer error on both bundled trained
    /// fixtures; README, "A compact model for the serving stack"); true needs the compact layout.
    public var compactRefit: Bool? = nil
    /// Prune instead of merging (ALGORITHM.md §3c): keep the `groups` experts of largest
    /// saliency with their router rows, a compact layer by construction (the layout is then
    /// `compact`, and the refit of the kept experts is on unless `compactRefit` is false).
    public var prune: PruneMethod? = nil
    /// What the refit of the experts' `down` aims at. `.capture` refits every merged layer to the
    /// capture's stored outputs: the compact (or pruned) layer's expert refit, or for E router
    /// slots an extra refit of the merged experts under the slot routing (ALGORITHM.md §3d).
    public var refitTargets: RefitTargets = .layer

    /// A memory budget in bytes: once the groupings are planned, the calibration block is
    /// lowered so that every merged layer's predicted peak (`MemoryModel`, with its planned
    /// largest group) fits, or the stage stops naming the smallest budget that would work.
    public var maxMemory: Int? = nil
    /// Whether the merged experts are factored after (compress --rank): the budget covers that.
    public var factoredAfter = false
    /// Whether that factoring may whiten through the larger side's input Gram
    /// (`LowRankOptions.needsLargeGram`, `MemoryModel`).
    public var factoredLargeGram = true

    /// Whether the experts of the compact layers are refitted.
    public var refitsCompactExperts: Bool { router == .compact && (compactRefit ?? true) }

    public init(groups: Int?, adaptive: Bool = false, grouping: GroupingMethod = .dominant, similarity: SimilarityBase? = nil,
                layers: [String]? = nil, merging: MergeOptions = MergeOptions(method: .regmeanRefit),
                tokens: TokenSettings = TokenSettings(), router: RouterLayout = .slots, compactRefit: Bool? = nil,
                prune: PruneMethod? = nil) {
        // A pruned layer is compact by construction.
        self.router = prune != nil ? .compact : router
        self.prune = prune
        self.compactRefit = compactRefit
        self.groups = groups
        self.adaptive = adaptive
        self.grouping = grouping
        self.similarity = similarity
        self.layers = layers
        self.merging = merging
        self.tokens = tokens
    }

    /// The similarity grouping uses.
    public var similarityBase: SimilarityBase { similarity ?? (grouping == .hierarchical ? .expertOutput : .routerLogits) }

    /// Checks every setting against the model, once; returns the merged layers in index order.
    public func validate(for model: CheckpointReader) throws -> [String] {
        if refitTargets == .capture && router == .compact && compactRefit == false {
            throw SMoEError.setting(.refitTargets, "capture needs the refit of the compact experts: drop {compact-refit}'s no")
        }
        if prune != nil {
            if adaptive { throw SMoEError.setting(.prune, "keeps the same number of experts in every layer (a Hugging Face config holds one expert count): drop {adaptive}") }
        }
        try merging.validate()
        try tokens.validate()
        let names = try model.selectLayers(layers)
        guard let groups else { throw SMoEError.setting(.groups, "is needed: how many experts each merged layer keeps") }
        guard groups >= 1 else { throw SMoEError.setting(.groups, "must be at least 1 (got \(groups))") }
        for c in model.layers where names.contains(c.name) && groups > c.numExperts {
            throw SMoEError.setting(.groups, "\(groups) is more than the \(c.numExperts) experts of layer \(c.name)")
        }
        if adaptive && grouping == .hierarchical {
            throw SMoEError.setting(.adaptive, "applies to {grouping} dominant only")
        }
        if compactRefit == true && router != .compact {
            throw SMoEError.setting(.compactRefit, "refits the experts of a compact layer under its fitted router, so it needs {router} compact")
        }
        if router == .compact {
            let left = model.layers.map(\.name).filter { !names.contains($0) }
            if !left.isEmpty {
                throw SMoEError.setting(.router, "compact needs every MoE layer merged (a Hugging Face config holds one expert count), but {layers} leaves \(left.joined(separator: ", ")) with their experts")
            }
            if prune != nil, let c = model.layers.first(where: { $0.numGroups > 1 }) {
                throw SMoEError.setting(.prune, "drops router slots, which breaks the \(c.numGroups) expert groups of \(model.architecture) layer \(c.name) (grouped top-k); merge with the default {router} slots")
            }
            if prune == nil {
                for c in model.layers {
                    // With adaptive groups the planned counts are checked in validateCompact.
                    if !adaptive, let why = c.compactProblem(groups: groups) {
                        throw SMoEError.setting(.router, "compact: \(model.architecture) layer \(c.name): \(why); merge with the default {router} slots")
                    }
                }
            }
            if !adaptive, let c = model.layers.first(where: { $0.topK > groups }) {
                throw SMoEError.setting(prune != nil ? .prune : .router, "\(prune != nil ? "keeps" : "compact needs") top_k ≤ {groups}, but layer \(c.name) routes each token to \(c.topK) experts and {groups} is \(groups)")
            }
        }
        return names
    }

    /// The checks of the compact layout that need the planned groupings (adaptive budgets):
    /// one group count in every layer, and top_k ≤ G.
    func validateCompact(_ groupings: [String: LayerGrouping], model: CheckpointReader) throws {
        guard router == .compact else { return }
        let counts = model.layers.compactMap { c in groupings[c.name].map { (c, $0.groups.count) } }
        if Set(counts.map(\.1)).count > 1 {
            throw SMoEError.setting(.router, "compact needs the same number of groups in every layer (a Hugging Face config holds one expert count), but {adaptive} planned "
                + counts.map { "\($0.0.name): \($0.1)" }.joined(separator: ", ") + "; give a uniform {groups} without {adaptive}")
        }
        for (c, g) in counts {
            if let why = c.compactProblem(groups: g) {
                throw SMoEError.setting(.router, "compact: layer \(c.name): \(why)")
            }
        }
        for (c, g) in counts where c.topK > g {
            throw SMoEError.setting(.router, "compact needs top_k ≤ groups, but layer \(c.name) routes each token to \(c.topK) experts and has \(g) groups")
        }
    }
}

/// What merging did to one layer.
public struct LayerMergeReport: Sendable {
    public var name: String
    public var grouping: LayerGrouping
    public var groups: [MergedGroup]
    /// The router fit, when the layer was made compact.
    public var compact: CompactRouterReport? = nil
    /// The similarity the grouping used (row-major E×E, by base name), when the stage had it.
    public var similarity: (base: String, values: [Double])? = nil
    /// What pruning kept and dropped, when the layer was pruned (`grouping` then holds the kept
    /// slots as single groups, and `groups` is empty).
    public var prune: PruneReport? = nil

    /// The refit of the merged experts under the layer's E router slots to the capture's outputs
    /// (`RefitTargets.capture` without the compact layout).
    public var layerRefit: CompactRefitReport? = nil

    /// Original slot → expert of a compact (fitted or pruned) layer, −1 for a pruned slot; nil
    /// for a layer that keeps its E router slots.
    public var compactSlots: [Int]? { prune?.slotToExpert ?? compact?.slotToGroup }

    /// The grouping's index of each stored expert: the compact fit may store the groups in
    /// another order (grouped top-k: by expert group), else the identity.
    var storedOrder: [Int] {
        guard let c = compact else { return Array(grouping.groups.indices) }
        return c.groups.map { slots in grouping.groups.firstIndex(of: slots) ?? 0 }
    }

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [("name", .string(name)), ("groups", .int(grouping.groups.count))]
        if prune == nil {
            kv += [("expert_map", JSONValue(compact?.slotToGroup ?? grouping.slotToGroup)),
                   ("members", .array(groups.isEmpty ? [] : storedOrder.map { groups[$0].json }))]
        }
        if let c = compact { kv.append(("compact_router", c.json)) }
        if let (base, m) = similarity {
            let e = Int(Double(m.count).squareRoot())
            kv.append(("similarity", .object([("base", .string(base)),
                                              ("matrix", .array((0..<e).map { JSONValue(Array(m[($0 * e)..<($0 * e + e)])) }))])))
        }
        if let p = prune { kv.append(("prune", p.json)) }
        if let r = layerRefit { kv.append(("layer_refit", r.json)) }
        return .object(kv)
    }

    /// The compact form recorded in the checkpoint history.
    public var historyJSON: JSONValue {
        let order = storedOrder
        var kv: [(String, JSONValue)] = [("name", .string(name)), ("groups", .array(order.map { JSONValue(grouping.groups[$0]) })),
                                         ("dominant", JSONValue(order.map { grouping.dominant[$0] }))]
        if let c = compact {
            kv += [("router_cross_entropy", .double(c.fitted.crossEntropy)), ("router_top_k_agreement", .double(c.fitted.topKAgreement))]
        }
        if let p = prune {
            kv += [("pruned", JSONValue(p.dropped)), ("saliency", JSONValue(p.saliency))]
        }
        if let r = compact?.refit ?? prune?.refit ?? layerRefit {
            kv += [("refit_calibration_error_before", .double(r.before)), ("refit_calibration_error_after", .double(r.after))]
        }
        return .object(kv)
    }
}

/// The merge stage: plans every merged layer's grouping up front (adaptive budgets need every
/// layer's usage), then merges layer by layer.
public struct MergeStage: LayerStage {
    public let name = "merge"
    public let settings: MergeSettings
    public let layers: [String]
    public let calibration: CalibrationReader?
    /// Each merged layer's grouping and slot usage.
    public let plans: [String: (grouping: LayerGrouping, frequency: [Double])]
    /// Each planned layer's grouping similarity (row-major E×E), for the reports.
    public let similarities: [String: [Double]]

    /// Validates the settings against the inputs and plans the groupings (statistics from
    /// `stats` where it has them, else computed on the calibration tokens). With `shard`, a
    /// uniform grouping plans only the shard's layers; an adaptive one still plans every layer
    /// (one global budget), from `stats`, which it then needs.
    public init(model: CheckpointReader, calibration: CalibrationReader?, stats: StatsReader?, settings: MergeSettings,
                shard: Shard? = nil, progress: ProgressCallback? = nil) throws {
        var settings = settings
        if settings.prune != nil { settings.router = .compact }
        let names = try settings.validate(for: model)
        try MergeStage.checkDense(model: model, layers: names)
        if let c = calibration { try c.checkMatches(model, layers: names) }
        if settings.refitTargets == .capture {
            guard let c = calibration else {
                throw SMoEError.setting(.refitTargets, "capture refits to a capture's outputs ({calibration})")
            }
            for name in names where !(try c.info(name).hasOutput) {
                throw SMoEError.dataset(c.path, "/moe_layers/\(name)/output", "missing: {refit-targets} capture refits to the outputs a capture stores")
            }
        }
        if let p = settings.prune, calibration == nil {
            throw SMoEError.setting(.prune, "\(p.rawValue) ranks the experts on calibration tokens ({calibration})")
        }
        if settings.merging.method != .frequency && calibration == nil {
            throw SMoEError.setting(.mergeMethod, "\(settings.merging.method.rawValue) needs calibration tokens ({calibration})")
        }
        if settings.router == .compact && calibration == nil {
            throw SMoEError.setting(.router, "compact fits the router on calibration tokens ({calibration})")
        }
        guard settings.prune == nil else {
            // Pruning plans nothing up front: each layer ranks its own experts as it is reached.
            if let budget = settings.maxMemory {
                let work = model.layers.filter { names.contains($0.name) }.map {
                    ($0, MemoryModel.Work.merge(groups: settings.groups ?? 1, largestGroup: 1, outputAware: true, lowRank: settings.factoredAfter,
                                                largeGram: settings.factoredLargeGram))
                }
                settings.tokens.blockSize = try MemoryModel.blockSize(work, budget: budget, requested: settings.tokens.blockSize)
            }
            self.settings = settings
            self.layers = names
            self.calibration = calibration
            self.plans = [:]
            self.similarities = [:]
            return
        }
        let planned = try MergeStage.plannedLayers(names, model: model, shard: shard, adaptive: settings.adaptive, stats: stats)
        let inputs = try MergeStage.groupingInputs(model: model, layers: planned, base: settings.similarityBase, stats: stats,
                                                   calibration: calibration, tokens: settings.tokens, progress: progress)
        let groupings = MergeStage.plan(inputs, settings: settings)
        try settings.validateCompact(groupings, model: model)
        if let budget = settings.maxMemory {
            let work = model.layers.compactMap { c in
                groupings[c.name].map { g in
                    (c, MemoryModel.Work.merge(groups: g.groups.count, largestGroup: g.groups.map(\.count).max(),
                                               outputAware: settings.merging.method != .frequency, lowRank: settings.factoredAfter,
                                               largeGram: settings.factoredLargeGram))
                }
            }
            settings.tokens.blockSize = try MemoryModel.blockSize(work, budget: budget, requested: settings.tokens.blockSize)
        }
        self.settings = settings
        self.layers = names
        self.calibration = calibration
        self.plans = Dictionary(uniqueKeysWithValues: inputs.map { ($0.name, (groupings[$0.name]!, $0.input.frequency)) })
        self.similarities = Dictionary(uniqueKeysWithValues: inputs.map { ($0.name, $0.input.similarity) })
    }

    /// A group's experts are read when it is merged.
    public func process(source: LayerSource, progress: ProgressCallback?) throws -> (output: MoELayer, report: LayerMergeReport) {
        if let method = settings.prune { return try prune(source, method: method, progress: progress) }
        let plan = plans[source.name]!
        var result = try merge(source, grouping: plan.grouping, frequency: plan.frequency, progress: progress)
        result.report.similarity = similarities[source.name].map { (settings.similarityBase.rawValue, $0) }
        return result
    }

    /// Merges `layer` with a grouping decided elsewhere (a size plan), as `process` does with its
    /// own: merge, then (with the compact router) fit the router and refit the experts.
    public func merge(_ layer: LayerSource, grouping: LayerGrouping, frequency: [Double],
                      progress: ProgressCallback?) throws -> (output: MoELayer, report: LayerMergeReport) {
        var settings = self.settings
        settings.groups = grouping.groups.count
        let tokens = calibration.map { $0.tokenBlocks(layer.name, settings.tokens) }
        var (merged, report) = try MergeStage.apply(layer, grouping: grouping, frequency: frequency,
                                                    settings: settings, tokens: tokens, progress: progress)
        if settings.router == .compact, let tokens {
            progress?("fitting the router of \(layer.name)", 0, 1)
            let (compact, fit) = try CompactRouter.compact(merged, frequency: frequency, tokens: tokens)
            merged = compact
            report.compact = fit
            if settings.refitsCompactExperts {
                (merged, report.compact!.refit) = try CompactRefit.refit(merged, original: layer, slotGroups: fit.slotToGroup, tokens: tokens,
                                                                          targets: captureTargets(layer.name),
                                                                          ridge: settings.merging.refitRidge, progress: progress)
            }
        } else if let targets = captureTargets(layer.name), let tokens {
            (merged, report.layerRefit) = try CompactRefit.refit(merged, original: layer, slotGroups: nil, tokens: tokens, targets: targets,
                                                                 ridge: settings.merging.refitRidge, progress: progress)
        }
        return (merged, report)
    }

    /// Prunes `layer` to the `settings.groups` experts of largest saliency, then (unless
    /// `compactRefit` is false) refits the kept experts under the pruned routing.
    public func prune(_ layer: LayerSource, method: PruneMethod, progress: ProgressCallback?) throws -> (output: MoELayer, report: LayerMergeReport) {
        guard let groups = settings.groups else { preconditionFailure("MergeSettings.validate requires groups") }
        return try prune(layer, method: method, groups: groups, refit: settings.refitsCompactExperts, progress: progress)
    }

    /// Prunes `layer` to `groups` experts (a size plan's choice for one layer), refitting when
    /// `refit`.
    public func prune(_ layer: LayerSource, method: PruneMethod, groups: Int, refit: Bool,
                      progress: ProgressCallback?) throws -> (output: MoELayer, report: LayerMergeReport) {
        let tokens = calibration!.tokenBlocks(layer.name, settings.tokens)
        let (saliency, counts) = try Pruning.saliency(layer, method: method, tokens: tokens, progress: progress)
        let kept = Pruning.keep(saliency, groups: groups)
        var report = PruneReport(method: method, saliency: saliency, tokens: counts, kept: kept)
        var pruned = try Pruning.pruned(layer, kept: kept)
        if refit {
            (pruned, report.refit) = try CompactRefit.refit(pruned, original: layer, slotGroups: report.slotToExpert, tokens: tokens,
                                                            targets: captureTargets(layer.name), ridge: settings.merging.refitRidge,
                                                            progress: progress)
        }
        return (pruned, LayerMergeReport(name: layer.name, grouping: LayerGrouping(groups: kept.map { [$0] }, dominant: kept),
                                         groups: [], prune: report))
    }

    /// The capture's outputs for `layer`, when the refits aim at them.
    func captureTargets(_ layer: String) -> TargetBlocks? {
        settings.refitTargets == .capture ? calibration?.targetBlocks(layer, settings.tokens) : nil
    }

    public func historyEntry(_ reports: [LayerMergeReport]) -> JSONValue {
        MergeStage.historyEntry(settings, calibration: calibration?.path, reports: reports)
    }

    /// Groupings of the merged layers, from their usage and similarity.
    public static func plan(_ inputs: [(name: String, input: GroupingInput)], settings: MergeSettings) -> [String: LayerGrouping] {
        var out: [String: LayerGrouping] = [:]
        guard let groups = settings.groups else { preconditionFailure("MergeSettings.validate requires groups") }
        if settings.adaptive {
            let dominants = Grouping.adaptiveDominants(frequencies: inputs.map(\.input.frequency), groupsPerLayer: groups)
            for (i, (name, input)) in inputs.enumerated() {
                out[name] = Grouping.assign(dominant: dominants[i], frequency: input.frequency, similarity: input.similarity)
            }
            return out
        }
        for (name, input) in inputs {
            switch settings.grouping {
            case .dominant:
                out[name] = Grouping.uniform(frequency: input.frequency, similarity: input.similarity, groups: groups)
            case .hierarchical:
                // Average linkage is unchanged by adding a constant, so −similarity is a distance.
                out[name] = Grouping.hierarchical(distance: input.similarity.map { -$0 }, frequency: input.frequency,
                                                      groups: groups)
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
            throw SMoEError.layer(layer.name, factoredMessage)
        }
        return try apply(LayerSource(layer), grouping: grouping, frequency: frequency, settings: settings, tokens: tokens,
                         progress: progress)
    }

    /// `apply` reading the experts from `layer` one group at a time (dense: `checkDense`).
    public static func apply(_ layer: LayerSource, grouping: LayerGrouping, frequency: [Double], settings: MergeSettings,
                             tokens: TokenBlocks?, progress: ProgressCallback? = nil) throws -> (layer: MoELayer, report: LayerMergeReport) {
        let (merged, groups) = try Merging.mergeLayer(layer, grouping: grouping, frequency: frequency, options: settings.merging,
                                                      tokens: tokens, progress: progress)
        return (merged, LayerMergeReport(name: layer.name, grouping: grouping, groups: groups))
    }

    /// The history entry of a merge.
    public static func historyEntry(_ settings: MergeSettings, calibration: String?, reports: [LayerMergeReport]) -> JSONValue {
        var kv: [(String, JSONValue)] = [
            ("stage", "merge"), ("tool", .string("smoe-compress \(smoeCompressVersion)")), ("groups", settings.groups.map(JSONValue.int) ?? .null),
            ("adaptive", .bool(settings.adaptive)), ("method", .string(settings.grouping.rawValue)),
            ("similarity", .string(settings.similarityBase.rawValue)), ("merge_method", .string(settings.merging.method.rawValue)),
            ("align", .bool(settings.merging.align)),
        ]
        if settings.merging.method != .frequency {
            kv.append(("regmean_alpha", .double(settings.merging.alpha)))
            kv.append(("regmean_ridge", .double(settings.merging.ridge)))
            if settings.merging.method == .regmeanRefit { kv.append(("refit_ridge", .double(settings.merging.refitRidge))) }
            if let m = settings.merging.minTokens { kv.append(("regmean_min_tokens", .int(m))) }
        }
        if let p = settings.prune { kv.append(("prune", .string(p.rawValue))) }
        if settings.refitTargets != .layer { kv.append(("refit_targets", .string(settings.refitTargets.rawValue))) }
        if let c = calibration { kv.append(("calibration", .string(c))) }
        if settings.router == .compact { kv.append(("router", .string(settings.router.rawValue))) }
        if settings.router == .compact { kv.append(("compact_refit", .bool(settings.refitsCompactExperts))) }
        kv.append(("layers", .array(reports.map(\.historyJSON))))
        return .object(kv)
    }
}

extension MergeStage {
    /// Usage and similarity of each merged layer: from a statistics file when it has them,
    /// otherwise computed on the calibration tokens.
    public static func groupingInputs(
        model: CheckpointReader, layers names: [String], base: SimilarityBase, stats: StatsReader?,
        calibration: CalibrationReader?, tokens: TokenSettings = TokenSettings(), progress: ProgressCallback? = nil
    ) throws -> [(name: String, input: GroupingInput)] {
        if let s = stats { try s.checkMatches(model, layers: names) }
        return try names.map { name in
            if let s = stats, try s.info(name).bases.contains(base) {
                return (name, GroupingInput(frequency: try s.frequency(name), similarity: try s.similarity(name, base).values))
            }
            guard let calib = calibration else {
                throw SMoEError.setting(.calibration, "is needed: \(stats.map { "\($0.path) has no \(base.rawValue) similarity for \(name)" } ?? "no {stats} given")")
            }
            // Router-logit and feature statistics need the router only; weight and expert-output
            // similarities read the experts (the whole layer).
            let layer = base.needsExperts ? try model.readLayer(name) : try model.layerSource(name).header
            let st = try Statistics.compute(layer: layer, calibration: calib, bases: [base], tokens: tokens, progress: progress)
            return (name, GroupingInput(frequency: st.frequency, similarity: st.similarity[base]!.values))
        }
    }
}

// MARK: sharded runs

extension MergeStage {
    /// The settings, the tokens and, for adaptive grouping, the global plan (every layer's
    /// groups), so shards that planned differently (other statistics) do not assemble.
    public var settingsRecord: JSONValue {
        var extra: [(String, JSONValue)] = [("tokens", settings.tokens.record)]
        if settings.adaptive {
            extra.append(("plan", .object(layers.compactMap { n in
                plans[n].map { (n, .array($0.grouping.groups.map { JSONValue($0) })) }
            })))
        }
        return historyEntry([]).adding(extra)
    }
}

extension MergeStage {
    /// The layers a merge plans: all selected ones, or with a shard and uniform grouping only
    /// the shard's; adaptive grouping with a shard needs a statistics file of every layer.
    static func plannedLayers(_ names: [String], model: CheckpointReader, shard: Shard?, adaptive: Bool,
                              stats: StatsReader?) throws -> [String] {
        guard let shard else { return names }
        if adaptive {
            guard stats != nil else {
                throw SMoEError.setting(.stats, "is needed with {adaptive} and {shard}: the global plan is made from the statistics of every layer (run stats first)")
            }
            return names
        }
        let mine = Set(try model.shardLayers(shard))
        return names.filter(mine.contains)
    }
}
