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
        try tokens { x in
            let disp = layer.dispatch(layer.route(x))[g]
            guard !disp.tokens.isEmpty else { return }
            // The inputs as the forward pass runs the expert on them: where the routing weight
            // scales the expert input (topk_sigmoid_input) the rows are p_t·x_t with weight 1,
            // else x_t with weight p_t (the same rows and weights as before for those routers).
            let (xg, weights) = MoELayer.expertInput(x, disp, config: layer.config)
            let input = hidden ? expert.hidden(xg, activation: layer.config.activation) : xg
            count += disp.tokens.count
            accumulateWeightedCross(input, input, weights: weights.map { $0 * $0 }, into: &gram)
        }
        return InputGram(n: n, gram: gram, tokens: count)
    }
}
