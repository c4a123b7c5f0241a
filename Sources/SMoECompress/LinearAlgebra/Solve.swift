import CLinAlg

/// Symmetric positive (semi-)definite solves in float64 through LAPACK. Never forms an inverse.
public enum SymmetricSolver {
    /// How a system was solved.
    public enum Method: String, Sendable {
        /// Cholesky factorisation (dpotrf) and triangular solves (dpotrs); the estimated
        /// reciprocal condition number was at least the threshold.
        case cholesky
        /// Cholesky failed (not numerically positive definite) or the system is ill-conditioned
        /// (estimated reciprocal condition number below the threshold): minimum-norm least
        /// squares through the SVD (dgelsd).
        case leastSquares = "lstsq"
    }

    /// Solves A·X = B for X, A symmetric n×n (row-major, lower triangle used by Cholesky),
    /// B n×m (row-major).
    ///
    /// 1. Cholesky: A = L·Lᵀ (dpotrf).
    /// 2. The reciprocal condition number of A in the 1-norm is estimated from the factor
    ///    (dpocon, with ‖A‖₁ computed before factoring).
    /// 3. If the factorisation succeeded and that estimate is at least `rcond` (default 1e-10:
    ///    float64 then loses at most about 10 of its 16 digits, leaving ~1e-6 relative accuracy,
    ///    within an order of magnitude of the float32 weights the result is stored in; dpocon's
    ///    estimate is usually within a small factor of the true 1-norm value), the triangular
    ///    solves (dpotrs) give X and the method is `.cholesky`.
    /// 4. Otherwise (not numerically positive definite, or estimate below `rcond`) the system is
    ///    solved by SVD least squares (dgelsd) with singular values below `rcond`·σ_max treated
    ///    as zero, i.e. the minimum-norm solution of the truncated system, and the method is
    ///    `.leastSquares`.
    ///
    /// `conditionEstimate` is dpocon's estimate (0 when the factorisation failed).
    public static func solve(_ a: [Double], _ b: [Double], n: Int, m: Int, rcond: Double = 1e-10) throws
        -> (x: [Double], method: Method, conditionEstimate: Double) {
        var a = a, x = b
        let (method, estimate) = try solveInPlace(&a, &x, n: n, m: m, rcond: rcond)
        return (x, method, estimate)
    }

