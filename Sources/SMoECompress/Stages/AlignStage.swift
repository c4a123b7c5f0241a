import Foundation

/// Which stored expert a layer's others are aligned to.
public enum AlignmentReference: Sendable, Equatable {
    /// The stored expert of the most used router slot (needs statistics).
    case mostUsed
    /// A stored expert index, the same in every layer.
    case stored(Int)
}

/// The `align` stage: permutes every stored expert's hidden neurons to match a reference
/// expert, layer by layer; the model computes the same function.
public struct AlignStage: LayerStage {
    public let name = "align"
    public let layers: [String]
    public let reference: AlignmentReference
    public let stats: StatsReader?
    public let parallelism: Alignment.Parallelism

    /// `reference` nil: the most used expert with `stats`, else stored expert 0.
    public init(model: CheckpointReader, stats: StatsReader?, reference: AlignmentReference? = nil,
                parallelism: Alignment.Parallelism = .pairs, layers: [String]? = nil) throws {
        let reference = reference ?? (stats == nil ? .stored(0) : .mostUsed)
        if reference == .mostUsed && stats == nil { throw SMoEError.setting(.reference, "most-used needs {stats}") }
        let names = try model.selectLayers(layers)
        try stats?.checkMatches(model, layers: names)
        self.layers = names
        self.reference = reference
        self.stats = stats
        self.parallelism = parallelism
    }

    /// Experts are read a batch at a time, and the aligned layer is written expert by expert.
    public func process(source: LayerSource, progress: ProgressCallback?) throws -> (output: LayerSource, report: LayerAlignment) {
        let ref: Int
        switch reference {
        case .stored(let n): ref = n
        case .mostUsed: ref = source.header.storedIndex(slot: Grouping.byUsage(try stats!.frequency(source.name))[0])
        }
        let (aligned, report) = try Alignment.alignLayer(source, reference: ref, parallelism: parallelism, progress: progress)
        return (aligned, report)
    }

    public func unchanged(_ layer: MoELayer) -> LayerSource? { LayerSource(layer) }
    public var keepsOtherLayers: Bool { true }

    public func historyEntry(_ reports: [LayerAlignment]) -> JSONValue {
        let ref: String
        switch reference {
        case .mostUsed: ref = "most-used"
        case .stored(let n): ref = "\(n)"
        }
        return .object([
            ("stage", .string(name)), ("tool", .string("smoe-compress \(smoeCompressVersion)")), ("reference", .string(ref)),
            ("layers", .array(reports.map { .object([("name", .string($0.name)), ("reference", .int($0.reference))]) })),
        ])
    }
}
