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
    /// Also consider each dense option (merged or pruned to G, not factored) with its experts
    /// stored in block-scaled FP8 (`ExpertEncoding.fp8`): one byte per weight plus a float32
    /// scale per 128 × 128 block, measured after FP8 rounding like every other option.
    public var fp8 = false
    /// Which of the measured options the plan may take per layer (with `prune` set).
    public var methods: PlanMethods = .both
    /// The noise-aware choice (ALGORITHM.md §4.3): after the exact knapsack, each layer takes,
    /// among its options that fit the budget left over and whose cost is above the chosen one's
    /// by at most this many standard errors of their paired difference (across folds with
    /// `folds` > 1, else across the held-apart chunks), the one that changes the layer least
    /// (more experts kept, then dense, then more bytes). 0 (the default): the knapsack's choice.
    /// Measured, it does not make the per-layer merge-or-prune choice reliable (§4.3), so it is off.
    public var noiseTolerance = 0.0
    /// K-fold estimates: 1 (the default), the split as is; K ≤ `heldOutEvery`: every option is
    /// also refitted and measured with chunk classes N − 2, …, N − K held apart, its error the
    /// mean over the K folds (K times the planner's cost). Measured in §4.3; off by default.
    public var folds = 1
    /// The cross-validated choice between methods (ALGORITHM.md §4.3), with `prune` set and
    /// `methods` `.both`: the per-layer knapsack's plan, the merge-only plan and the prune-only
    /// plan (each chosen from the same options on the split) are scored by K-fold
    /// cross-validation of their options over contiguous K-ths of each layer's calibration
    /// tokens (each option refitted on the other K − 1 and measured on the one left out), and
    /// the plan with the lowest mean objective is taken (ties to the per-layer plan, then
    /// merge-only). 1: the per-layer knapsack's plan as is.
    public var checkFolds = 5

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

    /// d cost / d e at `e`: 2·c_l·e with sensitivities, 1 without.
    func costSlope(_ layer: String, error e: Double) -> Double {
        sensitivity.map { 2 * $0.weights[layer]! * e } ?? 1
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
        if !(noiseTolerance >= 0 && noiseTolerance.isFinite) {
            throw SMoEError.setting(.targetSize, "the planner's noise tolerance must be a finite number of standard errors ≥ 0 (got \(noiseTolerance))")
        }
        if checkFolds < 1 {
            throw SMoEError.setting(.targetSize, "the planner's check folds must be at least 1 (got \(checkFolds))")
        }
        if folds < 1 || folds > heldOutEvery {
            throw SMoEError.setting(.targetSize, "the planner's folds must be from 1 to the held-apart period \(heldOutEvery) (got \(folds))")
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

    /// "per-layer choice", "merge-only", "prune-only".
    public var label: String { self == .both ? "per-layer choice" : "\(rawValue)-only" }

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
    /// How the layer's experts are stored (FP8 only for dense options, with `PlannerSettings.fp8`).
    public var encoding: ExpertEncoding = .float

    /// "merge" or "prune reap".
    public var method: String { prune.map { "prune \($0.rawValue)" } ?? "merge" }

    /// "dense", "12" or "8-31".
    public var rankSummary: String { rankRange(Array(ranks.values)) }

    public var json: JSONValue {
        .object([("name", .string(name)), ("method", .string(method)), ("groups", .int(groups)),
                 (prune == nil ? "expert_map" : "kept", JSONValue(prune == nil ? grouping.slotToGroup : grouping.dominant)),
                 ("ranks", .object(ranks.sorted { $0.key < $1.key }.map { ($0.key, .int($0.value)) }))]
                + (encoding.isFP8 ? [("expert_encoding", .string(encoding.description))] : [])
                + [("expert_bytes", .int(bytes)), ("expert_bytes_original", .int(bytesOriginal)),
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
    public var encoding: ExpertEncoding = .float

    public var json: JSONValue {
        .object([("method", .string(method)), ("groups", .int(groups)), ("ranks", .string(ranks))]
                + (encoding.isFP8 ? [("expert_encoding", .string(encoding.description))] : [])
                + [("expert_bytes", .int(bytes)), ("estimated_relative_error", .double(error))])
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
    /// With the cross-validated choice (`PlannerSettings.checkFolds`): the plans compared, the
    /// per-layer one first; the plan is the first with the lowest cross-validated objective.
    public var checks: [PlanCheck] = []
    /// Per layer, the index of the chosen option among the measured ones.
    var choice: [Int] = []

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
                + (settings.folds > 1 ? [("folds", .int(settings.folds))] : [])
                + (settings.noiseTolerance > 0 ? [("noise_tolerance_standard_errors", .double(settings.noiseTolerance))] : [])
                + (settings.sensitivity.map { [("sensitivity", $0.json)] } ?? [])
                + (settings.prune.map { [("prune_candidates", .string("\($0.rawValue)\(settings.pruneRefit ? " with refit" : "")"))] } ?? [])
                + (settings.fp8 ? [("fp8_candidates", .bool(true))] : [])
                + (checks.isEmpty ? [] : [("cross_validated_choice", .object([
                    ("folds", .int(settings.checkFolds)), ("taken", .string(taken!.rawValue)),
                    ("plans", .array(checks.map(\.json)))]))])
                + [("layers", .array(layers.map(\.json)))])
    }

    /// The plan the cross-validated choice took (nil without it).
    public var taken: PlanMethods? {
        checks.min { $0.crossValidated < $1.crossValidated }?.methods
    }
}

/// One plan the cross-validated choice compared: which options it could take, its objective on
/// the split (fold 0, what the knapsack minimised) and the mean over the K folds.
public struct PlanCheck: Sendable, Equatable {
    public var methods: PlanMethods
    public var objective: Double
    public var crossValidated: Double

    public var json: JSONValue {
        .object([("methods", .string(methods.rawValue)), ("objective", .double(objective)),
                 ("cross_validated_objective", .double(crossValidated))])
    }
}

/// Chooses per layer the groups and ranks that fit a byte budget with the smallest mean layer
/// output error on held-apart calibration tokens (ALGORITHM.md §4.3).
public enum SizePlanner {
    /// The calibration tokens of `layer` on one side of the planner's split. Fold f (0 ..<
    /// `folds`) holds apart chunk class N − 1 − f (N = `heldOutEvery`); fold 0 is the split.
    public static func tokens(_ calibration: CalibrationReader, _ layer: String, _ tokens: TokenSettings,
                              _ settings: PlannerSettings, heldOut: Bool, fold: Int = 0) -> TokenBlocks {
        let heldClass = settings.heldOutEvery - 1 - fold
        return { body in
            try calibration.forEachBlock(layer, blockSize: tokens.blockSize, maxTokens: tokens.maxTokens) { start, x in
                let rows = (0..<x.rows).filter {
                    ((start + $0) / settings.chunkTokens % settings.heldOutEvery == heldClass) == heldOut
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
        var encoding: ExpertEncoding = .float
        /// Per held-apart chunk (fold 0), the summed squared output error Σ_t ‖y − y₀‖² (for the
        /// paired standard errors of the noise-aware choice; empty for constructed options).
        var chunkErrors: [Double] = []
        /// With `folds` > 1: the held-apart error in each fold (fold 0 first); `error` is their mean.
        var foldErrors: [Double] = []
        /// The cross-validated choice's errors, one per contiguous K-th of the calibration tokens
        /// held apart (`PlannerSettings.checkFolds`); empty until measured.
        var checkErrors: [Double] = []
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
        var measured = try measure(model: model, calibration: calibration, stats: stats, merge: merge, lowRank: lowRank,
                                   settings: settings, storage: storage, progress: progress)
        return try choose(&measured, settings: settings, model: model, calibration: calibration, merge: merge, lowRank: lowRank,
                          storage: storage, progress: progress)
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
        /// Per layer, per held-apart chunk (fold 0), the original output's Σ_t ‖y₀‖².
        var chunkReferences: [[Double]] = []
        public var prune: PruneMethod?
        public var pruneRefit: Bool
        public var fp8 = false
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
        let inputs = try MergeStage.groupingInputs(model: model, layers: names, base: merge.similarityBase, stats: stats,
                                                   calibration: calibration, tokens: merge.tokens, progress: progress)
        var perLayer: [[Option]] = []
        var originals: [Int] = []
        var experts: [Int] = []
        var references: [[Double]] = []
        for (name, input) in inputs {
            let original = try model.readLayer(name)
            originals.append(try model.summary(name).expertFileBytes)
            var options: [Option] = []
            references.append(try measureLayer(name, input: input, original: original, originalBytes: originals.last!,
                                               calibration: calibration, merge: merge, lowRank: lowRank, settings: settings,
                                               storage: storage, folds: 0..<settings.folds, options: &options, progress: progress))
            if settings.folds > 1 {
                for i in options.indices { options[i].error = options[i].foldErrors.reduce(0, +) / Double(options[i].foldErrors.count) }
            }
            perLayer.append(options)
            experts.append(original.config.numExperts)
        }
        return Measurements(names: inputs.map(\.name), frequency: inputs.map(\.input.frequency), similarity: inputs.map(\.input.similarity),
                            experts: experts, originals: originals, options: perLayer, chunkReferences: references,
                            prune: settings.prune, pruneRefit: settings.pruneRefit, fp8: settings.fp8)
    }

    /// Measures one layer's options on `folds`. Fold 0 makes the options (groups, kind, ranks,
    /// bytes) and measures them on the split's held-apart chunks; a later fold f holds apart
    /// chunk class N − 1 − f, refits each option of `options` (same groups, kind and ranks; only
    /// those in `only` when given) on the rest and appends its error there to `errors`
    /// (`foldErrors`: K-fold cross-validation). With `refit`, fold 0 refits too (the
    /// cross-validated choice's folds, whose split differs from the options'). Returns the
    /// original's per-chunk Σ‖y₀‖² of the fold that made the options (empty without one).
    static func measureLayer(_ name: String, input: GroupingInput, original: MoELayer, originalBytes: Int,
                             calibration: CalibrationReader, merge: MergeSettings, lowRank: LowRankOptions,
                             settings: PlannerSettings, storage: StorageType, folds: Range<Int>, options: inout [Option],
                             only: Set<Int>? = nil, refit: Bool = false, into errors: WritableKeyPath<Option, [Double]> = \.foldErrors,
                             progress: ProgressCallback? = nil) throws -> [Double] {
        let fb = storage.byteSize
        let E = original.config.numExperts
        var reference: [Double] = []
        for fold in folds {
            let refitting = refit || fold > 0
            // The fitting tokens are read once and held (as the held-apart ones are) when they
            // fit in `cacheBytes`: every option re-reads them, and reading a float16 capture
            // converts in HDF5's software path, which was half the planner's time. The same
            // blocks in the same order either way, so the plan is the same.
            var fit = tokens(calibration, name, merge.tokens, settings, heldOut: false, fold: fold)
            let info = try calibration.info(name)
            if min(info.numTokens, merge.tokens.maxTokens ?? Int.max) * info.dModel * 4 <= settings.cacheBytes {
                var blocks: [Matrix] = []
                try fit({ blocks.append($0) })
                fit = { body in for x in blocks { try body(x) } }
            }
            var held: [Matrix] = []
            try tokens(calibration, name, merge.tokens, settings, heldOut: true, fold: fold)({ held.append($0) })
            if held.isEmpty {
                throw SMoEError.setting(.targetSize, "layer \(name) has too few calibration tokens to hold every \(settings.heldOutEvery)th chunk of \(settings.chunkTokens) apart")
            }
            // The original's routing and output on the held-apart tokens, once per layer.
            let heldOriginal = try held.map { x in let r = original.route(x); return (r, try original.forward(x, routing: r)) }
            // Per held-apart token ‖y₀‖², then summed per chunk: the held-apart tokens come in
            // runs of `chunkTokens` (the split's chunks, the last one possibly shorter).
            let tokenReference = heldOriginal.flatMap { o in
                (0..<o.1.rows).map { t in o.1.data[(t * o.1.cols)..<((t + 1) * o.1.cols)].reduce(0.0) { $0 + Double($1) * Double($1) } }
            }
            func chunkSums(_ v: [Double]) -> [Double] {
                stride(from: 0, to: v.count, by: settings.chunkTokens).map { v[$0..<min($0 + settings.chunkTokens, v.count)].reduce(0, +) }
            }
            /// The relative output error on the held-apart tokens (as `EvaluationAccumulator`
            /// computes it: √(Σ‖y − y₀‖² / Σ‖y₀‖²), summed token by token in the same order)
            /// and its per-chunk sums.
            func heldOutError(_ layer: MoELayer) -> (Double, [Double]) {
                var perToken: [Double] = []
                perToken.reserveCapacity(tokenReference.count)
                for (x, o) in zip(held, heldOriginal) {
                    let y0 = o.1, y1 = layer.forward(x, routing: layer.route(x)), d = y0.cols
                    for t in 0..<x.rows {
                        var e = 0.0
                        for j in 0..<d { let a = Double(y0.data[t * d + j]), b = Double(y1.data[t * d + j]); e += (b - a) * (b - a) }
                        perToken.append(e)
                    }
                }
                let errSq = perToken.reduce(0, +), refSq = tokenReference.reduce(0, +)
                return (refSq > 0 ? (errSq / refSq).squareRoot() : (errSq > 0 ? .infinity : 0), chunkSums(perToken))
            }
            /// The dense layer with its experts stored in FP8 (`roundForStorage` quantizes and
            /// dequantizes them as the writer and reader do).
            func inFP8(_ layer: MoELayer) -> MoELayer {
                var q = layer
                q.expertEncoding = .fp8
                q.roundForStorage(storage)
                return q
            }
            /// The options to refit and measure in a later fold: those of `groups` and `prune`.
            func refitted(groups G: Int, prune: PruneMethod?) -> [Int] {
                options.indices.filter { options[$0].groups == G && options[$0].prune == prune && (only?.contains($0) ?? true) }
            }
            // The pruning saliency on this fold's fitting tokens, computed when a pruned option is
            // first made or refitted (REAP's is a pass over every expert; a fold of the
            // cross-validated choice that refits merged options only needs none).
            var saliency: [Double]? = nil
            func pruneSaliency(_ method: PruneMethod) throws -> [Double] {
                if saliency == nil { saliency = try Pruning.saliency(LayerSource(original), method: method, tokens: fit).saliency }
                return saliency!
            }
            /// The layer dense and at each byte level (ranks from `RankAllocation`), measured.
            func addOptions(_ merged: MoELayer, groups G: Int, grouping: LayerGrouping, prune: PruneMethod? = nil) throws {
                if refitting {
                    // The options fold 0 made (same G, kind and ranks), fitted and measured on this fold.
                    for i in refitted(groups: G, prune: prune) {
                        var o = lowRank
                        o.ranks = options[i].ranks
                        let layer = options[i].encoding.isFP8 ? inFP8(merged)
                            : options[i].ranks.isEmpty ? merged
                            : try LowRankStage.compressLayer(merged, options: o, whitenOn: fit).0.roundedForStorage(storage)
                        options[i][keyPath: errors].append(heldOutError(layer).0)
                    }
                    return
                }
                let denseBytes = merged.expertBytes(floatBytes: fb)
                let (denseError, denseTokens) = heldOutError(merged)
                options.append(Option(groups: G, grouping: grouping, ranks: [:], bytes: denseBytes, error: denseError, prune: prune,
                                      chunkErrors: denseTokens, foldErrors: [denseError]))
                if settings.fp8 {
                    let q = inFP8(merged)
                    let (error, perToken) = heldOutError(q)
                    options.append(Option(groups: G, grouping: grouping, ranks: [:], bytes: q.expertBytes(floatBytes: fb), error: error,
                                          prune: prune, encoding: q.expertEncoding, chunkErrors: perToken, foldErrors: [error]))
                }
                let spectra = try LowRankStage.whitenedSpectra(merged, options: lowRank, tokens: fit)
                let factoredDense = spectra.reduce(0) { $0 + $1.candidate.rows * $1.candidate.cols * fb }
                var previous: [Int]? = nil
                for k in 1...settings.levels {
                    let level = originalBytes * k / settings.levels
                    guard level < denseBytes,
                          let a = RankAllocation.allocate(spectra.map(\.candidate), budget: level - (denseBytes - factoredDense), floatBytes: fb),
                          a.ranks != previous else { continue }
                    previous = a.ranks
                    var o = lowRank
                    o.ranks = Dictionary(uniqueKeysWithValues: zip(spectra.map(\.key), a.ranks))
                    let layer = try LowRankStage.compressLayer(merged, options: o, whitenOn: fit).0.roundedForStorage(storage)
                    let bytes = layer.expertBytes(floatBytes: fb)
                    if bytes < denseBytes {
                        let (error, perToken) = heldOutError(layer)
                        options.append(Option(groups: G, grouping: grouping, ranks: o.ranks, bytes: bytes, error: error, prune: prune,
                                              chunkErrors: perToken, foldErrors: [error]))
                    }
                }
            }
            for G in (settings.groupCandidates ?? Array(1...E)).sorted() where G <= E {
                progress?("planning \(name)", G, E)
                var ms = merge
                ms.groups = G
                ms.adaptive = false
                if !refitting || !refitted(groups: G, prune: nil).isEmpty {
                    let grouping = MergeStage.plan([(name, input)], settings: ms)[name]!
                    let merged = try MergeStage.apply(original, grouping: grouping, frequency: input.frequency, settings: ms,
                                                      tokens: fit).layer.roundedForStorage(storage)
                    try addOptions(merged, groups: G, grouping: grouping)
                }
                // Pruning to G experts (plain routing only: expert groups do not survive dropping
                // slots; at least top_k experts kept), refitted like a compact layer.
                if let method = settings.prune, original.config.numGroups == 1, G < E, G >= original.config.topK,
                   !refitting || !refitted(groups: G, prune: method).isEmpty {
                    let kept = Pruning.keep(try pruneSaliency(method), groups: G)
                    let slots = (0..<E).map { kept.firstIndex(of: $0) ?? -1 }
                    var pruned = try Pruning.pruned(LayerSource(original), kept: kept)
                    if settings.pruneRefit {
                        pruned = try CompactRefit.refit(pruned, original: LayerSource(original), slotGroups: slots, tokens: fit,
                                                        ridge: merge.merging.refitRidge).layer
                    }
                    try addOptions(pruned.roundedForStorage(storage), groups: G, grouping: LayerGrouping(groups: kept.map { [$0] }, dominant: kept),
                                   prune: method)
                }
            }
            if !refitting { reference = chunkSums(tokenReference) }
        }
        return reference
    }

    /// The plan for `settings`' target, objective, uniform groups and methods from measured
    /// options (`settings`' other fields must be those `measured` was made with).
    public static func choose(_ measured: Measurements, settings: PlannerSettings) throws -> SizePlan {
        var settings = settings
        settings.prune = measured.prune
        settings.pruneRefit = measured.pruneRefit
        settings.fp8 = measured.fp8
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
        guard var chosen = best?.choice else {
            let smallest = zip(perLayer, permitted).reduce(0) { acc, p in acc + (p.1.map { p.0[$0].bytes }.min() ?? 0) }
            throw SMoEError.setting(.targetSize, "\(budget) bytes is below the smallest plan (\(smallest) bytes\(settings.uniformGroups ? " with one G in every layer" : ""))")
        }
        if settings.noiseTolerance > 0 {
            let allowed = permitted.indices.map { l in
                permitted[l].filter { !settings.uniformGroups || perLayer[l][$0].groups == perLayer[l][chosen[l]].groups }
            }
            let slopes = zip(measured.names, perLayer).map { name, options in options.map { settings.costSlope(name, error: $0.error) } }
            let foldCosts = zip(measured.names, perLayer).map { name, options in options.map { $0.foldErrors.map { settings.cost(name, error: $0) } } }
            chosen = leastChange(perLayer, costs: costs, slopes: slopes, foldCosts: foldCosts, references: measured.chunkReferences,
                                 allowed: allowed, choice: chosen, budget: budget, tolerance: settings.noiseTolerance)
        }
        let layers = chosen.indices.map { l in
            let o = perLayer[l][chosen[l]]
            return LayerPlan(name: measured.names[l], groups: o.groups, grouping: o.grouping, frequency: measured.frequency[l], ranks: o.ranks,
                             bytes: o.bytes, bytesOriginal: originals[l], estimatedError: o.error, similarity: measured.similarity[l],
                             prune: o.prune, encoding: o.encoding)
        }
        var plan = SizePlan(layers: layers, budget: budget, settings: settings)
        plan.choice = chosen
        plan.candidates = perLayer.map { $0.map { PlanCandidate(method: $0.prune.map { "prune \($0.rawValue)" } ?? "merge", groups: $0.groups, ranks: rankRange(Array($0.ranks.values)), bytes: $0.bytes, error: $0.error, encoding: $0.encoding) } }
        return plan
    }

    /// `choose`'s plan, then, with `prune` measured and `methods` `.both`, the cross-validated
    /// choice (`PlannerSettings.checkFolds` K > 1): the per-layer plan, the merge-only plan and
    /// the prune-only plan (a pure plan that cannot meet the budget drops out) are scored by the
    /// mean over K folds of their objective — the options they take are refitted and measured
    /// on the folds not measured yet, which `measured` keeps for the next call — and the lowest
    /// is taken, ties to the earlier. The knapsack's options are chosen on one split, on text
    /// like its fitting tokens; a second opinion from other splits, asked only between three
    /// plans, keeps the choice of method from resting on one split's biases (§4.3).
    public static func choose(_ measured: inout Measurements, settings: PlannerSettings, model: CheckpointReader,
                              calibration: CalibrationReader, merge: MergeSettings, lowRank: LowRankOptions,
                              storage: StorageType, progress: ProgressCallback? = nil) throws -> SizePlan {
        let plan = try choose(measured, settings: settings)
        let K = settings.checkFolds
        guard measured.prune != nil, settings.methods == .both, K > 1 else { return plan }
        var plans = [plan]
        for methods in [PlanMethods.merge, .prune] {
            var s = settings
            s.methods = methods
            do { plans.append(try choose(measured, settings: s)) } catch let e as SMoEError where e.setting == .targetSize { continue }
        }
        let measuring = plan.settings  // `measured`'s own prune, refit and FP8 settings
        for l in measured.names.indices {
            let only = Set(plans.map { $0.choice[l] }).filter { measured.options[l][$0].checkErrors.isEmpty }
            if only.isEmpty { continue }
            let name = measured.names[l], info = try calibration.info(name)
            var check = measuring
            check.heldOutEvery = K
            check.chunkTokens = (min(info.numTokens, merge.tokens.maxTokens ?? Int.max) + K - 1) / K
            _ = try measureLayer(name, input: GroupingInput(frequency: measured.frequency[l], similarity: measured.similarity[l]),
                                 original: try model.readLayer(name), originalBytes: measured.originals[l], calibration: calibration,
                                 merge: merge, lowRank: lowRank, settings: check, storage: storage, folds: 0..<K,
                                 options: &measured.options[l], only: only, refit: true, into: \.checkErrors, progress: progress)
        }
        let checks = plans.map { p in
            PlanCheck(methods: p.settings.methods, objective: p.objective, crossValidated: p.choice.indices.reduce(0.0) { acc, l in
                let folds = measured.options[l][p.choice[l]].checkErrors
                return acc + settings.cost(measured.names[l], error: folds.reduce(0, +) / Double(folds.count))
            })
        }
        let best = checks.indices.min { checks[$0].crossValidated < checks[$1].crossValidated }!
        var taken = plans[best]
        taken.settings.methods = .both
        taken.checks = checks
        return taken
    }

    /// The standard error of cost(option a) − cost(option b) of one layer, paired on the same
    /// held-apart chunks, by the delta method: the relative error E = √(S/R) (S = Σ_c s_c the
    /// chunks' summed squared output errors, R = Σ_c r_c the original's) moves with chunk c by
    /// φ_c = (s_c − E²·r_c) / (2·E·R), the cost by its slope times that; the chunks (whole runs
    /// of consecutive tokens, which are correlated within a chunk) are taken as independent:
    /// SE² = Σ_c (slope_a·φ_a,c − slope_b·φ_b,c)².
    static func pairedStandardError(_ a: Option, _ b: Option, slopeA: Double, slopeB: Double, references r: [Double]) -> Double {
        guard a.chunkErrors.count == r.count, b.chunkErrors.count == r.count else { return 0 }
        let total = r.reduce(0, +)
        guard total > 0 else { return 0 }
        func influence(_ o: Option, _ slope: Double, _ c: Int) -> Double {
            o.error > 0 && o.error.isFinite ? slope * (o.chunkErrors[c] - o.error * o.error * r[c]) / (2 * o.error * total) : 0
        }
        var v = 0.0
        for c in r.indices { let d = influence(a, slopeA, c) - influence(b, slopeB, c); v += d * d }
        return v.squareRoot()
    }

    /// The standard error of the mean over K folds of the paired cost differences d_f = a_f − b_f:
    /// √(Σ_f (d_f − d̄)² / (K − 1) / K); nil with fewer than 2 folds.
    static func foldStandardError(_ a: [Double], _ b: [Double]) -> Double? {
        guard a.count == b.count, a.count > 1 else { return nil }
        let d = zip(a, b).map { $0 - $1 }, mean = d.reduce(0, +) / Double(d.count)
        return (d.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(d.count - 1) / Double(d.count)).squareRoot()
    }

    /// The noise-aware choice, a post-pass over the knapsack's `choice` that never exceeds the
    /// budget: layer by layer (in order), among the allowed options that fit the bytes the
    /// other layers leave and whose cost exceeds the chosen option's by at most `tolerance`
    /// paired standard errors, the one that changes the layer least: most groups (experts
    /// kept), then dense before factored, then most bytes (highest ranks), then lowest cost,
    /// then lowest index. The chosen option itself always qualifies.
    static func leastChange(_ options: [[Option]], costs: [[Double]], slopes: [[Double]], foldCosts: [[[Double]]] = [],
                            references: [[Double]], allowed: [[Int]], choice: [Int], budget: Int, tolerance: Double) -> [Int] {
        var choice = choice
        for l in options.indices {
            let c = choice[l], opts = options[l]
            let free = budget - choice.indices.reduce(0) { $0 + ($1 == l ? 0 : options[$1][choice[$1]].bytes) }
            func better(_ i: Int, than j: Int) -> Bool {
                let a = opts[i], b = opts[j]
                if a.groups != b.groups { return a.groups > b.groups }
                if a.ranks.isEmpty != b.ranks.isEmpty { return a.ranks.isEmpty }
                if a.bytes != b.bytes { return a.bytes > b.bytes }
                if costs[l][i] != costs[l][j] { return costs[l][i] < costs[l][j] }
                return i < j
            }
            var pick = c
            for i in allowed[l] where i != c && opts[i].bytes <= free && better(i, than: pick) {
                let se = (foldCosts.isEmpty ? nil : foldStandardError(foldCosts[l][i], foldCosts[l][c]))
                    ?? pairedStandardError(opts[i], opts[c], slopeA: slopes[l][i], slopeB: slopes[l][c], references: l < references.count ? references[l] : [])
                if costs[l][i] - costs[l][c] <= tolerance * se { pick = i }
            }
            choice[l] = pick
        }
        return choice
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
