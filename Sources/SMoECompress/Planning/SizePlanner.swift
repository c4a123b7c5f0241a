import Foundation

/// The size `compress` is asked to reach.
public enum TargetSize: Sendable, Equatable {
    /// A fraction (0, 1] of the original expert bytes of the selected layers.
    case fraction(Double)
    /// An absolute number of expert bytes.
    case bytes(Int)

    /// `0.5` (a fraction when the number is at most 1) or a size such as `20GB`, `500MiB`, `300000`.
    public static func parse(_ text: String) throws -> TargetSize {
        if let f = Double(text.trimmingCharacters(in: .whitespaces)), f <= 1 {
            guard f > 0 else { throw SMoEError.setting(.targetSize, "a fraction must be in (0, 1] (got \(text))") }
            return .fraction(f)
        }
        do { return .bytes(try parseByteSize(text)) } catch {
            throw SMoEError.setting(.targetSize, "'\(text)' is neither a fraction in (0, 1] nor a size such as 20GB or 500MB")
        }
    }

    public func bytes(original: Int) -> Int {
        switch self {
        case .fraction(let f): return Int((f * Double(original)).rounded(.down))
        case .bytes(let b): return b
        }
    }

    public var json: JSONValue {
        switch self {
        case .fraction(let f): return .object([("fraction", .double(f))])
        case .bytes(let b): return .object([("bytes", .int(b))])
        }
    }
}

/// Settings of the size planner (ALGORITHM.md §4.3).
public struct PlannerSettings: Sendable, Equatable {
    public var target: TargetSize
    /// The groups per layer the planner may choose; nil: every G from 1 to the layer's experts.
    public var groupCandidates: [Int]? = nil
    /// The same G in every layer (the compact-router export needs it).
    public var uniformGroups = false
    /// The held-apart split: token t of a layer belongs to chunk ⌊t / chunkTokens⌋, and every
    /// `heldOutEvery`-th chunk (chunk c with c mod heldOutEvery = heldOutEvery − 1) is held apart
    /// to estimate errors; the others merge and whiten.
    public var chunkTokens = 64
    public var heldOutEvery = 5
    /// Low-rank byte levels tried per (layer, G): k/levels of the layer's original expert bytes.
    public var levels = 16
    /// A layer's fitting tokens are held in memory while it is planned when they take at most
    /// this many bytes (as float32), else re-read for every option.
    public var cacheBytes = 256 << 20
    /// Per-layer loss sensitivities: the plan minimises Σ_l c_l·e_l² instead of the default
    /// objective (`PlanObjective`).
    public var sensitivity: LayerSensitivity? = nil
    /// Also consider pruning each layer to G experts by this saliency (then refit unless
    /// `pruneRefit` is false) beside merging it; the plan says per layer which was chosen.
    public var prune: PruneMethod? = nil
    public var pruneRefit = true
    /// Which of the measured options the plan may take per layer (with `prune` set).
    public var methods: PlanMethods = .both

    public init(target: TargetSize, groupCandidates: [Int]? = nil, uniformGroups: Bool = false,
                sensitivity: LayerSensitivity? = nil) {
        self.target = target
        self.groupCandidates = groupCandidates
        self.uniformGroups = uniformGroups
        self.sensitivity = sensitivity
    }

    /// What the plan minimises over the layers' held-apart errors e_l (ALGORITHM.md §4.3).
    public var objectiveName: String {
        sensitivity == nil ? PlannerSettings.defaultObjective : "sum of c_l * e_l^2, c_l from \(sensitivity!.path)"
    }
    static let defaultObjective = "sum of e_l (the mean layer error)"

    /// The cost of error `e` in `layer`: c_l·e² with sensitivities, e without.
    func cost(_ layer: String, error e: Double) -> Double {
        sensitivity.map { $0.cost(layer, error: e) } ?? e
    }

    func validate() throws {
        switch target {
        case .fraction(let f): if !(f > 0 && f <= 1) { throw SMoEError.setting(.targetSize, "a fraction must be in (0, 1] (got \(f))") }
        case .bytes(let b): if b < 1 { throw SMoEError.setting(.targetSize, "must be at least 1 byte (got \(b))") }
        }
        if let g = groupCandidates, g.isEmpty || g.contains(where: { $0 < 1 }) {
            throw SMoEError.setting(.groups, "the planner's group candidates must be at least 1 (got \(g))")
        }
        if methods == .prune && prune == nil {
            throw SMoEError.setting(.targetSize, "a prune-only plan needs a prune method to measure")
        }
        if chunkTokens < 1 || heldOutEvery < 2 || levels < 1 {
            throw SMoEError.setting(.targetSize, "planner split needs chunks ≥ 1 token, every ≥ 2, levels ≥ 1")
        }
    }
}