    /// `solve` without copies, for systems too large to hold twice (a RegMean system of
    /// d_ff = 14336 is 1.6 GB): `b` is replaced by X, and `a` is overwritten. The row-major
    /// buffer is handed to LAPACK as the column-major matrix it also is (A is symmetric), so
    /// LAPACKE makes no transposed copy: dpotrf's factor L (A = L·Lᵀ) fills the row-major lower
    /// triangle, and two BLAS triangular solves give X. The fallback rebuilds A from the upper
    /// triangle, which the factorisation leaves alone, and the saved diagonal (dgelsd, whose
    /// row-major interface does copy).
    public static func solveInPlace(_ a: inout [Double], _ b: inout [Double], n: Int, m: Int, rcond: Double = 1e-10) throws
        -> (method: Method, conditionEstimate: Double) {
        precondition(a.count == n * n && b.count == n * m)
        if n == 0 || m == 0 { return (.cholesky, 1) }
        guard a.allSatisfy({ $0.isFinite }), b.allSatisfy({ $0.isFinite }) else {
            throw LinearAlgebraError.nonFinite("system matrix")
        }
        // ‖A‖₁ of the symmetric matrix defined by the row-major lower triangle (the one the
        // factorisation reads).
        var anorm = 0.0
        for j in 0..<n {
            var s = 0.0
            for i in 0..<n { s += abs(i >= j ? a[i * n + j] : a[j * n + i]) }
            anorm = max(anorm, s)
        }
        let diagonal = (0..<n).map { a[$0 * n + $0] }
        let info = choleskyLowerInPlace(&a, n: n)
        if info < 0 { throw LinearAlgebraError.lapack(routine: "dpotrf", info: info) }
        var estimate = 0.0
        if info == 0 {
            let infoc = LAPACKE_dpocon(LAPACK_COL_MAJOR, rowMajorLower, Int32(n), a, Int32(n), anorm, &estimate)
            if infoc != 0 { throw LinearAlgebraError.lapack(routine: "dpocon", info: infoc) }
            if estimate >= rcond {
                // L·Y = B, then Lᵀ·X = Y (L: the row-major lower triangle).
                a.withUnsafeBufferPointer { pa in
                    b.withUnsafeMutableBufferPointer { pb in
                        cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, Int32(n), Int32(m), 1,
                                    pa.baseAddress, Int32(n), pb.baseAddress, Int32(m))
                        cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasTrans, CblasNonUnit, Int32(n), Int32(m), 1,
                                    pa.baseAddress, Int32(n), pb.baseAddress, Int32(m))
                    }
                }
                return (.cholesky, estimate)
            }
        }
        restoreLower(&a, n: n, diagonal: diagonal)
        var s = [Double](repeating: 0, count: n)
        var rank: Int32 = 0
        let info2 = LAPACKE_dgelsd(LAPACK_ROW_MAJOR, Int32(n), Int32(n), Int32(m), &a, Int32(n), &b, Int32(m), &s, rcond, &rank)
        if info2 != 0 { throw LinearAlgebraError.lapack(routine: "dgelsd", info: info2) }
        return (.leastSquares, estimate)
    }

    /// The LAPACK `uplo` of a row-major symmetric matrix's lower triangle handed over as
    /// column-major (where it is the upper one).
    static let rowMajorLower = CChar(UInt8(ascii: "U"))

    /// Cholesky A = L·Lᵀ of the symmetric row-major `a` in place (dpotrf's info: > 0 when A is
    /// not positive definite). The buffer is handed to LAPACK as the column-major matrix it also
    /// is, so LAPACKE makes no transposed copy: L fills the row-major lower triangle, diagonal
    /// included; the strict upper triangle is left as it was (`restoreLower`).
    static func choleskyLowerInPlace(_ a: inout [Double], n: Int) -> Int32 {
        LAPACKE_dpotrf(LAPACK_COL_MAJOR, rowMajorLower, Int32(n), &a, Int32(n))
    }

    /// A again after `choleskyLowerInPlace`: the lower triangle from the untouched upper one and
    /// the diagonal from `diagonal` (saved before factoring).
    static func restoreLower(_ a: inout [Double], n: Int, diagonal: [Double]) {
        for i in 0..<n {
            a[i * n + i] = diagonal[i]
            for j in 0..<i { a[i * n + j] = a[j * n + i] }
        }
    }
}

/// Rows of a token block converted to float64 at a time by the accumulations below: the
/// float64 copies of a block then take at most this many rows (at d_ff = 14336, 1024 rows are
/// 117 MB a copy instead of 470 MB for a 4096-token block; docs/ALGORITHM.md "Scale"). dgemm
/// splits its inner dimension into panels of a few hundred anyway, so the chunks cost no speed.
public let float64ChunkRows = 1024

/// Float64 accumulation of `A += Xᵀ · diag(w) · Y` for token blocks (X [n, p], Y [n, q]),
/// through BLAS dgemm on weighted float64 copies of at most `float64ChunkRows` rows at a time.
public func accumulateWeightedCross(_ x: Matrix, _ y: Matrix, weights: [Float]?, into a: inout [Double]) {
    precondition(x.rows == y.rows && a.count == x.cols * y.cols)
    let n = x.rows, p = x.cols, q = y.cols
    for start in stride(from: 0, to: n, by: float64ChunkRows) {
        let rows = min(float64ChunkRows, n - start)
        var xd = [Double](repeating: 0, count: rows * p)
        var yd = [Double](repeating: 0, count: rows * q)
        for r in 0..<rows {
            let t = start + r
            let w = Double(weights?[t] ?? 1)
            for j in 0..<p { xd[r * p + j] = w * Double(x.data[t * p + j]) }
            for j in 0..<q { yd[r * q + j] = Double(y.data[t * q + j]) }
        }
        BLAS.dgemmAccumulate(m: p, n: q, k: rows, a: xd, transA: true, lda: p, b: yd, transB: false, ldb: q, into: &a)
    }
}
