import CLinAlg

extension Matrix {
    /// An orthonormal basis of the columns of a tall matrix [m, n], m ≥ n (LAPACK `sgeqrf` + `sorgqr`).
    public func orthonormalColumns() throws -> Matrix {
        let m = rows, n = cols
        precondition(m >= n, "orthonormalColumns needs rows ≥ cols")
        if n == 0 { return self }
        var a = data
        var tau = [Float](repeating: 0, count: n)
        var info = LAPACKE_sgeqrf(LAPACK_ROW_MAJOR, Int32(m), Int32(n), &a, Int32(n), &tau)
        if info != 0 { throw LinearAlgebraError.lapack(routine: "sgeqrf", info: info) }
        info = LAPACKE_sorgqr(LAPACK_ROW_MAJOR, Int32(m), Int32(n), Int32(n), &a, Int32(n), &tau)
        if info != 0 { throw LinearAlgebraError.lapack(routine: "sorgqr", info: info) }
        return Matrix(rows: m, cols: n, data: a)
    }
}
