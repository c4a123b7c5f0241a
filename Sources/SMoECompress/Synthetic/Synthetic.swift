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
    }
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

    /// One planted layer, its calibration inputs and ground truth.
    public static func makeLayer(_ spec: SyntheticSpec, index l: Int) -> (layer: MoELayer, x: Matrix, truth: PlantedLayer) {
        var rng = SplitMix64(seed: spec.seed &+ UInt64(l) &* 0x9E37_79B9)
        let E = spec.numExperts, P = spec.families, d = spec.dModel, f = spec.dFF
        // Family of each slot: every family gets at least one slot, the rest at random, then shuffled.
        var family = (0..<E).map { $0 < P ? $0 : rng.nextInt(below: P) }
        let shuffle = rng.permutation(E)
        family = shuffle.map { family[$0] }
        // Prototypes.
        let upScale = 1 / Float(d).squareRoot(), downScale = 1 / Float(f).squareRoot()
        let protoUp = (0..<P).map { _ in gaussian(f, d, upScale, &rng) }
        let protoGate = (0..<P).map { _ in gaussian(f, d, upScale, &rng) }
        let protoDown = (0..<P).map { _ in gaussian(d, f, downScale, &rng) }
        var experts: [Expert] = []
        var perms: [[Int]] = []
        for e in 0..<E {
            let p = family[e]
            let perm = rng.permutation(f)
            perms.append(perm)
            var up = protoUp[p].gatherRows(perm)
            up.addScaled(gaussian(f, d, upScale * spec.noise, &rng), 1)
            var down = protoDown[p].gatherColumns(perm)
            down.addScaled(gaussian(d, f, downScale * spec.noise, &rng), 1)
            var gate: Matrix? = nil
            if spec.expertType == .glu {
                var g = protoGate[p].gatherRows(perm)
                g.addScaled(gaussian(f, d, upScale * spec.noise, &rng), 1)
                gate = g
            }
            experts.append(Expert(up: up, gate: gate, down: down))
        }
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
        let config = LayerConfig(
            name: layerName(spec, l), index: l, numExperts: E, topK: spec.topK, dModel: d, dFF: f,
            expertType: spec.expertType, activation: spec.activation, routerType: spec.routerType)
        let layer = MoELayer(config: config, router: router, experts: experts)
        // Planted usage by a direct per-token loop (ties to the lower slot).
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
        return (layer, x, PlantedLayer(name: config.name, family: family, permutation: perms, counts: counts))
    }

    /// Writes the checkpoint and its calibration file; returns the planted truth per layer.
    @discardableResult
    public static func write(_ spec: SyntheticSpec, model: String, calibration: String) throws -> [PlantedLayer] {
        try spec.validate()
        let entry: JSONValue = [
            "stage": "synth", "seed": .int(Int(truncatingIfNeeded: spec.seed)), "layers": .int(spec.numLayers),
            "experts": .int(spec.numExperts), "families": .int(spec.families), "top_k": .int(spec.topK),
            "d_model": .int(spec.dModel), "d_ff": .int(spec.dFF), "expert_type": .string(spec.expertType.rawValue),
            "noise": .double(Double("\(spec.noise)") ?? Double(spec.noise)), "tokens": .int(spec.tokens),
        ]
        let w = try CheckpointWriter(destination: model, architecture: spec.architecture, history: [], entry: entry)
        let cw = try CalibrationWriter(destination: calibration, source: "smoe-compress synth: " + entry.serialized())
        // A small dense part so /dense copying is exercised.
        var rng = SplitMix64(seed: spec.seed ^ 0xD15E)
        try w.root.write("dense/embed_tokens.weight", floats: gaussian(64, spec.dModel, 0.1, &rng).data, shape: [64, spec.dModel])
        try w.root.write("dense/norm.weight", floats: [Float](repeating: 1, count: spec.dModel), shape: [spec.dModel])
        var truths: [PlantedLayer] = []
        for l in 0..<spec.numLayers {
            let (layer, x, truth) = makeLayer(spec, index: l)
            let g = try w.write(layer)
            try g.write("planted/family", ints: truth.family, shape: [spec.numExperts], as: .i32)
            try g.write("planted/permutation", ints: truth.permutation.flatMap { $0 }, shape: [spec.numExperts, spec.dFF], as: .i32)
            try g.write("planted/counts", ints: truth.counts, shape: [spec.numExperts], as: .i64)
            try g.setAttribute("planted_families", spec.families)
            try g.setAttribute("planted_noise", Double(spec.noise))
            let routing = layer.route(x)
            try cw.write(layer: layer.name, index: l, hiddenStates: x, routerLogits: routing.logits,
                         output: layer.forward(x, routing: routing))
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