/// Which options a plan may take per layer when pruning is measured beside merging: both (the
/// per-layer choice), merged ones only, or pruned ones only. The layer left at its E experts
/// (G = E, dense or factored) merges and prunes nothing, so it is allowed in all three.
public enum PlanMethods: String, Sendable, Equatable, CaseIterable {
    case both, merge, prune

    func allows(_ prune: PruneMethod?, groups: Int, experts: Int) -> Bool {
        switch self {
        case .both: return true
        case .merge: return prune == nil
        case .prune: return prune != nil || groups == experts
        }
    }
}

/// What the plan does to one layer.
public struct LayerPlan: Sendable, Equatable {
    public var name: String
    public var groups: Int
    public var grouping: LayerGrouping
    public var frequency: [Double]
    /// `LowRankOptions.rankKey` → rank; empty: the merged experts stay dense.
    public var ranks: [String: Int]
    /// Expert bytes as planned (in the output float type) and in the original file.
    public var bytes: Int
    public var bytesOriginal: Int
    /// Relative layer output error on the held-apart tokens.
    public var estimatedError: Double
    /// The similarity the grouping used (row-major E×E), for the reports.
    public var similarity: [Double] = []
    /// Pruned (keeping `grouping`'s singleton groups' experts) instead of merged.
    public var prune: PruneMethod? = nil

    /// "merge" or "prune reap".
    public var method: String { prune.map { "prune \($0.rawValue)" } ?? "merge" }

    /// "dense", "12" or "8-31".
    public var rankSummary: String { rankRange(Array(ranks.values)) }

    public var json: JSONValue {
        .object([("name", .string(name)), ("method", .string(method)), ("groups", .int(groups)),
                 (prune == nil ? "expert_map" : "kept", JSONValue(prune == nil ? grouping.slotToGroup : grouping.dominant)),
                 ("ranks", .object(ranks.sorted { $0.key < $1.key }.map { ($0.key, .int($0.value)) })),
                 ("expert_bytes", .int(bytes)), ("expert_bytes_original", .int(bytesOriginal)),
                 ("estimated_relative_error", .double(estimatedError))])
    }
}

/// One measured way to compress one layer: G, ranks, bytes and held-apart error.
public struct PlanCandidate: Sendable, Equatable {
    /// "merge" or "prune reap".
    public var method: String
    public var groups: Int
    public var ranks: String
    public var bytes: Int
    public var error: Double

    public var json: JSONValue {
        .object([("method", .string(method)), ("groups", .int(groups)), ("ranks", .string(ranks)), ("expert_bytes", .int(bytes)), ("estimated_relative_error", .double(error))])
    }
}

/// A whole-model plan: per layer the groups and ranks. A deterministic function of the model, the
/// calibration (or statistics) and the settings, decided once before any layer is written, so
/// every shard of a sharded run can apply the same value.
public struct SizePlan: Sendable, Equatable {
    public var layers: [LayerPlan]
    public var budget: Int
    public var settings: PlannerSettings
    /// Every option the planner measured, per layer (`--plan-only --json` prints them: a plan for
    /// another budget or objective can be chosen from them without measuring again).
    public var candidates: [[PlanCandidate]] = []

    public var bytes: Int { layers.reduce(0) { $0 + $1.bytes } }
    public var bytesOriginal: Int { layers.reduce(0) { $0 + $1.bytesOriginal } }
    public var meanEstimatedError: Double { layers.isEmpty ? 0 : layers.reduce(0) { $0 + $1.estimatedError } / Double(layers.count) }
    /// The planner's objective at this plan (Σ c_l·e_l² with sensitivities: the predicted loss increase).
    public var objective: Double { layers.reduce(0) { $0 + settings.cost($1.name, error: $1.estimatedError) } }

    public subscript(layer: String) -> LayerPlan? { layers.first { $0.name == layer } }

    public var json: JSONValue {
        .object([("target", settings.target.json), ("budget_bytes", .int(budget)), ("uniform_groups", .bool(settings.uniformGroups)),
                 ("held_out", .string("every \(settings.heldOutEvery)th chunk of \(settings.chunkTokens) tokens")),
                 ("expert_bytes", .int(bytes)), ("expert_bytes_original", .int(bytesOriginal)),
                 ("mean_estimated_relative_error", .double(meanEstimatedError)), ("objective", .string(settings.objectiveName)),
                 ("objective_value", .double(objective))]
                + (settings.sensitivity.map { [("sensitivity", $0.json)] } ?? [])
                + (settings.prune.map { [("prune_candidates", .string("\($0.rawValue)\(settings.pruneRefit ? " with refit" : "")"))] } ?? [])
                + [("layers", .array(layers.map(\.json)))])
    }
}

