import Foundation

/// The input Grams the whitened (output-objective) factoring needs.
extension LowRankStage {
    /// Per stored expert, the weighted Gram of the inputs of up/gate (the layer input x) or, with
    /// `hidden`, of down (the intermediate activation h computed by the layer's own up/gate, so
    /// already factored ones when the caller factored them first), over the tokens the layer
    /// routes to it. An expert shared by several slots gets the tokens of all of them. Where the
    /// routing weight scales the expert input, the inputs are the scaled rows (`MoELayer.expertInput`).
    public static func inputGrams(_ layer: MoELayer, tokens: TokenBlocks, hidden: Bool) throws -> [InputGram] {
        try (0..<layer.numStored).map { try inputGram(layer, expert: $0, tokens: tokens, hidden: hidden) }
    }

    /// `inputGrams` of stored expert `g` alone (one token pass; the same sums in the same order).
    public static func inputGram(_ layer: MoELayer, expert g: Int, tokens: TokenBlocks, hidden: Bool) throws -> InputGram {
        try inputGram(LayerSource(layer), expert: layer.experts[g], stored: g, tokens: tokens, hidden: hidden)
    }

    /// The Gram of `expert` (stored expert `g` of `layer`, as it stands) over the tokens the
    /// layer routes to it.
    static func inputGram(_ layer: LayerSource, expert: Expert, stored g: Int, tokens: TokenBlocks, hidden: Bool) throws -> InputGram {
        let n = hidden ? layer.config.dFF : layer.config.dModel
        var gram = [Double](repeating: 0, count: n * n)
        var count = 0
        try MoELayer.forEachRoutedInput(layer, expert: expert, stored: g, tokens: tokens, hidden: hidden) { input, weights in
            count += input.rows
            accumulateWeightedCross(input, input, weights: weights.map { $0 * $0 }, into: &gram)
        }
        return InputGram(n: n, gram: gram, tokens: count)
    }
}

extension LowRankStage {
    /// The output Gram (`OutputGram`) of `w`, the matrix of `expert` (stored expert `g` of
    /// `layer`) that reads the layer input or, with `hidden`, the hidden activation, over the
    /// tokens the layer routes to it: the same token pass, inputs and weights as `inputGram`
    /// (`MoELayer.forEachRoutedInput`, so input-scaling routers see their scaled rows), accumulated block
    /// by block by `OutputGramAccumulator`.
    static func outputGram(_ layer: LayerSource, expert: Expert, stored g: Int, matrix w: Matrix, tokens: TokenBlocks,
                           hidden: Bool, relativeRidge: Double) throws -> OutputGram {
        precondition(w.cols == (hidden ? layer.config.dFF : layer.config.dModel))
        var acc = OutputGramAccumulator(matrix: w)
        try MoELayer.forEachRoutedInput(layer, expert: expert, stored: g, tokens: tokens, hidden: hidden) { input, weights in
            acc.add(input, weights: weights)
        }
        return acc.finish(relativeRidge: relativeRidge)
    }
}

/// Builds the `OutputGram` of W [out, in] from blocks of its inputs: per block only the outputs
/// Y = X·Wᵀ [T, out] (one `sgemm`) go into a float64 [out, out] accumulator (`dsyrk` on float64
/// copies of 512 rows at a time, row t scaled by its weight p_t), and the inputs' squared column
/// norms into [in] float64 sums; `finish` adds λ·W·Wᵀ (`dsyrk` over column chunks of W).
/// 2·T·in·out + T·out² + out²·in flops in all, against the input Gram's T·in² (or 2·T·in² by
/// `dgemm`), its in³/3 Cholesky factor, 2·out·in² whitening product and r·in² triangular solve.
public struct OutputGramAccumulator {
    public let w: Matrix
    var p: [Double]
    var colSq: [Double]
    var tokens = 0

    public init(matrix w: Matrix) {
        self.w = w
        p = [Double](repeating: 0, count: w.rows * w.rows)
        colSq = [Double](repeating: 0, count: w.cols)
    }

    /// Adds the rows of `inputs` [T, in] with routing weights p_t (`weights` [T]).
    public mutating func add(_ inputs: Matrix, weights: [Float]) {
        let inn = w.cols
        precondition(inputs.cols == inn && weights.count == inputs.rows)
        guard inputs.rows > 0 else { return }
        tokens += inputs.rows
        inputs.data.withUnsafeBufferPointer { px in
            for t in 0..<inputs.rows {
                let s = Double(weights[t]) * Double(weights[t])
                for j in 0..<inn { let v = Double(px[t * inn + j]); colSq[j] += s * v * v }
            }
        }
        // Y's rows scaled by p_t inside the float64 copies: Σ_t p_t²·(W·x_t)(W·x_t)ᵀ.
        accumulateGramFloat64(BLAS.matmul(inputs, w, transB: true), rowScales: weights, into: &p)
    }

    /// P with the ridge λ = `relativeRidge` × mean(diag G) (none without input energy), both
    /// triangles filled.
    public consuming func finish(relativeRidge: Double) -> OutputGram {
        let out = w.rows, inn = w.cols
        let energy = colSq.reduce(0, +)
        let meanDiag = energy / Double(max(inn, 1))
        // As `Whitening`: λ relative to the mean input energy (mean(diag G) = Σ_t p_t²‖x_t‖²/in).
        let ridge = meanDiag > 0 && meanDiag.isFinite ? relativeRidge * meanDiag : 0
        if ridge > 0 { accumulateGramFloat64(w, columns: true, alpha: ridge, into: &p) }
        var trace = 0.0
        for i in 0..<out {
            trace += p[i * out + i]
            for j in 0..<i { p[i * out + j] = p[j * out + i] }
        }
        return OutputGram(n: out, gram: p, trace: trace, ridge: ridge, columnNorms: colSq.map { Float($0.squareRoot()) },
                          inputEnergy: energy, tokens: tokens)
    }
}
