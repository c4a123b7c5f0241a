import Foundation

/// Parameters of a planted (synthetic) MoE model whose answers are known: each layer's
/// experts are noisy, hidden-neuron-permuted copies of a few prototype experts ("families").
public struct SyntheticSpec: Sendable, Equatable {
    public var architecture: String
    public var numLayers: Int
    public var numExperts: Int
    /// Planted families (prototypes) per layer.
    public var families: Int
    public var topK: Int
    public var dModel: Int
    public var dFF: Int
    public var expertType: ExpertType
    public var activation: Activation
    public var routerType: RouterType
    /// Noise added to each copy, relative to the prototype's entry scale.
    public var noise: Float
    /// Calibration tokens per layer.
    public var tokens: Int
    public var seed: UInt64
    /// Grouped top-k (n_group, topk_group), the routed scaling factor and the standard deviation
    /// of a per-slot selection bias drawn N(0, σ²) from its own seeded stream (0: none): the
    /// DeepSeek-V3 router with a sigmoid `routerType`. Defaults leave the planted model as before.
    public var numGroups = 1
    public var topKGroups = 1
    public var routedScalingFactor: Float = 1
    public var selectionBiasStd: Float = 0

    public init(architecture: String, numLayers: Int, numExperts: Int, families: Int, topK: Int, dModel: Int, dFF: Int,
                expertType: ExpertType, activation: Activation, routerType: RouterType, noise: Float, tokens: Int, seed: UInt64) {
        self.architecture = architecture
        self.numLayers = numLayers
        self.numExperts = numExperts
        self.families = families
        self.topK = topK
        self.dModel = dModel
        self.dFF = dFF
        self.expertType = expertType
        self.activation = activation
        self.routerType = routerType
        self.noise = noise
        self.tokens = tokens
        self.seed = seed
    }

    /// The committed Switch-like fixture: mlp/relu experts, top-1, 4 layers of 8 experts in 3 families.
    public static let switchFixture = SyntheticSpec(
        architecture: "synthetic-switch", numLayers: 4, numExperts: 8, families: 3, topK: 1, dModel: 32, dFF: 64,
        expertType: .mlp, activation: .relu, routerType: .softmax_topk, noise: 0.01, tokens: 1024, seed: 2024)

    /// The committed Mixtral-like fixture: glu/silu experts, top-2 renormalised, 2 layers of 8 experts in 4 families.
    public static let mixtralFixture = SyntheticSpec(
        architecture: "synthetic-mixtral", numLayers: 2, numExperts: 8, families: 4, topK: 2, dModel: 32, dFF: 64,
        expertType: .glu, activation: .silu, routerType: .softmax_topk_norm, noise: 0.01, tokens: 1024, seed: 2026)

    public func validate() throws {
        if numLayers < 1 { throw SMoEError.setting(.synthLayers, "must be at least 1") }
        if numExperts < 1 { throw SMoEError.setting(.experts, "must be at least 1") }
        if families < 1 || families > numExperts { throw SMoEError.setting(.families, "must be in 1...\(numExperts)") }
        if topK < 1 || topK > numExperts { throw SMoEError.setting(.topK, "must be in 1...\(numExperts)") }
        if dModel < 1 || dFF < 1 { throw SMoEError.setting(.dimensions, "must be positive") }
        if tokens < 1 { throw SMoEError.setting(.tokens, "must be positive") }
        if !(noise >= 0 && noise.isFinite) { throw SMoEError.setting(.noise, "must be a finite number ≥ 0") }
        if let why = layerConfig(name: "synthetic", index: 0).routingProblem { throw SMoEError.setting(.synthRouting, why) }
        if routerType.scalesExpertInput { throw SMoEError.setting(.synthRouting, "\(routerType.rawValue) is not generated (the capture does not scale the expert input)") }
        if !(selectionBiasStd >= 0 && selectionBiasStd.isFinite) { throw SMoEError.setting(.synthRouting, "the selection bias deviation must be a finite number ≥ 0") }
    }

    /// The config of planted layer `index` named `name`.
    func layerConfig(name: String, index: Int) -> LayerConfig {
        LayerConfig(name: name, index: index, numExperts: numExperts, topK: topK, dModel: dModel, dFF: dFF,
                    expertType: expertType, activation: activation, routerType: routerType, numGroups: numGroups,
                    topKGroups: topKGroups, routedScalingFactor: routedScalingFactor)
    }

    /// True when the routing is the original planted one (plain softmax, no bias or groups).
    var plainRouting: Bool { layerConfig(name: "synthetic", index: 0).isPlainSoftmaxRouting && selectionBiasStd == 0 }
}