/// Chooses per layer the groups and ranks that fit a byte budget with the smallest mean layer
/// output error on held-apart calibration tokens (ALGORITHM.md §4.3).
public enum SizePlanner {
    /// The calibration tokens of `layer` on one side of the planner's split.
    public static func tokens(_ calibration: CalibrationReader, _ layer: String, _ tokens: TokenSettings,
                              _ settings: PlannerSettings, heldOut: Bool) -> TokenBlocks {
        { body in
            try calibration.forEachBlock(layer, blockSize: tokens.blockSize, maxTokens: tokens.maxTokens) { start, x in
                let rows = (0..<x.rows).filter {
                    ((start + $0) / settings.chunkTokens % settings.heldOutEvery == settings.heldOutEvery - 1) == heldOut
                }
                if !rows.isEmpty { try body(x.gatherRows(rows)) }
            }
        }
    }

    /// One way to compress one layer.
    struct Option {
        var groups: Int
        var grouping: LayerGrouping
        var ranks: [String: Int]
        var bytes: Int
        var error: Double
        var prune: PruneMethod? = nil
    }

    /// The plan. `lowRank` supplies the low-rank settings (objective, ridge, matrices, SVD); its
    /// rank rule is replaced by the allocated ranks. Every merged candidate is measured on the
    /// held-apart tokens, merged dense and at each byte level with the ranks `RankAllocation`
    /// gives; the choice across layers is exact over those options (a knapsack solved by dynamic
    /// programming on bytes in units of budget/4096, costs rounded up: the plan never exceeds
    /// the budget). Ties go to the lower G, then the smaller size.
    public static func plan(model: CheckpointReader, calibration: CalibrationReader, stats: StatsReader?,
                            merge: MergeSettings, lowRank: LowRankOptions, settings: PlannerSettings, storage: StorageType,
                            progress: ProgressCallback? = nil) throws -> SizePlan {
        try choose(try measure(model: model, calibration: calibration, stats: stats, merge: merge, lowRank: lowRank,
                               settings: settings, storage: storage, progress: progress), settings: settings)
    }

    /// Every option of every layer, measured on the held-apart tokens: what `plan` chooses from.
    /// Depends on `settings` except its target, uniform groups, sensitivity and methods, so one
    /// measurement serves plans for several budgets and objectives (`choose`).
    public struct Measurements: Sendable {
        var names: [String]
        var frequency: [[Double]]
        var similarity: [[Double]]
        var experts: [Int]
        var originals: [Int]
        var options: [[Option]]
        public var prune: PruneMethod?
        public var pruneRefit: Bool
    }

