import Foundation

/// The peak memory a stage is predicted to need on one layer (docs/ALGORITHM.md, "Scale: time
/// and memory"), and the calibration block size that fits a budget. The terms follow what the
/// code holds at its peak; the constants were checked with `smoe-bench scale` at the
/// Mixtral-8x7B shape and at 1/16 of it (figures in docs/ALGORITHM.md).
public enum MemoryModel {
    /// What a stage does to a layer, as far as memory goes.
    public enum Work: Sendable, Equatable {
        /// `stats`: one block of activations; the whole layer too when a similarity reads the
        /// experts (weight, expert-output).
        case statistics(readsExperts: Bool)
        /// `align` with `workers` experts aligned at once (`.pairs`: one per core; `.blas`: 1): the
        /// reference, and per worker an expert and its cost matrix.
        case alignment(workers: Int)
        /// `merge` and `compress`: into `groups` experts, the largest group holding
        /// `largestGroup` stored experts (nil: the worst case E − G + 1), output-aware (RegMean)
        /// or by frequency, and factored after (`compress --rank`; `largeGram` as for `lowRank`).
        case merge(groups: Int, largestGroup: Int?, outputAware: Bool, lowRank: Bool, largeGram: Bool = true)
        /// `lowrank`: the experts read one at a time (`streams`: output objective or no tokens) or
        /// the layer whole; the factors it keeps, of at most `rank` per matrix plus a `sparsity`
        /// fraction of sparse entries (rank nil: as large as the layer); one matrix's whitening
        /// and SVD. `largeGram`: some whitened matrix is factored through the Gram of inputs on
        /// the larger side (down's d_ff² when d_ff > d_model: `--svd exact` or a sparse part);
        /// false when the output Gram takes those matrices or nothing is whitened
        /// (`LowRankOptions.needsLargeGram`).
        case lowRank(streams: Bool, rank: Int?, sparsity: Double, largeGram: Bool = true)
    }

    /// The process itself (code, libraries, buffers).
    public static let base = 100 << 20

