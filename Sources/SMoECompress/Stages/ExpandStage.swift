/// What expanding did to one layer.
public struct LayerExpansion: Sendable {
    public var name: String
    /// Factored matrices made dense.
    public var factored: Int
    /// Stored experts before and after (after = E with one expert per slot).
    public var storedBefore: Int
    public var storedAfter: Int

    public var json: JSONValue {
        .object([("name", .string(name)), ("factored_matrices", .int(factored)),
                 ("stored_before", .int(storedBefore)), ("stored_after", .int(storedAfter))])
    }
}

/// Materialises factored matrices (`U·V + S`) back into dense ones, optionally one expert per
/// router slot (for tools that do not know `expert_map`).
public struct ExpandStage: LayerStage {
    public let name = "expand"
    public let layers: [String]
    public let perSlot: Bool

    public init(model: CheckpointReader, perSlot: Bool = false, layers: [String]? = nil) throws {
        self.layers = try model.selectLayers(layers)
        self.perSlot = perSlot
    }

    /// Expanding writes every matrix dense: the layer is read whole.
    public func process(source: LayerSource, progress: ProgressCallback?) throws -> (output: MoELayer, report: LayerExpansion) {
        let layer = try source.whole()
        let expanded = ExpandStage.expand(layer, perSlot: perSlot)
        let factored = layer.experts.reduce(0) { $0 + $1.namedMatrices.filter(\.op.isFactored).count }
        return (expanded, LayerExpansion(name: layer.name, factored: factored, storedBefore: layer.numStored,
                                         storedAfter: expanded.numStored))
    }

    public func historyEntry(_ reports: [LayerExpansion]) -> JSONValue {
        .object([("stage", .string(name)), ("tool", .string("smoe-compress \(smoeCompressVersion)")), ("per_slot", .bool(perSlot)),
                 ("layers", .array(reports.map(\.json)))])
    }

    /// The layer with every matrix dense; with `perSlot`, one stored expert per router slot
    /// (G = E, no expert_map). The forward pass is unchanged.
    public static func expand(_ layer: MoELayer, perSlot: Bool = false) -> MoELayer {
        var out = layer
        out.experts = layer.experts.map { e in
            var d = e
            for (name, op) in e.namedMatrices where op.isFactored { d[matrix: name] = .dense(op.dense()) }
            return d
        }
        if perSlot {
            out.experts = layer.resolvedMap.map { out.experts[$0] }
            out.expertMap = nil
        }
        return out
    }
}
