/// A MoE layer whose stored experts are read when needed, one at a time: the router, the slot
/// map and the shapes are in memory (`header`, a `MoELayer` holding no experts), the experts
/// come from a checkpoint (`CheckpointReader.layerSource`) or from a layer in memory. A stage
/// that works on one group of experts at a time holds only that group (docs/ALGORITHM.md,
/// "Scale"): one Mixtral-8x7B layer is 5.6 GB in float32.
public struct LayerSource: @unchecked Sendable {
    /// The layer without its experts (`experts` is empty): config, router, bias, expert map.
    public let header: MoELayer
    /// Stored experts G.
    public let numStored: Int
    /// `MoELayer.expertParameterCount` and `expertFlopsPerToken` of the whole layer (from the
    /// shapes: no expert is read for them).
    public let expertParameterCount: Int
    public let expertFlopsPerToken: Double
    /// The whole layer when it is already in memory.
    let inMemory: MoELayer?
    private let load: (Int) throws -> Expert

    /// A source over `layer`, already in memory.
    public init(_ layer: MoELayer) {
        var h = layer
        h.experts = []
        header = h
        numStored = layer.numStored
        expertParameterCount = layer.expertParameterCount
        expertFlopsPerToken = layer.expertFlopsPerToken
        inMemory = layer
        load = { layer.experts[$0] }
    }

    /// A source reading expert `i` with `load(i)` (validated by the caller); `parameters[i]` and
    /// `flops[i]` are expert i's `parameterCount` and `flopsPerToken`.
    init(header: MoELayer, parameters: [Int], flops: [Int], load: @escaping (Int) throws -> Expert) {
        precondition(header.experts.isEmpty && parameters.count == flops.count)
        self.header = header
        numStored = parameters.count
        expertParameterCount = parameters.reduce(0, +)
        expertFlopsPerToken = MoELayer.flopsPerToken(config: header.config, perStored: flops) { header.storedIndex(slot: $0) }
        inMemory = nil
        self.load = load
    }

    private init(header: MoELayer, numStored: Int, parameters: Int, flops: Double, load: @escaping (Int) throws -> Expert) {
        self.header = header
        self.numStored = numStored
        expertParameterCount = parameters
        expertFlopsPerToken = flops
        inMemory = nil
        self.load = load
    }

    /// The same layer with each stored expert passed through `transform(i, expert)` when it is
    /// read (each time; nothing is kept). `transform` must keep the expert's shapes, parameter
    /// count and FLOPs (a hidden-neuron permutation does): a stage's output layer that the
    /// writer stores expert by expert (`CheckpointWriter.write(_: LayerSource)`).
    /// The transformed experts are new values, stored in the file's float type
    /// (`expertEncoding` `.float`) like every stage's output.
    public func mappingExperts(_ transform: @escaping (Int, Expert) throws -> Expert) -> LayerSource {
        let load = self.load
        var header = self.header
        header.expertEncoding = .float
        return LayerSource(header: header, numStored: numStored, parameters: expertParameterCount,
                           flops: expertFlopsPerToken) { i in try transform(i, try load(i)) }
    }

    public var config: LayerConfig { header.config }
    public var name: String { header.name }

    /// Stored expert `i` (read from the file each time for a checkpoint source).
    public func expert(_ i: Int) throws -> Expert {
        precondition(i >= 0 && i < numStored, "stored expert \(i) outside 0..<\(numStored)")
        return try load(i)
    }

    /// The whole layer in memory (every expert read).
    public func whole() throws -> MoELayer {
        if let l = inMemory { return l }
        var l = header
        l.experts = try (0..<numStored).map(expert)
        return l
    }

    public func route(_ x: Matrix) -> Routing { header.route(x) }

    /// For each stored expert, its tokens and summed weights (`MoELayer.dispatch`).
    public func dispatch(_ routing: Routing) -> [(tokens: [Int], weights: [Float])] {
        header.dispatch(routing, stored: numStored)
    }

    /// The layer's output for a token block, as `MoELayer.forward` computes it (the same sums in
    /// the same order), reading each routed expert in turn.
    public func forward(_ x: Matrix, routing: Routing) throws -> Matrix {
        if let l = inMemory { return l.forward(x, routing: routing) }
        return try MoELayer.forward(x, routing: routing, dispatch: dispatch(routing), config: config, expert: expert)
    }
}

extension MoELayer {
    /// One pass over `tokens` for stored expert `g` of `layer`: each block routed and dispatched
    /// by the layer, and `body` called, for a block that routes tokens to `g`, with those tokens'
    /// inputs as the forward pass runs the expert on them and their routing weights
    /// (`expertInput`: where the routing weight scales the expert input, topk_sigmoid_input, the
    /// rows are p_t·x_t with weight 1, else x_t with weight p_t), or with `hidden` the hidden
    /// activation `expert` computes from those rows, one row per routed token.
    static func forEachRoutedInput(_ layer: LayerSource, expert: Expert, stored g: Int, tokens: TokenBlocks, hidden: Bool,
                                   _ body: (Matrix, [Float]) throws -> Void) throws {
        // `body` escapes nothing: `tokens` calls it only while it runs (the compiler cannot see
        // that a closure handed to the non-escaping `tokens` does not re-enter it).
        try withoutActuallyEscaping(body) { body in
            try tokens { x in
                let disp = layer.dispatch(layer.route(x))[g]
                guard !disp.tokens.isEmpty else { return }
                let (rows, weights) = expertInput(x, disp, config: layer.config)
                try body(hidden ? expert.hidden(rows, activation: layer.config.activation) : rows, weights)
            }
        }
    }

    /// The weighted sum of the dispatched experts' outputs for a token block: each expert's
    /// tokens gathered, run batched, scattered back (stored-expert order).
    static func forward(_ x: Matrix, routing: Routing, dispatch: [(tokens: [Int], weights: [Float])], config: LayerConfig,
                        expert: (Int) throws -> Expert) rethrows -> Matrix {
        var y = Matrix(rows: x.rows, cols: config.dModel)
        let dm = config.dModel
        for (g, d) in dispatch.enumerated() where !d.tokens.isEmpty {
            let (rows, weights) = expertInput(x, d, config: config)
            let yg = try expert(g).forward(rows, activation: config.activation)
            for (r, t) in d.tokens.enumerated() {
                let w = weights[r]
                for j in 0..<dm { y.data[t * dm + j] += w * yg.data[r * dm + j] }
            }
        }
        return y
    }
}
