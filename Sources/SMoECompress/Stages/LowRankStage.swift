import Foundation

/// What factoring did to one matrix.
public struct MatrixLowRankReport: Sendable {
    /// up, gate or down.
    public var matrix: String
    /// Stored expert index.
    public var expert: Int
    public var rows: Int
    public var cols: Int
    public var rank: Int
    public var nnz: Int
    /// ‖W − (U·V + S)‖_F / ‖W‖_F of what is stored (0 when kept dense).
    public var relativeError: Double
    public var paramsBefore: Int
    public var paramsAfter: Int
    public var bytesBefore: Int
    public var bytesAfter: Int
    /// The factored form would not have been smaller, so the matrix stays dense.
    public var keptDense: Bool = false
    public var reason: String? = nil
    /// "exact" or "randomized".
    public var svd: String
    /// Entries of S ranked by |S_ij|·‖X_j‖.
    public var activationAware: Bool = false
    /// U·V minimised the output error ‖ΔW·X‖ on the whitened matrix (ALGORITHM.md §4.1).
    public var whitened: Bool = false
    /// With whitening: ‖(W − (U·V + S))·L‖_F / ‖W·L‖_F, the relative output error on the
    /// calibration inputs (ridge included; 0 when kept dense).
    public var outputError: Double? = nil
    /// Relative error after the one-shot split and after each refinement (best one is kept).
    public var errorHistory: [Double] = []

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [
            ("matrix", .string(matrix)), ("expert", .int(expert)), ("shape", JSONValue([rows, cols])), ("rank", .int(rank)),
            ("nnz", .int(nnz)), ("relative_error", .double(relativeError)), ("params_before", .int(paramsBefore)),
            ("params_after", .int(paramsAfter)), ("bytes_before", .int(bytesBefore)), ("bytes_after", .int(bytesAfter)),
            ("kept_dense", .bool(keptDense)), ("svd", .string(svd)), ("activation_aware", .bool(activationAware)),
            ("whitened", .bool(whitened)),
        ]
        if let e = outputError { kv.append(("output_error", .double(e))) }
        if let r = reason { kv.append(("reason", .string(r))) }
        if errorHistory.count > 1 { kv.append(("error_history", JSONValue(errorHistory))) }
        return .object(kv)
    }
}

/// What the stage did to one layer.
public struct LayerLowRankReport: Sendable {
    public var name: String
    public var matrices: [MatrixLowRankReport]

    public var bytesBefore: Int { matrices.reduce(0) { $0 + $1.bytesBefore } }
    public var bytesAfter: Int { matrices.reduce(0) { $0 + $1.bytesAfter } }
    public var paramsBefore: Int { matrices.reduce(0) { $0 + $1.paramsBefore } }
    public var paramsAfter: Int { matrices.reduce(0) { $0 + $1.paramsAfter } }
    /// The mean of the matrices' relative errors.
    public var meanRelativeError: Double {
        matrices.isEmpty ? 0 : matrices.reduce(0) { $0 + $1.relativeError } / Double(matrices.count)
    }
    public var maxRelativeError: Double { matrices.map(\.relativeError).max() ?? 0 }

    public var json: JSONValue {
        .object([("name", .string(name)), ("bytes_before", .int(bytesBefore)), ("bytes_after", .int(bytesAfter)),
                 ("params_before", .int(paramsBefore)), ("params_after", .int(paramsAfter)),
                 ("mean_relative_error", .double(meanRelativeError)), ("max_relative_error", .double(maxRelativeError)),
                 ("matrices", .array(matrices.map(\.json)))])
    }

    /// The compact form recorded in the checkpoint history.
    public var historyJSON: JSONValue {
        .object([("name", .string(name)), ("ranks", JSONValue(matrices.map(\.rank))), ("nnz", JSONValue(matrices.map(\.nnz))),
                 ("kept_dense", .int(matrices.filter(\.keptDense).count)),
                 ("mean_relative_error", .double(meanRelativeError))])
    }
}

/// Low-rank plus sparse compression of expert matrices (ALGORITHM.md §4).
/// The factoring itself is in `LowRank/LowRankStage+Factoring.swift`.
public struct LowRankStage: LayerStage {
    public let name = "lowrank"
    public let layers: [String]
    public let options: LowRankOptions
    /// With calibration tokens, sparse entries are ranked activation-aware.
    public let calibration: CalibrationReader?
    public let tokens: TokenSettings

    /// Validates the options once, and that the selected layers have a matrix to factor.
    public init(model: CheckpointReader, calibration: CalibrationReader?, options: LowRankOptions,
                tokens: TokenSettings = TokenSettings(), layers: [String]? = nil) throws {
        try options.validate()
        try tokens.validate()
        let names = try model.selectLayers(layers)
        let selected = model.layers.filter { names.contains($0.name) }
        if !selected.contains(where: { c in options.matrices.contains { $0 != .gate || c.expertType == .glu } }) {
            throw SMoEError.setting(.matrices, "none of \(options.matrices.sorted().map(\.rawValue).joined(separator: ",")) exists in the selected layers of \(model.path)")
        }
        if let c = calibration { try c.checkMatches(model, layers: names) }
        if options.objective == .output && calibration == nil {
            throw SMoEError.setting(.lowrankObjective, "output needs calibration tokens ({calibration})")
        }
        self.layers = names
        self.options = options
        self.calibration = calibration
        self.tokens = tokens
    }

    /// With the output objective (or none: by weight) one expert is read at a time;
    /// activation-aware ranking by weight reads the layer whole (its input norms need every expert).
    public func process(source: LayerSource, progress: ProgressCallback?) throws -> (output: MoELayer, report: LayerLowRankReport) {
        let blocks = calibration.map { $0.tokenBlocks(source.name, tokens) }
        if calibration == nil || options.objective(hasTokens: true) == .output {
            return try LowRankStage.compressLayer(source, options: options, whitenOn: blocks, progress: progress)
        }
        let layer = try source.whole()
        let norms = try blocks.map { try LowRankStage.inputNorms(layer, tokens: $0) }
        return try LowRankStage.compressLayer(layer, options: options, inputNorms: norms, progress: progress)
    }

    public func historyEntry(_ reports: [LayerLowRankReport]) -> JSONValue {
        var o = options
        o.objective = options.objective(hasTokens: calibration != nil)
        return LowRankStage.historyEntry(o, calibration: calibration?.path, reports: reports)
    }

    /// The history entry of a lowrank run (also the `lowrank` part of a compress entry).
    public static func historyEntry(_ options: LowRankOptions, calibration: String?, reports: [LayerLowRankReport]) -> JSONValue {
        var kv: [(String, JSONValue)] = [("stage", "lowrank"), ("tool", .string("smoe-compress \(smoeCompressVersion)"))]
        kv += options.historyJSON
        kv.append(("activation_aware", .bool(calibration != nil)))
        if let c = calibration { kv.append(("calibration", .string(c))) }
        kv.append(("layers", .array(reports.map(\.historyJSON))))
        return .object(kv)
    }
}

/// Ranks as a table shows them: "dense" (none), "12" or "8-31".
public func rankRange(_ ranks: [Int]) -> String {
    guard let lo = ranks.min(), let hi = ranks.max() else { return "dense" }
    return lo == hi ? "\(lo)" : "\(lo)-\(hi)"
}

// MARK: what shards of one run must agree on

extension LowRankStage {
    public var settingsRecord: JSONValue {
        historyEntry([]).adding([("tokens", tokens.record)])
    }
}
