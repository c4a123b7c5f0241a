/// What `inspect` reports of an smoe-h5 file, built from shapes and attributes only
/// (no weights are read, so it is fast on any size).
public enum Inspection {
    public static func json(_ s: LayerSummary) -> JSONValue {
        let c = s.config
        var kv: [(String, JSONValue)] = [
            ("name", .string(c.name)), ("index", .int(c.index)), ("num_experts", .int(c.numExperts)),
            ("stored_experts", .int(s.numStored)), ("top_k", .int(c.topK)), ("d_model", .int(c.dModel)),
            ("d_ff", .int(c.dFF)), ("expert_type", .string(c.expertType.rawValue)),
            ("activation", .string(c.activation.rawValue)), ("router_type", .string(c.routerType.rawValue)),
            ("expert_map", .bool(s.hasExpertMap)), ("router_bias", .bool(s.hasRouterBias)),
            ("expert_parameters", .int(s.expertParameters)), ("expert_bytes", .int(s.expertFileBytes)),
            ("router_parameters", .int(s.routerParameters)),
        ]
        kv.append(("matrices", .array(s.matrices.map { m in
            var o: [(String, JSONValue)] = [("name", .string(m.name)), ("shape", JSONValue([m.out, m.inFeatures])),
                                            ("dtype", .string(m.encoding.isFP8 ? "f8_e4m3" : m.storage.rawValue)), ("bytes", .int(m.fileBytes))]
            if case .fp8Block(let r, let c) = m.encoding { o.append(("block_size", JSONValue([r, c]))) }
            if let r = m.ranks { o.append(("ranks", JSONValue(r))) }
            if let n = m.nnz { o.append(("nnz", JSONValue(n))) }
            return .object(o)
        })))
        return .object(kv)
    }

    /// A JSON description of a checkpoint.
    public static func checkpoint(_ r: CheckpointReader) throws -> (json: JSONValue, layers: [LayerSummary], dense: (count: Int, parameters: Int, bytes: Int)) {
        let layers = try r.layers.map { try r.summary($0.name) }
        let dense = try r.denseSummary()
        let expertBytes = layers.reduce(0) { saturatingSum($0, $1.expertFileBytes) }
        let json: JSONValue = .object([
            ("file", .string(r.path)), ("format", "smoe-checkpoint"), ("architecture", .string(r.architecture)),
            ("layers", .array(layers.map(json))),
            ("totals", .object([
                ("moe_layers", .int(layers.count)),
                ("expert_parameters", .int(layers.reduce(0) { saturatingSum($0, $1.expertParameters) })),
                ("expert_bytes", .int(expertBytes)),
                ("router_parameters", .int(layers.reduce(0) { saturatingSum($0, $1.routerParameters) })),
                ("dense_tensors", .int(dense.count)), ("dense_parameters", .int(dense.parameters)),
                ("dense_bytes", .int(dense.bytes)),
            ])),
            ("history", .array(r.history)),
        ])
        return (json, layers, dense)
    }

    public static func calibration(_ c: CalibrationReader) -> JSONValue {
        .object([
            ("file", .string(c.path)), ("format", "smoe-calibration"), ("source", .string(c.source)),
            ("layers", .array(c.layers.map { l in
                .object([("name", .string(l.name)), ("index", .int(l.index)), ("tokens", .int(l.numTokens)),
                         ("d_model", .int(l.dModel)), ("router_logits", .bool(l.hasRouterLogits)),
                         ("output", .bool(l.hasOutput))])
            })),
        ])
    }
}
