import Foundation

/// Accumulates a layer's statistics over token blocks in one streaming pass (memory independent
/// of the number of tokens). Feed blocks with `add`, then call `finish`.
///
/// Tokens are processed in fixed chunks of `chunkRows` consecutive tokens aligned to the start
/// of the stream (the remainder of a block waits for the next one), so every float32 product
/// (router logits, expert forwards) sees the same shapes whatever the callers' block sizes, and
/// the results are bitwise independent of how the tokens were split into blocks.
public struct StatisticsAccumulator: Sendable {
    /// Tokens per compute chunk.
    public static let chunkRows = 256

    public let layer: MoELayer
    public let bases: Set<SimilarityBase>
    /// Tokens added so far (including those still waiting in the partial chunk).
    public private(set) var numTokens = 0
    private var counts: [Int]
    /// ZᵀZ [E, E] in float64.
    private var gram: [Double]
    /// Σ x over the tokens routed to each slot, [E, d] in float64.
    private var inputSums: [Double]
    /// Σ y over all tokens for each stored expert, [G, d] in float64.
    private var outputSums: [Double]
    /// Tokens of the current partial chunk, row-major [pending / d, d].
    private var pending: [Float] = []

    public init(layer: MoELayer, bases: Set<SimilarityBase>) {
        self.layer = layer
        self.bases = bases
        let E = layer.config.numExperts, d = layer.config.dModel
        counts = [Int](repeating: 0, count: E)
        gram = bases.contains(.routerLogits) ? [Double](repeating: 0, count: E * E) : []
        inputSums = bases.contains(.feature) ? [Double](repeating: 0, count: E * d) : []
        outputSums = bases.contains(.expertOutput) ? [Double](repeating: 0, count: layer.numStored * d) : []
        pending.reserveCapacity(Self.chunkRows * d)
    }

    /// Adds one block of tokens X [n, d_model] (any n).
    public mutating func add(_ x: Matrix) {
        let d = layer.config.dModel
        precondition(x.cols == d, "token block has \(x.cols) features, layer \(layer.name) has d_model \(d)")
        let chunk = Self.chunkRows
        var s = 0
        if !pending.isEmpty {
            let take = min(chunk - pending.count / d, x.rows)
            pending.append(contentsOf: x.data[0..<(take * d)])
            s = take
            if pending.count == chunk * d {
                process(Matrix(rows: chunk, cols: d, data: pending))
                pending.removeAll(keepingCapacity: true)
            }
        }
        while x.rows - s >= chunk {
            process(x.rowBlock(s, chunk))
            s += chunk
        }
        if s < x.rows { pending.append(contentsOf: x.data[(s * d)...]) }
        numTokens += x.rows
    }

    /// The router logits of one chunk in float32 (as the layer computes them) and its top-k slots.
    private mutating func process(_ x: Matrix) {
        let c = layer.config
        let n = x.rows
        let E = c.numExperts, k = c.topK, d = c.dModel
        let routing = layer.route(x)
        for s in routing.slots { counts[s] += 1 }
        if bases.contains(.routerLogits) {
            // Gram matrix of the logits, float64 accumulation through BLAS.
            let z = routing.logits.data.map(Double.init)
            BLAS.dgemmAccumulate(m: E, n: E, k: n, a: z, transA: true, lda: E, b: z, transB: false, ldb: E, into: &gram)
        }
        if bases.contains(.feature) {
            // Scatter-add of each token's input to its k chosen slots (O(N·k·d), cheaper than
            // the dense indicator product Aᵀ·X), in float64.
            x.data.withUnsafeBufferPointer { px in
                inputSums.withUnsafeMutableBufferPointer { ps in
                    for t in 0..<n {
                        let xr = px.baseAddress! + t * d
                        for r in 0..<k {
                            let sr = ps.baseAddress! + routing.slots[t * k + r] * d
                            for j in 0..<d { sr[j] += Double(xr[j]) }
                        }
                    }
                }
            }
        }
        if bases.contains(.expertOutput) {
            for g in 0..<layer.numStored {
                let y = layer.experts[g].forward(x, activation: c.activation)
                y.data.withUnsafeBufferPointer { py in
                    outputSums.withUnsafeMutableBufferPointer { ps in
                        let sr = ps.baseAddress! + g * d
                        for t in 0..<n {
                            let yr = py.baseAddress! + t * d
                            for j in 0..<d { sr[j] += Double(yr[j]) }
                        }
                    }
                }
            }
        }
    }