/// The ground truth planted in one layer.
public struct PlantedLayer: Sendable, Equatable {
    public var name: String
    /// Family of each router slot.
    public var family: [Int]
    /// Expert e's hidden neuron i is prototype neuron `permutation[e][i]`.
    public var permutation: [[Int]]
    /// Routing hits per slot on the calibration tokens (counted per token by a direct loop).
    public var counts: [Int]
}

/// Builds planted layers and their calibration tokens, and writes both files.
public enum SyntheticGenerator {
    public static func layerName(_ spec: SyntheticSpec, _ l: Int) -> String {
        spec.expertType == .glu ? "model.layers.\(l).block_sparse_moe" : "encoder.block.\(2 * l + 1).layer.1.mlp"
    }

    static func gaussian(_ rows: Int, _ cols: Int, _ scale: Float, _ rng: inout SplitMix64) -> Matrix {
        Matrix(rows: rows, cols: cols, data: (0..<(rows * cols)).map { _ in Float(rng.nextGaussian()) * scale })
    }

    static func unit(_ n: Int, _ rng: inout SplitMix64) -> [Float] {
        var v = (0..<n).map { _ in Float(rng.nextGaussian()) }
        let norm = v.reduce(0) { $0 + $1 * $1 }.squareRoot()
        for i in 0..<n { v[i] /= norm }
        return v
    }

    /// A planted layer generated expert by expert, with the same random stream as generating it
    /// whole: the prototypes are not kept but regenerated from the generator state recorded where
    /// each begins (SplitMix64 advances by a constant per draw, and a Gaussian takes exactly two
    /// draws, so a prototype's draws are skipped by moving the state), so memory holds one
    /// prototype and one expert at a time, not the layer.
    struct LayerPlan {
        let spec: SyntheticSpec
        let index: Int
        let family: [Int]
        /// Generator states where each prototype's draws begin: up, gate, down per family.
        let protoStates: (up: [UInt64], gate: [UInt64], down: [UInt64])
        /// The generator after the prototypes, where the experts' draws begin.
        var rng: SplitMix64

        init(_ spec: SyntheticSpec, index l: Int) {
            self.spec = spec
            self.index = l
            var rng = SplitMix64(seed: spec.seed &+ UInt64(l) &* 0x9E37_79B9)
            let E = spec.numExperts, P = spec.families
            // Family of each slot: every family gets at least one slot, the rest at random, then shuffled.
            var family = (0..<E).map { $0 < P ? $0 : rng.nextInt(below: P) }
            let shuffle = rng.permutation(E)
            family = shuffle.map { family[$0] }
            self.family = family
            func skip(_ count: Int) -> [UInt64] {
                (0..<P).map { _ in
                    let start = rng.state
                    rng.state &+= UInt64(2 * count) &* 0x9E37_79B9_7F4A_7C15  // 2 draws per Gaussian
                    return start
                }
            }
            let n = spec.dFF * spec.dModel
            let up = skip(n), gate = skip(n), down = skip(n)
            protoStates = (up, gate, down)
            self.rng = rng
        }

        var upScale: Float { 1 / Float(spec.dModel).squareRoot() }
        var downScale: Float { 1 / Float(spec.dFF).squareRoot() }

        func prototype(_ state: UInt64, _ rows: Int, _ cols: Int, _ scale: Float) -> Matrix {
            var r = SplitMix64(seed: state)
            return gaussian(rows, cols, scale, &r)
        }

        /// The next expert (in slot order) and its hidden-neuron permutation.
        mutating func nextExpert(_ e: Int) -> (Expert, [Int]) {
            let p = family[e], d = spec.dModel, f = spec.dFF
            let perm = rng.permutation(f)
            var up = prototype(protoStates.up[p], f, d, upScale).gatherRows(perm)
            up.addScaled(gaussian(f, d, upScale * spec.noise, &rng), 1)
            var down = prototype(protoStates.down[p], d, f, downScale).gatherColumns(perm)
            down.addScaled(gaussian(d, f, downScale * spec.noise, &rng), 1)
            var gate: Matrix? = nil
            if spec.expertType == .glu {
                var g = prototype(protoStates.gate[p], f, d, upScale).gatherRows(perm)
                g.addScaled(gaussian(f, d, upScale * spec.noise, &rng), 1)
                gate = g
            }
            return (Expert(up: up, gate: gate, down: down), perm)
        }

