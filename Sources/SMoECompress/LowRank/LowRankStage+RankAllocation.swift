import Foundation

extension LowRankStage {
    /// The whitened spectra of the selected matrices of every stored expert of `layer`, in the
    /// order (matrix, expert) that `compressLayer` factors them, with their `LowRankOptions.rankKey`.
    /// up/gate are whitened with the routed layer inputs, down with the hidden activations of the
    /// layer as given (dense up/gate: an estimate of what `compressLayer` sees after factoring
    /// them). An expert no token reached is measured by its weights.
    public static func whitenedSpectra(_ layer: MoELayer, options: LowRankOptions, tokens: TokenBlocks) throws
        -> [(key: String, candidate: RankCandidate)] {
        let names = ExpertMatrixName.allCases.filter { options.matrices.contains($0) && (layer.config.expertType == .glu || $0 != .gate) }
        let input = try inputGrams(layer, tokens: tokens, hidden: false)
        let hidden = names.contains(.down) ? try inputGrams(layer, tokens: tokens, hidden: true) : []
        var out: [(String, RankCandidate)] = []
        for m in names {
            for g in 0..<layer.numStored {
                guard let w = layer.experts[g][matrix: m.rawValue]?.dense() else { continue }
                let wh = try Whitening(m == .down ? hidden[g] : input[g], relativeRidge: options.whiteningRidge)
                let s = try (wh?.whiten(w) ?? w).singularValues().map(Double.init)
                out.append((LowRankOptions.rankKey(m, expert: g), RankCandidate(rows: w.rows, cols: w.cols, singularValues: s)))
            }
        }
        return out
    }
}