    public static func measure(model: CheckpointReader, calibration: CalibrationReader, stats: StatsReader?,
                               merge: MergeSettings, lowRank: LowRankOptions, settings: PlannerSettings, storage: StorageType,
                               progress: ProgressCallback? = nil) throws -> Measurements {
        try settings.validate()
        try merge.merging.validate()
        try merge.tokens.validate()
        if lowRank.sparsity > 0 { throw SMoEError.setting(.targetSize, "plans low rank without a sparse part: give no {sparsity}") }
        let names = try model.selectLayers(merge.layers)
        try settings.sensitivity?.validate(allLayers: model.layers.map(\.name))
        if let g = merge.groups {
            for c in model.layers where names.contains(c.name) && g > c.numExperts {
                throw SMoEError.setting(.groups, "\(g) is more than the \(c.numExperts) experts of layer \(c.name)")
            }
        }
        let fb = storage.byteSize
        let inputs = try MergeStage.groupingInputs(model: model, layers: names, base: merge.similarityBase, stats: stats,
                                                   calibration: calibration, tokens: merge.tokens, progress: progress)
        var perLayer: [[Option]] = []
        var originals: [Int] = []
        var experts: [Int] = []
        for (name, input) in inputs {
            let original = try model.readLayer(name)
            originals.append(try model.summary(name).expertFileBytes)
            // The fitting tokens are read once and held (as the held-apart ones are) when they
            // fit in `cacheBytes`: every option re-reads them, and reading a float16 capture
            // converts in HDF5's software path, which was half the planner's time. The same
            // blocks in the same order either way, so the plan is the same.
            var fit = tokens(calibration, name, merge.tokens, settings, heldOut: false)
            let info = try calibration.info(name)
            if min(info.numTokens, merge.tokens.maxTokens ?? Int.max) * info.dModel * 4 <= settings.cacheBytes {
                var blocks: [Matrix] = []
                try fit({ blocks.append($0) })
                fit = { body in for x in blocks { try body(x) } }
            }
            var held: [Matrix] = []
            try tokens(calibration, name, merge.tokens, settings, heldOut: true)({ held.append($0) })
            if held.isEmpty {
                throw SMoEError.setting(.targetSize, "layer \(name) has too few calibration tokens to hold every \(settings.heldOutEvery)th chunk of \(settings.chunkTokens) apart")
            }
            // The original's routing and output on the held-apart tokens, once per layer.
            let heldOriginal = try held.map { x in let r = original.route(x); return (r, try original.forward(x, routing: r)) }
            func heldOutError(_ layer: MoELayer, slotGroups: [Int]? = nil) throws -> Double {
                var acc = try EvaluationAccumulator(original: original, compressed: layer, slotGroups: slotGroups)
                for (x, o) in zip(held, heldOriginal) { acc.add(x, original: o.0, output: o.1) }
                return acc.result(bytesBefore: 0, bytesAfter: 0).relativeError
            }
            let E = original.config.numExperts
            var options: [Option] = []
            let saliency = settings.prune != nil && original.config.numGroups == 1
                ? try Pruning.saliency(LayerSource(original), method: settings.prune!, tokens: fit).saliency : nil
            /// The layer dense and at each byte level (ranks from `RankAllocation`), measured.
            func addOptions(_ merged: MoELayer, groups G: Int, grouping: LayerGrouping, prune: PruneMethod? = nil,
                            slotGroups: [Int]? = nil) throws {
                let denseBytes = merged.expertBytes(floatBytes: fb)
                options.append(Option(groups: G, grouping: grouping, ranks: [:], bytes: denseBytes,
                                      error: try heldOutError(merged, slotGroups: slotGroups), prune: prune))
                let spectra = try LowRankStage.whitenedSpectra(merged, options: lowRank, tokens: fit)
                let factoredDense = spectra.reduce(0) { $0 + $1.candidate.rows * $1.candidate.cols * fb }
                var previous: [Int]? = nil
                for k in 1...settings.levels {
                    let level = originals.last! * k / settings.levels
                    guard level < denseBytes,
                          let a = RankAllocation.allocate(spectra.map(\.candidate), budget: level - (denseBytes - factoredDense), floatBytes: fb),
                          a.ranks != previous else { continue }
                    previous = a.ranks
                    var o = lowRank
                    o.ranks = Dictionary(uniqueKeysWithValues: zip(spectra.map(\.key), a.ranks))
                    let layer = try LowRankStage.compressLayer(merged, options: o, whitenOn: fit).0.roundedForStorage(storage)
                    let bytes = layer.expertBytes(floatBytes: fb)
                    if bytes < denseBytes {
                        options.append(Option(groups: G, grouping: grouping, ranks: o.ranks, bytes: bytes,
                                              error: try heldOutError(layer, slotGroups: slotGroups), prune: prune))
                    }
                }
            }
            for G in (settings.groupCandidates ?? Array(1...E)).sorted() where G <= E {
                progress?("planning \(name)", G, E)
                var ms = merge
                ms.groups = G
                ms.adaptive = false
                let grouping = MergeStage.plan([(name, input)], settings: ms)[name]!
                let merged = try MergeStage.apply(original, grouping: grouping, frequency: input.frequency, settings: ms,
                                                  tokens: fit).layer.roundedForStorage(storage)
                try addOptions(merged, groups: G, grouping: grouping)
                // Pruning to G experts (plain routing only: expert groups do not survive dropping
                // slots; at least top_k experts kept), refitted like a compact layer.
                if let method = settings.prune, let sal = saliency, G < E, G >= original.config.topK {
                    let kept = Pruning.keep(sal, groups: G)
                    let slots = (0..<E).map { kept.firstIndex(of: $0) ?? -1 }
                    var pruned = try Pruning.pruned(LayerSource(original), kept: kept)
                    if settings.pruneRefit {
                        pruned = try CompactRefit.refit(pruned, original: LayerSource(original), slotGroups: slots, tokens: fit,
                                                        ridge: merge.merging.refitRidge).layer
                    }
                    try addOptions(pruned.roundedForStorage(storage), groups: G, grouping: LayerGrouping(groups: kept.map { [$0] }, dominant: kept),
                                   prune: method, slotGroups: slots)
                }
            }
            perLayer.append(options)
            experts.append(E)
        }
        return Measurements(names: inputs.map(\.name), frequency: inputs.map(\.input.frequency), similarity: inputs.map(\.input.similarity),
                            experts: experts, originals: originals, options: perLayer, prune: settings.prune, pruneRefit: settings.pruneRefit)
    }

