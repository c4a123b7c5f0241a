import Foundation

/// The one contract every writing stage follows (docs/ARCHITECTURE.md): its value is made from
/// the opened inputs and its settings, which it validates once, there; `run` then reads the
/// model one layer at a time, in index order, computes each selected layer, hands the finished
/// layer to a sink, and returns the per-layer reports and the run's one history entry.
///
/// The per-layer loop is written once, in `run`, for every stage: what later work needs from it
/// (progress per finished layer, per-layer time, shards, resume, memory budgets) goes there.
public protocol LayerStage {
    /// What a finished layer becomes: a layer for checkpoint stages, statistics for `stats`.
    associatedtype Output
    associatedtype Report

    /// The stage's name in progress lines and history (`merge`, `lowrank`, …).
    var name: String { get }
    /// The layers this run computes, in the model's index order (validated by the stage's init).
    var layers: [String] { get }
    /// Computes one selected layer from its source: the stage reads the experts it needs, when it
    /// needs them (a group, one expert, or `source.whole()` where a computation needs every
    /// expert at once); the reader refuses NaN and Inf in each part as it reads it.
    func process(source: LayerSource, progress: ProgressCallback?) throws -> (output: Output, report: Report)
    /// What a layer the run leaves alone becomes in the output: the layer itself for a
    /// checkpoint (every layer is written), nil where the output holds only computed layers.
    func unchanged(_ layer: MoELayer) -> Output?
    /// Whether `unchanged` needs the other layers read at all.
    var keepsOtherLayers: Bool { get }
    /// The one history entry of a run that produced `reports`.
    func historyEntry(_ reports: [Report]) -> JSONValue
    /// Every setting that decides what the run writes, as JSON (by default the history entry
    /// of a run that computed no layer); shards of one run must agree on it (docs/FORMAT.md §5).
    var settingsRecord: JSONValue { get }
    /// The history entry of a run from the one-layer entries of its layers (`historyEntry([r])`
    /// of each report, in index order): what a resumed run records, holding reports only for the
    /// layers it computed itself. Must equal `historyEntry(reports)` (`Run/Resume.swift`; by
    /// default every `layers` array is concatenated and all else must agree).
    func historyEntry(combining layerEntries: [JSONValue]) throws -> JSONValue
}

extension LayerStage {
    public var settingsRecord: JSONValue { historyEntry([]) }
    public func historyEntry(combining layerEntries: [JSONValue]) throws -> JSONValue {
        try combineLayerEntries(layerEntries, empty: historyEntry([]))
    }
}

extension LayerStage where Output == MoELayer {
    public func unchanged(_ layer: MoELayer) -> MoELayer? { layer }
    public var keepsOtherLayers: Bool { true }
}

/// One finished layer of a run.
public struct FinishedLayer: Sendable {
    public var stage: String
    public var name: String
    /// Position among the model's MoE layers, and their count.
    public var index: Int
    public var count: Int
    /// False when the run copied the layer unchanged.
    public var computed: Bool
    /// True when the layer was not computed again but reused, finished, from an interrupted run
    /// (`--resume`); `computed` is then true as well (it is one of the run's layers).
    public var reused: Bool = false
    /// Wall time of the layer (read, compute, sink).
    public var seconds: Double
    /// Selected layers computed so far (this one included) and in all, reused layers not counted.
    public var computedSoFar: Int
    public var computedTotal: Int
    /// Wall time since the run started.
    public var elapsed: Double
    /// The process's peak resident memory so far, in bytes (0 where the system does not say).
    public var peakRSSBytes: Int

    /// Seconds left, estimated from the mean time of the computed layers so far.
    public var estimatedSecondsLeft: Double? {
        computedSoFar > 0 ? elapsed / Double(computedSoFar) * Double(computedTotal - computedSoFar) : nil
    }

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [("name", .string(name)), ("computed", .bool(computed))]
        if reused { kv.append(("reused", .bool(true))) }
        return .object(kv + [("seconds", .double(seconds)), ("peak_rss_bytes", .int(peakRSSBytes))])
    }
}

/// The process's peak resident set size so far (getrusage; Linux reports kilobytes).
public func peakResidentBytes() -> Int {
    var usage = rusage()
    guard getrusage(RUSAGE_SELF.rawValue, &usage) == 0 else { return 0 }
    return Int(usage.ru_maxrss) * 1024
}

/// What a run of a stage returns.
public struct StageResult<Report> {
    public var reports: [Report]
    /// Every layer the run handed to its sink or reused, in index order.
    public var layers: [FinishedLayer]
    public var history: JSONValue
    /// The layers reused from an interrupted run (`LayerResume`), in index order; their reports
    /// are not in `reports`.
    public var reused: [String] = []
}

/// How a run reports progress: `step` within a layer (label, done, total), and once per
/// finished layer.
public struct StageProgress {
    public var step: ProgressCallback?
    public var layerFinished: ((FinishedLayer) -> Void)?

    public init(step: ProgressCallback? = nil, layerFinished: ((FinishedLayer) -> Void)? = nil) {
        self.step = step
        self.layerFinished = layerFinished
    }
}

