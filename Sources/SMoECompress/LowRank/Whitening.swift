import CLinAlg
import Foundation

/// What the low-rank part U·V of a factored matrix minimises (ALGORITHM.md §4.1).
public enum LowRankObjective: String, Sendable, CaseIterable {
    /// ‖W − U·V‖_F: the truncated SVD of W.
    case weight
    /// ‖(W − U·V)·X‖_F over the matrix's routed inputs X weighted by routing weight: the truncated
    /// SVD of the whitened W·L (L the Cholesky factor of X·Xᵀ plus a ridge), un-whitened.
    case output
}

/// The weighted Gram Σ_t p_t²·x_t·x_tᵀ [n, n] (float64) of one stored expert's matrix inputs: the
/// tokens routed to it, p_t its routing weight (the layer output holds p_t·E(x_t), so a matrix
/// error's share of the squared output error is weighted by p_t²). Where the routing weight scales
/// the expert input (topk_sigmoid_input) the expert runs on p_t·x_t and its output enters with
/// weight 1, so the Gram is Σ_t (p_t·x_t)(p_t·x_t)ᵀ (`MoELayer.expertInput`): the same for up/gate,
/// but down's hidden inputs are those of the scaled rows.
public struct InputGram: Sendable, Equatable {
    public var n: Int
    public var gram: [Double]
    public var tokens: Int

    public init(n: Int, gram: [Double], tokens: Int) {
        precondition(gram.count == n * n)
        self.n = n
        self.gram = gram
        self.tokens = tokens
    }

    /// ‖X_j‖ = √G_jj: the input column norms the sparse part is ranked with.
    public var columnNorms: [Float] { (0..<n).map { Float(max(gram[$0 * n + $0], 0).squareRoot()) } }
}

/// The whitening of one matrix's inputs: L lower triangular with L·Lᵀ = G + λ·I, where
/// λ = `relativeRidge` × mean(diag G). Then ‖ΔW·X‖² + λ‖ΔW‖²_F = ‖ΔW·L‖²_F for every ΔW, so the
/// rank-r truncated SVD of W·L, multiplied back by L⁻¹, is the exact minimiser of that objective
/// (Eckart–Young on the whitened matrix).
public struct Whitening: Sendable {
    public let n: Int
    /// L, row-major [n, n], float64 (zero above the diagonal).
    public let factor: [Double]
    /// The absolute ridge λ added to the diagonal.
    public let ridge: Double

    /// The default relative ridge (ALGORITHM.md §4.1): 1e-2 of the mean input energy. It keeps L
    /// invertible when an expert saw fewer tokens than it has input features (the Gram of down's
    /// d_ff hidden features often is rank-deficient) and limits L's condition number, so the
    /// float32 triangular solve V·L⁻¹ stays accurate, while leaving the objective dominated by
    /// the output error. On the trained fixtures (merge 4 + rank 16/32, held-out tokens) 1e-3,
    /// 1e-2 and 1e-1 gave mean layer errors within 0.5% of each other (ALGORITHM.md §4.1), so the
    /// value is not tuned to them.
    public static let defaultRelativeRidge = 1e-2