    /// Processes the partial chunk (its size, N mod chunkRows, does not depend on the blocks).
    private mutating func flush() {
        let d = layer.config.dModel
        if !pending.isEmpty {
            process(Matrix(rows: pending.count / d, cols: d, data: pending))
            pending.removeAll()
        }
    }

    /// The statistics of every token added so far.
    public func finish() -> LayerStatistics {
        var done = self
        done.flush()
        return done.result()
    }

    private func result() -> LayerStatistics {
        let c = layer.config
        let E = c.numExperts, d = c.dModel
        let hits = Double(numTokens * c.topK)
        let frequency = counts.map { hits > 0 ? Double($0) / hits : 0 }
        var sims: [SimilarityBase: Float64Matrix] = [:]
        var feats: [SimilarityBase: Float64Matrix] = [:]
        if bases.contains(.routerLogits) {
            var s = Statistics.cosine(gram: gram, size: E)
            for i in 0..<s.values.count { s.values[i] = (s.values[i] + 1) / 2 }
            sims[.routerLogits] = s
        }
        if bases.contains(.feature) {
            var means = Float64Matrix(rows: E, cols: d, values: inputSums)
            for e in 0..<E where counts[e] > 0 {
                for j in 0..<d { means[e, j] /= Double(counts[e]) }
            }
            feats[.feature] = means
            // Cosines of the means; a never-chosen slot has a zero row, which `cosine` maps to 0.
            sims[.feature] = Statistics.cosine(rows: means)
        }
        if bases.contains(.weight) {
            sims[.weight] = Statistics.weightSimilarity(layer)
        }
        if bases.contains(.expertOutput) {
            var means = Float64Matrix(rows: E, cols: d)
            for e in 0..<E {
                let g = layer.storedIndex(slot: e)
                for j in 0..<d { means[e, j] = numTokens > 0 ? outputSums[g * d + j] / Double(numTokens) : 0 }
            }
            feats[.expertOutput] = means
            var s = Float64Matrix(rows: E, cols: E)
            for i in 0..<E {
                for j in (i + 1)..<max(E, i + 1) {
                    var q = 0.0
                    for t in 0..<d { let v = means[i, t] - means[j, t]; q += v * v }
                    s[i, j] = -q.squareRoot()
                    s[j, i] = s[i, j]
                }
            }
            sims[.expertOutput] = s
        }
        return LayerStatistics(name: c.name, index: c.index, topK: c.topK, numTokens: numTokens, counts: counts,
                               frequency: frequency, similarity: sims, features: feats)
    }
}

/// Routing statistics of single layers, and the similarity computations behind them.
public enum Statistics {
    /// Statistics of one layer over the calibration capture of the layer of the same name,
    /// streamed in blocks (`tokens`).
    public static func compute(
        layer: MoELayer, calibration: CalibrationReader, bases: Set<SimilarityBase> = [.routerLogits],
        tokens: TokenSettings = TokenSettings(), progress: ProgressCallback? = nil
    ) throws -> LayerStatistics {
        let info = try calibration.info(layer.name)
        guard info.dModel == layer.config.dModel else {
            throw SMoEError.dataset(calibration.path, "/moe_layers/\(layer.name)/hidden_states",
                                    "d_model \(info.dModel) does not match the layer's \(layer.config.dModel)")
        }
        let total = min(info.numTokens, tokens.maxTokens ?? Int.max)
        var acc = StatisticsAccumulator(layer: layer, bases: bases)
        progress?("stats \(layer.name)", 0, total)
        try calibration.forEachBlock(layer.name, blockSize: tokens.blockSize, maxTokens: tokens.maxTokens) { _, x in
            acc.add(x)
            progress?("stats \(layer.name)", acc.numTokens, total)
        }
        return acc.finish()
    }

    /// Statistics of an in-memory layer over the tokens X [N, d_model], in blocks of `blockSize`.
    public static func compute(layer: MoELayer, tokens x: Matrix, bases: Set<SimilarityBase> = [.routerLogits],
                               blockSize: Int = TokenSettings.defaultBlockSize) throws -> LayerStatistics {
        try TokenSettings(blockSize: blockSize).validate()
        // Blocks are cut as they are consumed: one block's copy at a time, not a second copy of X.
        let blocks = stride(from: 0, to: x.rows, by: blockSize).lazy.map { x.rowBlock($0, min(blockSize, x.rows - $0)) }
        return try compute(layer: layer, blocks: blocks, bases: bases)
    }

