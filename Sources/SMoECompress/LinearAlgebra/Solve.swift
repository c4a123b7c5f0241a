import CLinAlg

/// Symmetric positive (semi-)definite solves in float64 through LAPACK. Never forms an inverse.
public enum SymmetricSolver {
    /// How a system was solved.
    public enum Method: String, Sendable {
        case cholesky
        /// Cholesky failed (not numerically positive definite): minimum-norm least squares (dgelsd).
        case leastSquares = "lstsq"
    }

    /// Solves A·X = B for X, A symmetric n×n (row-major), B n×m (row-major). Tries Cholesky
    /// (dposv) first; when A is not numerically positive definite falls back to an SVD-based
    /// least-squares solve (dgelsd) with a relative singular value cut-off `rcond`.
    public static func solve(_ a: [Double], _ b: [Double], n: Int, m: Int, rcond: Double = 1e-10) throws -> (x: [Double], method: Method) {
        precondition(a.count == n * n && b.count == n * m)
        if n == 0 || m == 0 { return (b, .cholesky) }
        guard a.allSatisfy({ $0.isFinite }), b.allSatisfy({ $0.isFinite }) else {
            throw LinearAlgebraError.nonFinite("system matrix")
        }
        var a1 = a, b1 = b
        let info = LAPACKE_dposv(LAPACK_ROW_MAJOR, CChar(UInt8(ascii: "U")), Int32(n), Int32(m), &a1, Int32(n), &b1, Int32(m))
        if info == 0 { return (b1, .cholesky) }
        if info < 0 { throw LinearAlgebraError.lapack(routine: "dposv", info: info) }
        var a2 = a, b2 = b
        var s = [Double](repeating: 0, count: n)
        var rank: Int32 = 0
        let info2 = LAPACKE_dgelsd(LAPACK_ROW_MAJOR, Int32(n), Int32(n), Int32(m), &a2, Int32(n), &b2, Int32(m), &s, rcond, &rank)
        if info2 != 0 { throw LinearAlgebraError.lapack(routine: "dgelsd", info: info2) }
        return (b2, .leastSquares)
    }
}

/// Float64 accumulation of `A += Xᵀ · diag(w) · Y` for token blocks (X [n, p], Y [n, q]),
/// through BLAS dgemm on a weighted copy.
public func accumulateWeightedCross(_ x: Matrix, _ y: Matrix, weights: [Float]?, into a: inout [Double]) {
    precondition(x.rows == y.rows && a.count == x.cols * y.cols)
    let n = x.rows, p = x.cols, q = y.cols
    if n == 0 { return }
    var xd = [Double](repeating: 0, count: n * p)
    for t in 0..<n {
        let w = Double(weights?[t] ?? 1)
        for j in 0..<p { xd[t * p + j] = w * Double(x.data[t * p + j]) }
    }
    let yd = y.data.map(Double.init)
    BLAS.dgemmAccumulate(m: p, n: q, k: n, a: xd, transA: true, lda: p, b: yd, transB: false, ldb: q, into: &a)
}
