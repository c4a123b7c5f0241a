import Foundation

extension LowRankStage {
    /// The whitened spectra of the selected matrices of every stored expert of `layer`, in the
    /// order (matrix, expert) that `compressLayer` factors them, with their `LowRankOptions.rankKey`.
    /// up/gate are whitened with the routed layer inputs, down with the hidden activations of the
    /// layer as given (dense up/gate: an estimate of what `compressLayer` sees after factoring
    /// them). An expert no token reached is measured by its weights.
    ///
    /// A matrix W [out, in] with fewer outputs than inputs (down when d_ff > d_model) is measured
    /// through its output Gram P = W·(G + λI)·Wᵀ [out, out] (`outputGram`, ALGORITHM.md §4.1, the
    /// λ of `Whitening`): P = A·Aᵀ for the whitened A = W·L, so A's singular values are the square
    /// roots of P's eigenvalues (`symmetricEigenvalues`, clamped at 0), largest first, out =
    /// min(out, in) of them, as many as the input Gram route's. No in × in Gram, Cholesky factor or
    /// W·L is formed (at d_ff = 14336 the hidden Gram alone is 1.6 GB per expert). The other
    /// matrices keep the input Gram route: the SVD of W·L.
    public static func whitenedSpectra(_ layer: MoELayer, options: LowRankOptions, tokens: TokenBlocks) throws
        -> [(key: String, candidate: RankCandidate)] {
        let c = layer.config
        let names = ExpertMatrixName.allCases.filter { options.matrices.contains($0) && (c.expertType == .glu || $0 != .gate) }
        // [out, in] of each matrix: up and gate [d_ff, d_model], down [d_model, d_ff].
        func byOutputGram(_ m: ExpertMatrixName) -> Bool { m == .down ? c.dModel < c.dFF : c.dFF < c.dModel }
        let inputSide = names.filter { !byOutputGram($0) }
        let input = inputSide.contains { $0 != .down } ? try inputGrams(layer, tokens: tokens, hidden: false) : []
        let hidden = inputSide.contains(.down) ? try inputGrams(layer, tokens: tokens, hidden: true) : []
        let source = LayerSource(layer)
        var out: [(String, RankCandidate)] = []
        for m in names {
            for g in 0..<layer.numStored {
                guard let w = layer.experts[g][matrix: m.rawValue]?.dense() else { continue }
                let s: [Double]
                if byOutputGram(m) {
                    precondition(w.rows < w.cols)
                    let og = try outputGram(source, expert: layer.experts[g], stored: g, matrix: w, tokens: tokens, hidden: m == .down,
                                            relativeRidge: options.whiteningRidge)
                    if og.inputEnergy > 0 && og.inputEnergy.isFinite {  // as `Whitening`, which is nil without input energy
                        var p = og.gram
                        s = try symmetricEigenvalues(&p, n: og.n).map { max($0, 0).squareRoot() }
                    } else {
                        s = try w.singularValues().map(Double.init)
                    }
                } else {
                    let wh = try Whitening(m == .down ? hidden[g] : input[g], relativeRidge: options.whiteningRidge)
                    s = try (wh?.whiten(w) ?? w).singularValues().map(Double.init)
                }
                out.append((LowRankOptions.rankKey(m, expert: g), RankCandidate(rows: w.rows, cols: w.cols, singularValues: s)))
            }
        }
        return out
    }
}