    /// Predicted peak resident bytes for `work` on layer `c` with `blockSize` tokens per block.
    ///
    /// With e the bytes of one expert in float32 (3·d·f·4 for GLU), L = E·e, X = block·(d + f)·4:
    /// - statistics: X (+ 1.3·L reading the experts);
    /// - alignment: e + w·(e + max(4·f², 2·d·f·4)) with w workers (an expert, then the larger of
    ///   its cost matrix and the two transposed downs of the cosine), or 2·e while writing (an
    ///   expert read and its permuted copy), whichever is larger; no calibration block;
    /// - merge: the G − 1 experts merged before the last group, the last group's m members and
    ///   one more expert (the permuted copy of a member while aligning, or the frequency-weighted
    ///   prior of RegMean's ridge), plus the larger of aligning's cost matrix 4·f² and RegMean's
    ///   one streamed system 8·(f² + 2·d·f) (the down system and the member's down in float64),
    ///   plus X; output-aware, X is block·(d + 3·f)·4 + min(block, 1024)·(16·f + 8·d) (a
    ///   member's up, gate and hidden activations on its tokens, and the float64 copies of
    ///   `float64ChunkRows` of them); with low rank, at least the G merged experts and one
    ///   matrix's whitening and SVD, W_f (below). compress rounds the merged layer to the
    ///   output float type in place (`MoELayer.roundForStorage`), so no second copy of the G
    ///   merged experts is held (issue 24: that copy made a 64-expert DeepSeek-V3 layer peak at
    ///   64·e, 11.09 GiB, against 40·e predicted); its evaluation pass then holds the G merged
    ///   experts, one original expert and a block, (G + 1)·e + X, which the merge term
    ///   (G + m)·e + X′ ≥ (G + 1)·e + X′ covers;
    /// - lowrank: e (streaming) or L, plus the factors F = min(L, E·Σ_m((out + in)·r·4 +
    ///   s·out·in·8)), plus W_f + X.
    /// With GLU experts the W_f term counts twice: up and gate are factored side by side.
    /// W_f, one matrix's whitening and factoring, with p = min(d, f), q = max(d, f): with a large
    /// Gram, 12·q² + 12·d·f (the q² float64 input Gram factored in place into L and L's float32
    /// copy for `strmm`, and d × f float32 matrices: W·L, the SVD's side, the residual); without,
    /// 32·p² + 16·d·f: at most two p² float64 matrices (the smaller side's input Gram or factor,
    /// or the output Gram P, beside the SVD's Gram or the eigensolver's copy of P), the
    /// eigenvectors and factor copies of rank ≤ p (float64 and float32, ≤ 16·p²), and four d × f
    /// float32 matrices (W·L or V, the exact SVD's copy and left side, the residual W − U·V).
    public static func peakBytes(_ work: Work, layer c: LayerConfig, blockSize: Int) -> Int {
        let d = Double(c.dModel), f = Double(c.dFF), experts = Double(c.numExperts)
        let e = (c.expertType == .glu ? 3 : 2) * d * f * 4
        let layer = experts * e
        let block = Double(blockSize) * (d + f) * 4
        // GLU's up and gate are factored side by side (`LowRankStage.compressLayer`): two at once.
        let concurrent: Double = c.expertType == .glu ? 2 : 1
        func lowRankWork(_ largeGram: Bool) -> Double {
            concurrent * (largeGram ? 12 * max(d, f) * max(d, f) + 12 * d * f : 32 * min(d, f) * min(d, f) + 16 * d * f)
        }
        let bytes: Double
        switch work {
        case .statistics(let readsExperts): bytes = (readsExperts ? 1.3 * layer : 0) + block
        case .alignment(let workers):
            let w = Double(max(1, min(workers, c.numExperts - 1)))
            bytes = max(e + w * (e + max(4 * f * f, 8 * d * f)), 2 * e)
        case .merge(let groups, let largest, let outputAware, let lowRank, let largeGram):
            let g = Double(min(max(groups, 1), c.numExperts))
            let m = Double(largest ?? (c.numExperts - Int(g) + 1))
            let solve = outputAware ? max(4 * f * f, 8 * (f * f + 2 * d * f)) : 4 * f * f
            let chunk = Double(min(blockSize, float64ChunkRows))
            let tokens = outputAware ? Double(blockSize) * (d + 3 * f) * 4 + chunk * (16 * f + 8 * d) : block
            let merging = (g - 1) * e + m * e + e + solve + tokens
            bytes = lowRank ? max(merging, g * e + lowRankWork(largeGram) + block) : merging
        case .lowRank(let streams, let rank, let sparsity, let largeGram):
            let shapes = c.expertType == .glu ? 3.0 : 2.0
            let factors = rank.map { experts * shapes * ((d + f) * Double($0) * 4 + sparsity * d * f * 8) } ?? layer
            bytes = (streams ? e : layer) + min(layer, factors) + lowRankWork(largeGram) + block
        }
        return base + Int(min(bytes, 9e18))
    }

    /// The largest block size, at most `requested`, whose predicted peak fits `budget` on every
    /// layer of `work` (each with its own `Work`); throws, naming the smallest budget that would
    /// work (with one token per block) and the layer that needs it, when none does.
    public static func blockSize(_ work: [(layer: LayerConfig, work: Work)], budget: Int, requested: Int) throws -> Int {
        var block = requested
        for (c, w) in work {
            let least = peakBytes(w, layer: c, blockSize: 1)
            guard least <= budget else {
                throw SMoEError.setting(.maxMemory, "\(gib(budget)) is too little: layer \(c.name) needs at least \(gib(least)) (predicted peak of this stage on a \(c.numExperts) × \(c.dModel) × \(c.dFF) layer, docs/ALGORITHM.md \"Scale\")")
            }
            // The predicted peak grows with the block (not always linearly: RegMean's float64
            // copies stop growing at `float64ChunkRows`), so the largest block that fits is found
            // by bisection between 1 (fits) and the block asked for.
            guard peakBytes(w, layer: c, blockSize: block) > budget else { continue }
            var (fits, over) = (1, block)
            while over - fits > 1 {
                let mid = fits + (over - fits) / 2
                if peakBytes(w, layer: c, blockSize: mid) <= budget { fits = mid } else { over = mid }
            }
            block = fits
        }
        return block
    }

    /// `blockSize` with one `work` for every layer of `names` (nil: all) of `model`.
    public static func blockSize(_ work: Work, model: CheckpointReader, layers names: [String]?, budget: Int,
                                 requested: Int) throws -> Int {
        let selected = try model.selectLayers(names)
        return try blockSize(model.layers.filter { selected.contains($0.name) }.map { ($0, work) }, budget: budget, requested: requested)
    }

    static func gib(_ b: Int) -> String { String(format: "%.2f GiB", Double(b) / 1_073_741_824) }
}
