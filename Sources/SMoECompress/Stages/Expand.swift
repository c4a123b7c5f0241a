/// Materialises factored matrices (`U·V + S`) back into dense ones, optionally one expert per
/// router slot (for tools that do not know `expert_map`).
public enum ExpandStage {
    /// `U·V + S` as a dense matrix: one BLAS product, then the CSR entries added in place.
    public static func materialise(_ op: LinearOp) -> Matrix {
        switch op {
        case .dense(let w): return w
        case .factored(let f):
            var w = BLAS.matmul(f.u, f.v)
            let c = f.s.cols
            for i in 0..<f.s.rows {
                for k in f.s.indptr[i]..<f.s.indptr[i + 1] { w.data[i * c + Int(f.s.indices[k])] += f.s.values[k] }
            }
            return w
        }
    }

    /// The layer with every matrix dense; with `perSlot`, one stored expert per router slot
    /// (G = E, no expert_map). The forward pass is unchanged.
    public static func expand(_ layer: MoELayer, perSlot: Bool = false) -> MoELayer {
        var out = layer
        out.experts = layer.experts.map { e in
            var d = e
            for (name, op) in e.namedMatrices where op.isFactored { d[matrix: name] = .dense(materialise(op)) }
            return d
        }
        if perSlot {
            out.experts = layer.resolvedMap.map { out.experts[$0] }
            out.expertMap = nil
        }
        return out
    }

    public static func historyEntry(perSlot: Bool, layers: [(name: String, factored: Int, storedBefore: Int, storedAfter: Int)]) -> JSONValue {
        .object([("stage", "expand"), ("tool", .string("smoe-compress \(smoeCompressVersion)")), ("per_slot", .bool(perSlot)),
                 ("layers", .array(layers.map {
                     .object([("name", .string($0.name)), ("factored_matrices", .int($0.factored)),
                              ("stored_before", .int($0.storedBefore)), ("stored_after", .int($0.storedAfter))])
                 }))])
    }

    /// Expands every layer of `model` into `writer` one layer at a time and records the history
    /// entry (the caller commits). Returns per layer the number of factored matrices expanded.
    @discardableResult
    public static func run(model: CheckpointReader, perSlot: Bool, writer: CheckpointWriter,
                           progress: ProgressCallback? = nil) throws -> [(name: String, factored: Int, storedBefore: Int, storedAfter: Int)] {
        var done: [(name: String, factored: Int, storedBefore: Int, storedAfter: Int)] = []
        for (i, c) in model.layers.enumerated() {
            progress?("expanding", i, model.layers.count)
            let layer = try model.readLayer(c.name)
            let factored = layer.experts.reduce(0) { $0 + $1.namedMatrices.filter(\.op.isFactored).count }
            let expanded = expand(layer, perSlot: perSlot)
            try writer.write(expanded)
            done.append((c.name, factored, layer.numStored, expanded.numStored))
        }
        writer.updateEntry(historyEntry(perSlot: perSlot, layers: done))
        return done
    }
}