        /// After every expert: the router, the calibration tokens and the layer's configuration.
        mutating func routerAndTokens() -> (router: Matrix, x: Matrix, config: LayerConfig, selectionBias: [Float]?) {
            let E = spec.numExperts, P = spec.families, d = spec.dModel
            // Router: slot e's row = s_e · (4·u_family + 2·n_e) with n_e a random unit vector. The
            // first slot of each family (its leader) has s = 1, the others 0.6...0.7, so the leader
            // is the family's most used slot and the others are chosen now and then.
            let dirs = (0..<P).map { _ in unit(d, &rng) }
            var router = Matrix(rows: E, cols: d)
            var seenFamily = Set<Int>()
            for e in 0..<E {
                let leader = seenFamily.insert(family[e]).inserted
                let s: Float = leader ? 1.0 : 0.6 + 0.1 * Float(rng.nextDouble())
                let n = unit(d, &rng)
                for j in 0..<d { router[e, j] = s * (4 * dirs[family[e]][j] + 2 * n[j]) }
            }
            // Tokens: each draws min(k, P) distinct families with uneven probabilities and is
            // x = Σ 2·u_h + N(0, 0.5²), so every family gets traffic and top-k picks k families.
            let weights = (0..<P).map { 1.0 + Double($0) * 0.5 }
            var x = Matrix(rows: spec.tokens, cols: d)
            for t in 0..<spec.tokens {
                var w = weights
                for _ in 0..<min(spec.topK, P) {
                    var r = rng.nextDouble() * w.reduce(0, +)
                    var h = 0
                    while h < P - 1, r >= w[h] || w[h] == 0 { r -= w[h]; h += 1 }
                    w[h] = 0
                    for j in 0..<d { x[t, j] += 2 * dirs[h][j] }
                }
                for j in 0..<d { x[t, j] += 0.5 * Float(rng.nextGaussian()) }
            }
            let config = spec.layerConfig(name: layerName(spec, index), index: index)
            var selectionBias: [Float]? = nil
            if spec.selectionBiasStd > 0 {
                var r = SplitMix64(seed: spec.seed ^ 0x5E1E_C7ED &+ UInt64(index))
                selectionBias = (0..<E).map { _ in Float(r.nextGaussian()) * spec.selectionBiasStd }
            }
            return (router, x, config, selectionBias)
        }

        /// Planted usage by a direct per-token loop (ties to the lower slot); other routings by
        /// the layer's routing.
        func counts(router: Matrix, x: Matrix, config: LayerConfig, selectionBias: [Float]?) -> [Int] {
            let E = spec.numExperts, d = spec.dModel
            if !spec.plainRouting {
                var counts = [Int](repeating: 0, count: E)
                let z = BLAS.matmul(x, router, transB: true)
                for s in MoELayer.route(logits: z, config: config, selectionBias: selectionBias).slots { counts[s] += 1 }
                return counts
            }
            var counts = [Int](repeating: 0, count: E)
            for t in 0..<spec.tokens {
                var logits = [Float](repeating: 0, count: E)
                for e in 0..<E {
                    var s: Float = 0
                    for j in 0..<d { s += router[e, j] * x[t, j] }
                    logits[e] = s
                }
                let order = (0..<E).sorted { logits[$0] != logits[$1] ? logits[$0] > logits[$1] : $0 < $1 }
                for e in order.prefix(spec.topK) { counts[e] += 1 }
            }
            return counts
        }
    }

    /// One planted layer in memory, its calibration inputs and ground truth.
    public static func makeLayer(_ spec: SyntheticSpec, index l: Int) -> (layer: MoELayer, x: Matrix, truth: PlantedLayer) {
        var plan = LayerPlan(spec, index: l)
        var experts: [Expert] = []
        var perms: [[Int]] = []
        for e in 0..<spec.numExperts {
            let (expert, perm) = plan.nextExpert(e)
            experts.append(expert)
            perms.append(perm)
        }
        let (router, x, config, selectionBias) = plan.routerAndTokens()
        let layer = MoELayer(config: config, router: router, selectionBias: selectionBias, experts: experts)
        return (layer, x, PlantedLayer(name: config.name, family: plan.family, permutation: perms,
                                       counts: plan.counts(router: router, x: x, config: config, selectionBias: selectionBias)))
    }

