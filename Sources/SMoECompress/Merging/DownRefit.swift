/// The weighted ridge least-squares refit of an expert's `down` (and down bias), shared by
/// regmean+refit (ALGORITHM.md §3b) and the expert refit of a compact layer (§3a):
/// A = Σ s h* h*ᵀ, B = Σ h* tᵀ over token blocks (h* the expert's intermediate activation with a
/// 1 appended when the layer has a down bias, t the weighted target, float64 through BLAS), then
/// (A + λ I) [down*ᵀ; b*] = B + λ [down₀ᵀ; b₀] with λ = ridge · mean(diag A): the ridge pulls
/// towards the current down and bias, not towards zero.
extension OutputAwareMerge.RefitStats {
    /// Empty accumulators for `f` intermediate features (plus the bias row when `bias`) and
    /// `d` outputs.
    init(features f: Int, outputs d: Int, bias: Bool) {
        let fa = f + (bias ? 1 : 0)
        self.init(a: .init(repeating: 0, count: fa * fa), b: .init(repeating: 0, count: fa * d))
    }

    /// Adds a token block: intermediate activations `h` [n, f], weighted targets [n, d] and
    /// the weights s of A.
    mutating func add(hidden h: Matrix, target: Matrix, weights s: [Float], bias: Bool) {
        let n = h.rows
        let hb = bias ? Matrix.hstack([h, Matrix(rows: n, cols: 1, repeating: 1)]) : h
        tokens += n
        accumulateWeightedCross(hb, hb, weights: s, into: &a)
        accumulateWeightedCross(hb, target, weights: nil, into: &b)
    }

    /// Solves the ridge system and replaces `expert`'s down (and its bias, when `bias`); returns
    /// how the system was solved. The accumulators are solved in place (no copy of a system of
    /// (d_ff + 1)² float64) and emptied.
    mutating func solve(into expert: inout Expert, bias hasBias: Bool, ridge: Double) throws -> (method: SymmetricSolver.Method, conditionEstimate: Double) {
        var a: [Double] = [], b: [Double] = []
        swap(&a, &self.a)
        swap(&b, &self.b)
        let d0 = expert.down.dense()  // [d, f]
        let d = d0.rows, f = d0.cols, fa = f + (hasBias ? 1 : 0)
        precondition(a.count == fa * fa && b.count == fa * d)
        var meanDiag = 0.0
        for i in 0..<fa { meanDiag += a[i * fa + i] }
        meanDiag /= Double(fa)
        let lambda = ridge * meanDiag + (meanDiag == 0 ? 1e-12 : 0)
        for i in 0..<fa { a[i * fa + i] += lambda }
        for i in 0..<f { for j in 0..<d { b[i * d + j] += lambda * Double(d0.data[j * f + i]) } }
        if hasBias, let b0 = expert.downBias { for j in 0..<d { b[f * d + j] += lambda * Double(b0[j]) } }
        let (method, estimate) = try SymmetricSolver.solveInPlace(&a, &b, n: fa, m: d)  // b: [fa, d] = down*ᵀ (+ bias row)
        let y = b
        var down = Matrix(rows: d, cols: f)
        for i in 0..<f { for j in 0..<d { down.data[j * f + i] = Float(y[i * d + j]) } }
        expert.down = .dense(down)
        if hasBias { expert.downBias = (0..<d).map { Float(y[f * d + $0]) } }
        return (method, estimate)
    }
}