    /// Statistics of an in-memory layer over any sequence of token blocks [n_i, d_model].
    public static func compute<Blocks: Sequence>(layer: MoELayer, blocks: Blocks,
                                                 bases: Set<SimilarityBase> = [.routerLogits]) throws -> LayerStatistics
    where Blocks.Element == Matrix {
        var acc = StatisticsAccumulator(layer: layer, bases: bases)
        for b in blocks {
            guard b.cols == layer.config.dModel else {
                throw SMoEError("tokens: a block has \(b.cols) features, but layer \(layer.name) has d_model \(layer.config.dModel)", layer: layer.name)
            }
            acc.add(b)
        }
        return acc.finish()
    }

    /// Statistics of every MoE layer of `model` over `calibration`, in layer order, after checking
    /// that the two files describe the same layers (errors name the layer).
    public static func computeAll(
        model: CheckpointReader, calibration: CalibrationReader, bases: Set<SimilarityBase> = [.routerLogits],
        tokens: TokenSettings = TokenSettings(), progress: ProgressCallback? = nil
    ) throws -> [LayerStatistics] {
        let stage = try StatisticsStage(model: model, calibration: calibration, bases: bases, tokens: tokens)
        return try stage.run(model: model, progress: StageProgress(step: progress)) { _ in }.reports
    }

    /// Cosine similarity of the slots' stored experts, each the concatenation of its flattened
    /// matrices (up, gate, down), [E, E]. The G×G Gram matrix is accumulated in float64 through
    /// BLAS dgemm over column chunks of the flattened matrices (bounded extra memory); factored
    /// matrices are densified one matrix kind at a time.
    public static func weightSimilarity(_ layer: MoELayer) -> Float64Matrix {
        let G = layer.numStored, E = layer.config.numExperts
        var gram = [Double](repeating: 0, count: G * G)
        let names = layer.experts.first?.namedMatrices.map(\.name) ?? []
        let width = 1 << 15
        for name in names {
            let mats = layer.experts.map { $0[matrix: name]!.dense() }
            let total = mats.first?.count ?? 0
            var s = 0
            while s < total {
                let w = min(width, total - s)
                var a = [Double](repeating: 0, count: G * w)
                for g in 0..<G {
                    mats[g].data.withUnsafeBufferPointer { src in
                        for j in 0..<w { a[g * w + j] = Double(src[s + j]) }
                    }
                }
                BLAS.dgemmAccumulate(m: G, n: G, k: w, a: a, transA: false, lda: w, b: a, transB: true, ldb: w, into: &gram)
                s += w
            }
        }
        let stored = cosine(gram: gram, size: G)
        var sim = Float64Matrix(rows: E, cols: E)
        for i in 0..<E {
            for j in 0..<E { sim[i, j] = i == j ? 1 : stored[layer.storedIndex(slot: i), layer.storedIndex(slot: j)] }
        }
        return sim
    }

    /// The router logits [N, E] of X [N, d_model] exactly as the statistics pass computes them
    /// (float32, in aligned chunks of `StatisticsAccumulator.chunkRows` tokens).
    public static func logits(layer: MoELayer, tokens x: Matrix) -> Matrix {
        let chunk = StatisticsAccumulator.chunkRows
        var parts: [Matrix] = []
        var s = 0
        while s < x.rows {
            let n = min(chunk, x.rows - s)
            parts.append(layer.logits(x.rowBlock(s, n)))
            s += n
        }
        return parts.isEmpty ? Matrix(rows: 0, cols: layer.config.numExperts) : Matrix.vstack(parts)
    }

    /// Cosines from a Gram matrix [n, n]: G_ij / √(G_ii G_jj), clamped to [-1, 1]; 0 when either
    /// vector is zero; exactly 1 on the diagonal.
    static func cosine(gram: [Double], size n: Int) -> Float64Matrix {
        var s = Float64Matrix(rows: n, cols: n)
        for i in 0..<n {
            for j in 0..<n {
                if i == j { s[i, j] = 1; continue }
                let den = (gram[i * n + i] * gram[j * n + j]).squareRoot()
                s[i, j] = den > 0 ? min(1, max(-1, gram[i * n + j] / den)) : 0
            }
        }
        return s
    }

    /// Cosines between the rows of `m` (Gram through BLAS dgemm), [rows, rows].
    static func cosine(rows m: Float64Matrix) -> Float64Matrix {
        var gram = [Double](repeating: 0, count: m.rows * m.rows)
        BLAS.dgemmAccumulate(m: m.rows, n: m.rows, k: m.cols, a: m.values, transA: false, lda: max(m.cols, 1),
                             b: m.values, transB: true, ldb: max(m.cols, 1), into: &gram)
        return cosine(gram: gram, size: m.rows)
    }
}