    /// Writes the checkpoint and its calibration file, one expert in memory at a time (the
    /// experts are written as they are generated, then read back one by one for the capture's
    /// outputs); returns the planted truth per layer. `storage` is the weights' stored type.
    @discardableResult
    public static func write(_ spec: SyntheticSpec, model: String, calibration: String,
                             storage: StorageType = .f32) throws -> [PlantedLayer] {
        try spec.validate()
        let base: JSONValue = [
            "stage": "synth", "seed": .int(Int(truncatingIfNeeded: spec.seed)), "layers": .int(spec.numLayers),
            "experts": .int(spec.numExperts), "families": .int(spec.families), "top_k": .int(spec.topK),
            "d_model": .int(spec.dModel), "d_ff": .int(spec.dFF), "expert_type": .string(spec.expertType.rawValue),
            "noise": .double(Double("\(spec.noise)") ?? Double(spec.noise)), "tokens": .int(spec.tokens),
        ]
        let entry = base.adding(spec.plainRouting ? [] : [
            ("router_type", .string(spec.routerType.rawValue)), ("n_group", .int(spec.numGroups)), ("topk_group", .int(spec.topKGroups)),
            ("routed_scaling_factor", .double(Double("\(spec.routedScalingFactor)") ?? 1)),
            ("selection_bias_std", .double(Double("\(spec.selectionBiasStd)") ?? 0)),
        ])
        let w = try CheckpointWriter(destination: model, architecture: spec.architecture, history: [], entry: entry,
                                     options: WriteOptions(dtype: storage))
        let cw = try CalibrationWriter(destination: calibration, source: "smoe-compress synth: " + entry.serialized())
        // A small dense part so /dense copying is exercised.
        var rng = SplitMix64(seed: spec.seed ^ 0xD15E)
        try w.root.write("dense/embed_tokens.weight", floats: gaussian(64, spec.dModel, 0.1, &rng).data, shape: [64, spec.dModel])
        try w.root.write("dense/norm.weight", floats: [Float](repeating: 1, count: spec.dModel), shape: [spec.dModel])
        var truths: [PlantedLayer] = []
        for l in 0..<spec.numLayers {
            var plan = LayerPlan(spec, index: l)
            // The router comes after the experts in the random stream: generate and store the
            // experts first (the group is created with the router once it is known).
            var perms: [[Int]] = []
            let pending = try w.beginDenseExperts(named: layerName(spec, l), count: spec.numExperts, dModel: spec.dModel,
                                                  dFF: spec.dFF, gated: spec.expertType == .glu)
            for e in 0..<spec.numExperts {
                let (expert, perm) = plan.nextExpert(e)
                try pending.write(expert)
                perms.append(perm)
            }
            let (router, x, config, selectionBias) = plan.routerAndTokens()
            let truth = PlantedLayer(name: config.name, family: plan.family, permutation: perms,
                                     counts: plan.counts(router: router, x: x, config: config, selectionBias: selectionBias))
            let g = try w.finishDenseLayer(pending, config: config, router: router, selectionBias: selectionBias)
            try g.write("planted/family", ints: truth.family, shape: [spec.numExperts], as: .i32)
            try g.write("planted/permutation", ints: truth.permutation.flatMap { $0 }, shape: [spec.numExperts, spec.dFF], as: .i32)
            try g.write("planted/counts", ints: truth.counts, shape: [spec.numExperts], as: .i64)
            try g.setAttribute("planted_families", spec.families)
            try g.setAttribute("planted_noise", Double(spec.noise))
            // The layer's output, one expert at a time (as stored, so the capture matches the file).
            let stored = Matrix(rows: router.rows, cols: router.cols, data: router.data.map(storage.roundTrip))
            let shell = MoELayer(config: config, router: stored, selectionBias: selectionBias, experts: [])
            let routing = shell.route(x)
            var y = Matrix(rows: x.rows, cols: spec.dModel)
            for (e, disp) in shell.dispatch(routing, stored: spec.numExperts).enumerated() where !disp.tokens.isEmpty {
                let expert = try pending.read(e)
                let ye = expert.forward(x.gatherRows(disp.tokens), activation: spec.activation)
                for (i, t) in disp.tokens.enumerated() {
                    let wt = disp.weights[i]
                    for j in 0..<spec.dModel { y.data[t * spec.dModel + j] += wt * ye.data[i * spec.dModel + j] }
                }
            }
            try cw.write(layer: config.name, index: l, hiddenStates: x, routerLogits: routing.logits, output: y)
            truths.append(truth)
        }
        try w.commit()
        try cw.commit()
        return truths
    }

    /// Reads the planted truth stored in a synthetic checkpoint (nil when the layer has none).
    public static func readPlanted(_ model: CheckpointReader, layer name: String) throws -> PlantedLayer? {
        let g = try model.layerGroup(name)
        guard g.isDataset("planted/family") else { return nil }
        let c = try model.config(name)
        let fam = try g.openDataset("planted/family").readInts()
        let perm = try g.openDataset("planted/permutation").readInts()
        let counts = try g.openDataset("planted/counts").readInts()
        return PlantedLayer(name: name, family: fam,
                            permutation: (0..<c.numExperts).map { Array(perm[($0 * c.dFF)..<(($0 + 1) * c.dFF)]) },
                            counts: counts)
    }
}
