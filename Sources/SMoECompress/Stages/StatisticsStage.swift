import Foundation

/// The routing-statistics stage (`stats`): per selected layer, usage and the similarity bases
/// asked for, over the layer's calibration tokens streamed in blocks.
public struct StatisticsStage: LayerStage {
    public let name = "stats"
    public let layers: [String]
    public let calibration: CalibrationReader
    public let bases: Set<SimilarityBase>
    public let tokens: TokenSettings

    /// Checks the settings and that the capture has every selected layer of `model`.
    public init(model: CheckpointReader, calibration: CalibrationReader, bases: Set<SimilarityBase> = [.routerLogits],
                tokens: TokenSettings = TokenSettings(), layers: [String]? = nil) throws {
        try tokens.validate()
        self.layers = try model.selectLayers(layers)
        // Without a selection the capture must hold no layer the model lacks either.
        try calibration.checkMatches(model, layers: layers == nil ? nil : self.layers)
        self.calibration = calibration
        self.bases = bases
        self.tokens = tokens
    }

    /// Without weight or expert-output similarity only the router is needed: the experts are
    /// not read at all; with them, the layer is read whole.
    public func process(source: LayerSource, progress: ProgressCallback?) throws -> (output: LayerStatistics, report: LayerStatistics) {
        let layer = bases.contains(where: \.needsExperts) ? try source.whole() : source.header
        let s = try Statistics.compute(layer: layer, calibration: calibration, bases: bases, tokens: tokens, progress: progress)
        return (s, s)
    }

    /// A statistics file holds the computed layers only.
    public func unchanged(_ layer: MoELayer) -> LayerStatistics? { nil }
    public var keepsOtherLayers: Bool { false }

    public func historyEntry(_ reports: [LayerStatistics]) -> JSONValue {
        .object([("stage", .string(name)), ("tool", .string("smoe-compress \(smoeCompressVersion)")),
                 ("calibration", .string(calibration.path)), ("similarity", JSONValue(bases.sorted().map(\.rawValue))),
                 ("layers", JSONValue(reports.map(\.name)))])
    }
}

// MARK: what shards of one run must agree on

extension StatisticsStage {
    public var settingsRecord: JSONValue {
        historyEntry([]).adding([("max_tokens", tokens.maxTokens.map(JSONValue.int) ?? .null)])
    }
}