    /// Whitening of `gram`; nil when the Gram holds no energy (an expert no token reached): the
    /// output objective then says nothing about the matrix, and it is factored by weight.
    /// The Gram's storage becomes the factor's (no second n² copy: down's Gram is 1.6 GB at
    /// d_ff = 14336), so pass a Gram no one else holds.
    public init?(_ gram: consuming InputGram, relativeRidge: Double = Whitening.defaultRelativeRidge) throws {
        let n = gram.n
        var a: [Double] = []
        swap(&a, &gram.gram)
        let diagonal = (0..<n).map { a[$0 * n + $0] }
        let meanDiag = diagonal.reduce(0.0, +) / Double(max(n, 1))
        guard n > 0, meanDiag > 0, meanDiag.isFinite else { return nil }
        let lambda = relativeRidge * meanDiag
        for i in 0..<n { a[i * n + i] += lambda }
        // In place, without LAPACKE's transposed copy.
        var info = SymmetricSolver.choleskyLowerInPlace(&a, n: n)
        var ridge = lambda
        // Not numerically positive definite (a zero ridge on a rank-deficient Gram): retry with
        // the smallest ridge that float64 Cholesky accepts reliably, 1e-10 of the mean diagonal,
        // on the Gram rebuilt from the triangle the factorisation left alone.
        if info > 0 {
            ridge = max(lambda, 1e-10 * meanDiag)
            SymmetricSolver.restoreLower(&a, n: n, diagonal: diagonal.map { $0 + ridge })
            info = SymmetricSolver.choleskyLowerInPlace(&a, n: n)
        }
        if info != 0 { throw LinearAlgebraError.lapack(routine: "dpotrf", info: info) }
        for i in 0..<n { for j in (i + 1)..<max(n, i + 1) { a[i * n + j] = 0 } }
        self.n = n
        self.factor = a
        self.ridge = ridge
    }

    /// L as a float32 matrix.
    var lowerMatrix: Matrix { Matrix(rows: n, cols: n, data: factor.map { Float($0) }) }

    /// W·L for W [out, n]: a triangular product (BLAS `strmm`, half the work of a full one).
    public func whiten(_ w: Matrix) -> Matrix {
        precondition(w.cols == n)
        var out = w
        if w.rows == 0 || n == 0 { return out }
        let l = lowerMatrix
        l.data.withUnsafeBufferPointer { pl in
            out.data.withUnsafeMutableBufferPointer { po in
                cblas_strmm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, Int32(w.rows), Int32(n), 1,
                            pl.baseAddress, Int32(n), po.baseAddress, Int32(n))
            }
        }
        return out
    }

    /// V·L⁻¹ for V [r, n]: the triangular solve X·L = V (BLAS `dtrsm`, float64), never an inverse.
    public func unwhiten(_ v: Matrix) -> Matrix {
        precondition(v.cols == n)
        if v.rows == 0 || n == 0 { return v }
        var b = v.data.map(Double.init)
        factor.withUnsafeBufferPointer { pl in
            b.withUnsafeMutableBufferPointer { pb in
                cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, Int32(v.rows), Int32(n), 1,
                            pl.baseAddress, Int32(n), pb.baseAddress, Int32(n))
            }
        }
        return Matrix(rows: v.rows, cols: n, data: b.map { Float($0) })
    }
}

/// The output Gram of one matrix W [out, in] for the whitened factoring without the input Gram
/// (ALGORITHM.md §4.1, "output Gram"): P = W·(G + λ·I)·Wᵀ [out, out] = Σ_t y_t·y_tᵀ + λ·W·Wᵀ,
/// y_t = p_t·W·x_t the matrix's output on its routed inputs weighted as `InputGram` weights them,
/// λ = relative ridge × mean(diag G) with mean(diag G) = Σ_t p_t²‖x_t‖²/in. With A = W·L
/// (L·Lᵀ = G + λI) it is A·Aᵀ, so its eigenpairs (λ_i = σ_i², u_i) are the whitened SVD's left
/// side: U_r·U_rᵀ·W is the whitened rank-r optimum, and tr P = ‖W·L‖²_F. Float64, accumulated
/// block by block (BLAS `dsyrk`), full symmetric row-major; no in × in matrix is formed.
public struct OutputGram: Sendable {
    /// out.
    public var n: Int
    /// P, row-major [n, n], both triangles.
    public var gram: [Double]
    /// tr P = ‖W·L‖²_F (float64 sum of P's diagonal).
    public var trace: Double
    /// The absolute ridge λ.
    public var ridge: Double
    /// √G_jj over the inputs (the sparse ranking's norms; the report's `activation_aware`).
    public var columnNorms: [Float]
    /// Σ_t p_t²‖x_t‖² = tr G: zero for an expert no token reached (no output objective then).
    public var inputEnergy: Double
    public var tokens: Int
}