    /// The plan for `settings`' target, objective, uniform groups and methods from measured
    /// options (`settings`' other fields must be those `measured` was made with).
    public static func choose(_ measured: Measurements, settings: PlannerSettings) throws -> SizePlan {
        var settings = settings
        settings.prune = measured.prune
        settings.pruneRefit = measured.pruneRefit
        try settings.validate()
        let perLayer = measured.options, originals = measured.originals
        let costs = zip(measured.names, perLayer).map { name, options in options.map { settings.cost(name, error: $0.error) } }
        let permitted = zip(perLayer, measured.experts).map { opts, E in
            opts.indices.filter { settings.methods.allows(opts[$0].prune, groups: opts[$0].groups, experts: E) }
        }
        let budget = settings.target.bytes(original: originals.reduce(0, +))
        var best: (choice: [Int], error: Double)? = nil
        let groupSets: [Int?] = settings.uniformGroups ? Array(Set(perLayer.flatMap { $0.map(\.groups) })).sorted() : [nil]
        for g in groupSets {
            let allowed = zip(perLayer, permitted).map { opts, ok in ok.filter { g == nil || opts[$0].groups == g } }
            guard let choice = choose(perLayer, costs: costs, allowed: allowed, budget: budget) else { continue }
            let err = zip(costs, choice).reduce(0.0) { acc, p in acc + p.0[p.1] }
            if best == nil || err < best!.error { best = (choice, err) }
        }
        guard let chosen = best?.choice else {
            let smallest = zip(perLayer, permitted).reduce(0) { acc, p in acc + (p.1.map { p.0[$0].bytes }.min() ?? 0) }
            throw SMoEError.setting(.targetSize, "\(budget) bytes is below the smallest plan (\(smallest) bytes\(settings.uniformGroups ? " with one G in every layer" : ""))")
        }
        let layers = chosen.indices.map { l in
            let o = perLayer[l][chosen[l]]
            return LayerPlan(name: measured.names[l], groups: o.groups, grouping: o.grouping, frequency: measured.frequency[l], ranks: o.ranks,
                             bytes: o.bytes, bytesOriginal: originals[l], estimatedError: o.error, similarity: measured.similarity[l],
                             prune: o.prune)
        }
        var plan = SizePlan(layers: layers, budget: budget, settings: settings)
        plan.candidates = perLayer.map { $0.map { PlanCandidate(method: $0.prune.map { "prune \($0.rawValue)" } ?? "merge", groups: $0.groups, ranks: rankRange(Array($0.ranks.values)), bytes: $0.bytes, error: $0.error) } }
        return plan
    }

    /// The multiple-choice knapsack: one option per layer (among `allowed`), total bytes ≤ budget,
    /// smallest total cost (`costs[l][i]`: option i of layer l); nil when nothing fits. Bytes are
    /// counted in units of ⌈budget/4096⌉ with each option's cost rounded up, so the exact total
    /// never exceeds the budget.
    static func choose(_ options: [[Option]], costs: [[Double]], allowed: [[Int]], budget: Int) -> [Int]? {
        let unit = max(1, (budget + 4095) / 4096), cap = budget / unit
        var dp = [Double](repeating: 0, count: cap + 1)
        var picks: [[Int]] = []
        for (l, opts) in options.enumerated() {
            var next = [Double](repeating: .infinity, count: cap + 1)
            var pick = [Int](repeating: -1, count: cap + 1)
            for i in allowed[l] {
                let cost = (opts[i].bytes + unit - 1) / unit
                if cost > cap { continue }
                for c in cost...cap where dp[c - cost] + costs[l][i] < next[c] {
                    next[c] = dp[c - cost] + costs[l][i]
                    pick[c] = i
                }
            }
            dp = next
            picks.append(pick)
        }
        guard dp[cap].isFinite else { return nil }
        var c = cap
        var choice = [Int](repeating: 0, count: options.count)
        for l in stride(from: options.count - 1, through: 0, by: -1) {
            choice[l] = picks[l][c]
            c -= (options[l][choice[l]].bytes + unit - 1) / unit
        }
        return choice
    }
}