extension LayerStage {
    /// Runs the stage over `model`: every layer in index order, each handed to `sink` when
    /// finished (one layer in memory at a time). With `shard`, only the selected layers of that
    /// shard (`CheckpointReader.shardLayers`) are computed and handed on, and no other layer.
    /// With `resume`, a selected layer it holds finished is reused in its place (handed to the
    /// output by `resume.reuse`, not read or computed), and every layer computed is saved with
    /// `resume.save` as soon as it is finished; the history entry is then combined from the
    /// layers' one-layer entries (`historyEntry(combining:)`), as the uninterrupted run records it.
    public func run(model: CheckpointReader, shard: Shard? = nil, resume: LayerResume<Output>? = nil,
                    progress: StageProgress = StageProgress(), sink: (Output) throws -> Void) throws -> StageResult<Report> {
        var reports: [Report] = []
        var finished: [FinishedLayer] = []
        var entries: [JSONValue] = []  // one-layer history entries, in index order (with `resume`)
        var reused: [String] = []
        var selected = Set(layers)
        if let shard { selected.formIntersection(try model.shardLayers(shard)) }
        let reusable = selected.intersection(resume?.finished ?? [])
        let runStart = DispatchTime.now().uptimeNanoseconds
        func since(_ t: UInt64) -> Double { Double(DispatchTime.now().uptimeNanoseconds - t) / 1e9 }
        func finish(_ i: Int, _ name: String, computed: Bool, reused: Bool, start: UInt64) {
            var done = FinishedLayer(stage: self.name, name: name, index: i, count: model.layers.count, computed: computed,
                                     seconds: since(start), computedSoFar: reports.count,
                                     computedTotal: selected.count - reusable.count, elapsed: since(runStart),
                                     peakRSSBytes: peakResidentBytes())
            done.reused = reused
            finished.append(done)
            progress.layerFinished?(done)
        }
        for (i, c) in model.layers.enumerated() {
            let computed = selected.contains(c.name)
            guard computed || (keepsOtherLayers && shard == nil) else { continue }
            let start = DispatchTime.now().uptimeNanoseconds
            if let resume, reusable.contains(c.name) {
                // Finished by an interrupted run: neither read nor computed.
                entries.append(try resume.reuse(c.name))
                reused.append(c.name)
                finish(i, c.name, computed: true, reused: true, start: start)
                continue
            }
            if computed {
                let (output, report): (Output, Report)
                do {
                    // The reader refuses NaN and Inf in each part as it reads it: no stage computes on them.
                    (output, report) = try process(source: try model.layerSource(c.name), progress: progress.step)
                } catch let e as SMoEError {
                    throw e.naming(layer: c.name)
                }
                // Nothing non-finite is written or reported (a finite input can still overflow
                // float32 on the way).
                if let checked = output as? FiniteChecked, let what = checked.firstNonFinite {
                    throw SMoEError.layer(c.name, "\(name) produced NaN or Inf in \(what) (do the weights overflow float32?)")
                }
                if let resume {
                    // Durable before the output moves on: a run killed from here on keeps the layer.
                    let entry = historyEntry([report])
                    try resume.save(c.name, output, entry)
                    entries.append(entry)
                }
                try sink(output)
                reports.append(report)
            } else if let output = unchanged(try model.readLayer(c.name)) {
                try sink(output)
            }
            finish(i, c.name, computed: computed, reused: false, start: start)
        }
        let history = reused.isEmpty ? historyEntry(reports) : try historyEntry(combining: entries)
        return StageResult(reports: reports, layers: finished, history: history, reused: reused)
    }
}


extension CheckpointReader {
    /// The MoE layers named by `names` (nil: all), in index order; an unknown or empty name is
    /// an error naming the file and its layers.
    public func selectLayers(_ names: [String]?) throws -> [String] {
        guard let names else { return layers.map(\.name) }
        if names.isEmpty { throw SMoEError.setting(.layers, "names no layer") }
        for n in names where !layers.contains(where: { $0.name == n }) {
            throw SMoEError.setting(.layers, n.isEmpty ? "has an empty layer name"
                : "\(path) has no MoE layer named '\(n)' (layers: \(layers.map(\.name).joined(separator: ", ")))")
        }
        return layers.map(\.name).filter(names.contains)
    }
}

/// A value that can say where it holds a NaN or an infinity.
public protocol FiniteChecked {
    /// The first non-finite part ("expert 3 up"), or nil when every number is finite.
    var firstNonFinite: String? { get }
}

extension LinearOp: FiniteChecked {
    public var firstNonFinite: String? {
        switch self {
        case .dense(let w): return w.allFinite ? nil : "the weights"
        case .factored(let f):
            if !f.u.allFinite { return "U" }
            if !f.v.allFinite { return "V" }
            return f.s.values.allSatisfy(\.isFinite) ? nil : "S"
        }
    }
}

extension MoELayer: FiniteChecked {
    public var firstNonFinite: String? {
        if !router.allFinite || !(routerBias?.allSatisfy(\.isFinite) ?? true) { return "the router" }
        for (g, e) in experts.enumerated() {
            for (name, op) in e.namedMatrices { if let w = op.firstNonFinite { return "expert \(g) \(name) (\(w))" } }
            if !((e.upBias ?? []) + (e.downBias ?? []) + (e.gateBias ?? [])).allSatisfy(\.isFinite) { return "expert \(g) biases" }
        }
        return nil
    }
}

extension LayerStatistics: FiniteChecked {
    public var firstNonFinite: String? {
        if !frequency.allSatisfy(\.isFinite) { return "the usage frequencies" }
        for (b, m) in similarity where !m.values.allSatisfy(\.isFinite) { return "the \(b.rawValue) similarity" }
        for (b, m) in features where !m.values.allSatisfy(\.isFinite) { return "the \(b.rawValue) features" }
        return nil
    }
}
