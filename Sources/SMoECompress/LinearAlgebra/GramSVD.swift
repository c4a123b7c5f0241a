import CLinAlg

/// The rank-r truncated SVD through the eigendecomposition of the smaller Gram (ALGORITHM.md §4):
/// for A [m, n] with m ≥ n, G = AᵀA [n, n] accumulated in float64 (BLAS `dsyrk` over 512-row
/// chunks converted to float64, so no float64 copy of A), its r largest eigenpairs by LAPACK
/// `dsyevr` (MRRR, only the wanted ones; eigenvectors V_r), then A·V_r by one `sgemm` and
/// σ_j = ‖A·v_j‖; for m < n the same with G = AAᵀ and the left vectors. U·diag(σ)·Vᵀ is then
/// A·V_r·V_rᵀ, the projection of A on the computed subspace: the best approximation in that
/// subspace, and the optimal one up to float64 rounding of G (σ_i² resolved to about 1e-16·‖A‖²,
/// far below what float32 storage of A holds, so the squaring of the condition number costs
/// nothing here). `tailEstimate` is ‖A‖²_F − Σ_{j≤r} λ_j from the float64 Gram: the squared
/// error of the optimal rank-r approximation, used by the caller's a-posteriori check.
public struct GramSVDResult: Sendable {
    public var svd: SVDResult
    /// ‖A‖²_F (float64 sum).
    public var normSquared: Double
    /// Σ_{j≤r} λ_j of the float64 Gram (the optimum's captured energy).
    public var eigenvalueSum: Double
    /// Σ_{j≤r} σ_j² of the computed factors (the captured energy they reach).
    public var capturedSum: Double
    /// A bound on how far `eigenvalueSum` may lie below the float64 Gram's Σ_{j≤r} λ_j: 0 for
    /// `dsyevr`, `float32EigenSlack` for `ssyevr` on the Gram rounded to float32.
    public var eigenvalueSlack: Double = 0
    /// The eigensolver whose pairs the factors use: "dsyevr" or "ssyevr" (float32, checked).
    public var eigensolver: String = "dsyevr"
}

extension Matrix {
    /// `float64: false` forms G by `ssyrk` and takes its eigenpairs by `ssyevr` (float32 all the
    /// way: half the memory traffic of the tridiagonal reduction, eigenvalues to ~1e-7·‖A‖²).
    /// With `float32First` (and `float64`) the float64 G is rounded to float32 and its pairs are
    /// taken by `ssyevr` first (about 3× less CPU than `dsyevr` at p = 4096, ALGORITHM.md §4); the
    /// result, whose `eigenvalueSlack` bounds the float32 eigenvalues' shortfall, is returned if
    /// `float32First` accepts it, otherwise the pairs are taken again by `dsyevr` from the kept G.
    public func gramTruncatedSVD(rank r: Int, float64: Bool = true, chunk: Int = 512,
                                 float32First: ((GramSVDResult) -> Bool)? = nil) throws -> GramSVDResult {
        let m = rows, n = cols, p = Swift.min(m, n)
        precondition(r >= 1 && r <= p, "gramTruncatedSVD rank \(r) outside 1...\(p)")
        guard allFinite else { throw LinearAlgebraError.nonFinite("matrix given to SVD") }
        guard float64 else {
            let (vecs, eigSum, normSq) = try gramEigenFloat32(rank: r)
            var res = project(vecs, rank: r, normSq: normSq, eigSum: eigSum)
            res.eigensolver = "ssyevr"
            return res
        }
        var (g, normSq) = gramFloat64(chunk: chunk)
        if let accept = float32First {
            let e = try largestSymmetricEigenpairsFloat32(g, n: p, count: r)
            var res = project(e.vectors, rank: r, normSq: normSq, eigSum: e.values.reduce(0.0) { $0 + Swift.max($1, 0) })
            res.eigenvalueSlack = e.slack
            res.eigensolver = "ssyevr"
            if accept(res) { return res }
        }
        let (vecs, eigSum, _) = try dsyevrLargest(&g, n: p, count: r)
        return project(vecs, rank: r, normSq: normSq, eigSum: eigSum)
    }

    /// The factors U·diag(σ)·Vᵀ = A·V_r·V_rᵀ from the Gram's eigenvectors `vecs` [r, p].
    private func project(_ vecs: Matrix, rank r: Int, normSq: Double, eigSum: Double) -> GramSVDResult {
        let m = rows, n = cols
        let tall = m >= n          // G = AᵀA [n, n]; else G = AAᵀ [m, m]
        // tall: B = A·V [m, r] (columns A·v_j); wide: C = Uᵀ·A [r, n] (rows u_jᵀ·A).
        let proj = tall ? BLAS.matmul(self, vecs, transB: true) : BLAS.matmul(vecs, self)
        var sigma = [Float](repeating: 0, count: r)
        var captured = 0.0
        if tall {
            var sq = [Double](repeating: 0, count: r)
            for i in 0..<m { for j in 0..<r { let x = Double(proj.data[i * r + j]); sq[j] += x * x } }
            for j in 0..<r { sigma[j] = Float(sq[j].squareRoot()); captured += sq[j] }
        } else {
            for j in 0..<r {
                var s = 0.0
                for i in 0..<n { let x = Double(proj.data[j * n + i]); s += x * x }
                sigma[j] = Float(s.squareRoot()); captured += s
            }
        }
        // Normalise the projected side: U = B·diag(1/σ) (tall) or Vᵀ = diag(1/σ)·C (wide); a zero
        // σ (A has rank < r) leaves a zero vector, and U·diag(σ)·Vᵀ = A·V·Vᵀ still.
        let inv = sigma.map { $0 > 0 ? 1 / $0 : 0 }
        let u: Matrix, vt: Matrix
        if tall {
            var b = proj
            for i in 0..<m { for j in 0..<r { b.data[i * r + j] *= inv[j] } }
            u = b
            vt = vecs
        } else {
            var c = proj
            for j in 0..<r { for i in 0..<n { c.data[j * n + i] *= inv[j] } }
            vt = c
            u = vecs.transposed()
        }
        return GramSVDResult(svd: SVDResult(u: u, s: sigma, vt: vt), normSquared: normSq, eigenvalueSum: eigSum, capturedSum: captured)
    }
}

extension Matrix {
    /// The smaller Gram in float64 (see `gramTruncatedSVD`; row-major upper triangle written) and ‖A‖²_F,
    /// summed over the float64 chunks in chunk order (`accumulateGramFloat64` with `sumOfSquares`).
    func gramFloat64(chunk: Int) -> ([Double], Double) {
        let p = Swift.min(rows, cols), tall = rows >= cols
        var g = [Double](repeating: 0, count: p * p)
        let normSq = accumulateGramFloat64(self, columns: !tall, into: &g, chunk: chunk, sumOfSquares: true)
        return (g, normSq)
    }

    /// The same in float32: G by `ssyrk` straight from A, eigenpairs by `ssyevr`.
    func gramEigenFloat32(rank r: Int) throws -> (Matrix, Double, Double) {
        let m = rows, n = cols, p = Swift.min(m, n), tall = m >= n
        var g = [Float](repeating: 0, count: p * p)
        data.withUnsafeBufferPointer { a in
            g.withUnsafeMutableBufferPointer { pg in
                cblas_ssyrk(CblasRowMajor, CblasUpper, tall ? CblasTrans : CblasNoTrans, Int32(p), Int32(tall ? m : n), 1,
                            a.baseAddress, Int32(n), 0, pg.baseAddress, Int32(p))
            }
        }
        let normSq = data.reduce(0.0) { $0 + Double($1) * Double($1) }
        let (vecs, eigSum, _) = try ssyevrLargest(&g, n: p, count: r)
        return (vecs, eigSum, normSq)
    }

    static let jobV = CChar(UInt8(ascii: "V")), rangeI = CChar(UInt8(ascii: "I")), lower = CChar(UInt8(ascii: "L"))
}

/// Float64 accumulation of a Gram by BLAS `dsyrk` on float64 copies of at most `chunk` rows (or
/// columns) of a float32 A at a time, so no float64 copy of A is held: with `columns` false,
/// G [n, n] += alpha·Σ_t s_t²·a_t·a_tᵀ over the rows a_t of A [T, n] (s_t = `rowScales[t]`, 1
/// without); with `columns` true, G [m, m] += alpha·A·Aᵀ for A [m, n] (column chunks). Only the
/// upper triangle of the row-major G is written (the lower one of the column-major G LAPACK's
/// symmetric routines read with uplo = "L"). With `sumOfSquares` it returns the float64 sum of
/// the squares of the buffered values (scaled, not multiplied by alpha), summed in chunk order:
/// rows in data order; columns chunk by chunk, rows i then columns j of the chunk. Otherwise 0.
@discardableResult
public func accumulateGramFloat64(_ a: Matrix, columns: Bool = false, rowScales: [Float]? = nil, alpha: Double = 1,
                                  into g: inout [Double], chunk: Int = 512, sumOfSquares: Bool = false) -> Double {
    let m = a.rows, n = a.cols, p = columns ? m : n, k = columns ? n : m
    precondition(g.count == p * p, "accumulateGramFloat64: Gram of \(g.count) entries for \(p) × \(p)")
    precondition(rowScales.map { $0.count == m && !columns } ?? true, "accumulateGramFloat64: one scale per row, rows only")
    guard p > 0, k > 0 else { return 0 }
    var buf = [Double](repeating: 0, count: Swift.min(chunk, k) * p)
    var sumSq = 0.0
    a.data.withUnsafeBufferPointer { pa in
        var start = 0
        while start < k {
            let c = Swift.min(chunk, k - start)
            // rows: [c, p] (rows start..<start+c, scaled); columns: [p, c] (columns start..<start+c).
            if columns {
                for i in 0..<m { for j in 0..<c { buf[i * c + j] = Double(pa[i * n + start + j]) } }
            } else {
                for t in 0..<c {
                    let s = Double(rowScales?[start + t] ?? 1)
                    for j in 0..<n { buf[t * n + j] = s * Double(pa[(start + t) * n + j]) }
                }
            }
            if sumOfSquares { for t in 0..<(c * p) { sumSq += buf[t] * buf[t] } }
            buf.withUnsafeBufferPointer { pb in
                g.withUnsafeMutableBufferPointer { pg in
                    cblas_dsyrk(CblasRowMajor, CblasUpper, columns ? CblasNoTrans : CblasTrans, Int32(p), Int32(c), alpha,
                                pb.baseAddress, Int32(columns ? c : p), 1, pg.baseAddress, Int32(p))
                }
            }
            start += c
        }
    }
    return sumSq
}

/// The r largest eigenpairs of the symmetric n × n float64 `g` (row-major; its upper triangle is
/// read, which is the lower one of the column-major matrix LAPACK sees) by LAPACK `dsyevr` (MRRR,
/// only the wanted ones): the eigenvectors as float32 rows [r, n] and their eigenvalues, both
/// largest first (eigenvalues unclamped: a negative one is rounding or a matrix that is not
/// positive semidefinite, the caller decides). LAPACK destroys the triangle it reads and the
/// diagonal, so pass a copy the caller does not need.
public func largestSymmetricEigenpairs(_ g: inout [Double], n: Int, count r: Int) throws -> (vectors: Matrix, values: [Double]) {
    precondition(r >= 1 && r <= n && g.count == n * n, "largestSymmetricEigenpairs: \(r) of \(n)")
    let (vecs, _, values) = try dsyevrLargest(&g, n: n, count: r)
    return (vecs, values)
}

/// All eigenvalues of the symmetric n × n float64 `g` (row-major; its upper triangle is read, the
/// lower one of the column-major matrix LAPACK sees, as `largestSymmetricEigenpairs`), without
/// eigenvectors, by LAPACK `dsyevd` with jobz "N" (the tridiagonal reduction, 4/3·n³ flops, then
/// `dsterf`'s root-free QR, O(n²); no n × n vector storage): largest first, unclamped (a negative
/// one is rounding or a matrix that is not positive semidefinite, the caller decides). LAPACK
/// destroys the triangle it reads and the diagonal, so pass a copy the caller does not need.
public func symmetricEigenvalues(_ g: inout [Double], n: Int) throws -> [Double] {
    precondition(n >= 0 && g.count == n * n, "symmetricEigenvalues: \(g.count) entries for \(n) × \(n)")
    guard n > 0 else { return [] }
    var w = [Double](repeating: 0, count: n)
    let info = LAPACKE_dsyevd(LAPACK_COL_MAJOR, CChar(UInt8(ascii: "N")), Matrix.lower, Int32(n), &g, Int32(n), &w)
    if info != 0 { throw LinearAlgebraError.lapack(routine: "dsyevd", info: info) }
    return w.reversed()  // LAPACK's are ascending
}

/// The r largest eigenpairs of the symmetric n × n float64 `g` (row-major, upper triangle read,
/// as `largestSymmetricEigenpairs`; `g` is not modified) by LAPACK `ssyevr` on g rounded to
/// float32 — the fast first try of `--svd auto` (ALGORITHM.md §4: `dsyevr`'s cost is mostly the
/// memory-bound tridiagonal reduction, which float32 halves; measured about 3× less CPU at n = 4096,
/// r = 1024). Eigenvectors as float32 rows [r, n] and eigenvalues, largest first, as there.
/// `slack` bounds how far the sum of the r returned eigenvalues may lie below the r largest of
/// g's own, so that a caller's optimum tr − Σ values − slack is not above the true one:
/// - rounding: g = g₃₂ + E, and by Weyl/Hoffman–Wielandt Σ_{j≤r} |λ_j(g) − λ_j(g₃₂)| ≤
///   √r·‖E‖_F, with ‖E‖_F computed exactly here (in float64, over the triangle LAPACK reads);
/// - `ssyevr`'s own error: LAPACK's approximate bound is ε₃₂·‖g₃₂‖₂ per eigenvalue (Users' Guide
///   §4.7.1, EPSMCH = 2⁻²⁴), a modest multiple of which is what happens; on a flat spectrum
///   (`GramSVDFloat32Tests`, 64 equal eigenvalues) the sum's error was 2.3 × r·2⁻²⁴·max|λ|, so
///   the allowance is 8·r·2⁻²⁴·max|λ| (max|λ| from the returned values). It is an estimate, not
///   a proof (as the float64 check trusts `dsyevr`'s values): a larger shortfall would loosen the
///   check by its excess, against measured shortfalls ≥ 100× below the allowance at n = 4096.
/// Measured on 4096² Grams of realistic spectra the returned sum was within 2.5e-7 of the tail
/// (tr − Σ) of `dsyevr`'s, far inside this slack; the caller's a-posteriori check decides anyway.
public func largestSymmetricEigenpairsFloat32(_ g: [Double], n: Int, count r: Int) throws
    -> (vectors: Matrix, values: [Double], slack: Double) {
    precondition(r >= 1 && r <= n && g.count == n * n, "largestSymmetricEigenpairsFloat32: \(r) of \(n)")
    var g32 = [Float](repeating: 0, count: n * n)
    var eSq = 0.0
    for i in 0..<n {
        for j in i..<n {
            let x = g[i * n + j], y = Float(x), d = x - Double(y)
            g32[i * n + j] = y
            eSq += (j == i ? 1 : 2) * d * d  // the symmetric matrix's entry (i, j) and (j, i)
        }
    }
    var (vecs, _, values) = try ssyevrLargest(&g32, n: n, count: r)
    // `ssyevr`'s float32 vectors have norms 1 ± ~1e-6, which a projection V·Vᵀ turns into an
    // error of Σ_k λ_k·(‖v_k‖² − 1): up to 1e-4 of a small tail. Rescaled to unit norm (in
    // float64, then rounded) that term drops to the rounding of the stored vectors, as with
    // `dsyevr`'s; the pairwise non-orthogonality (~1e-6) enters only to second order.
    for k in 0..<r {
        var sq = 0.0
        for i in 0..<n { let x = Double(vecs.data[k * n + i]); sq += x * x }
        guard sq > 0 else { continue }
        let inv = 1 / sq.squareRoot()
        for i in 0..<n { vecs.data[k * n + i] = Float(Double(vecs.data[k * n + i]) * inv) }
    }
    let maxAbs = values.reduce(0.0) { max($0, abs($1)) }
    let slack = Double(r).squareRoot() * eSq.squareRoot() + 8 * Double(r) * 0x1p-24 * maxAbs
    return (vecs, values, slack)
}

/// `largestEigenpairs` by `dsyevr` (float64) and by `ssyevr` (float32): the r largest pairs of
/// the symmetric n × n `g` (its lower triangle, column-major: a row-major upper triangle).
private func dsyevrLargest(_ g: inout [Double], n: Int, count r: Int) throws -> (Matrix, Double, [Double]) {
    try largestEigenpairs(&g, p: n, rank: r, routine: "dsyevr") { a, found, w, z, isuppz in
        LAPACKE_dsyevr(LAPACK_COL_MAJOR, Matrix.jobV, Matrix.rangeI, Matrix.lower, Int32(n), a, Int32(n), 0, 0, Int32(n - r + 1), Int32(n),
                       0, found, w, z, Int32(n), isuppz)
    }
}

private func ssyevrLargest(_ g: inout [Float], n: Int, count r: Int) throws -> (Matrix, Double, [Double]) {
    try largestEigenpairs(&g, p: n, rank: r, routine: "ssyevr") { a, found, w, z, isuppz in
        LAPACKE_ssyevr(LAPACK_COL_MAJOR, Matrix.jobV, Matrix.rangeI, Matrix.lower, Int32(n), a, Int32(n), 0, 0, Int32(n - r + 1), Int32(n),
                       0, found, w, z, Int32(n), isuppz)
    }
}

/// The r largest eigenpairs of the symmetric p × p `g` (its lower triangle, column-major) by
/// LAPACK `?syevr` (MRRR, only the wanted ones), called by `syevr` with (a, found, w, z, isuppz):
/// the eigenvectors as rows [r, p], largest first, the sum of those r eigenvalues (a negative
/// one, from rounding, counted as 0), and the r eigenvalues themselves, largest first.
private func largestEigenpairs<T: BinaryFloatingPoint>(
    _ g: inout [T], p: Int, rank r: Int, routine: String,
    _ syevr: (UnsafeMutablePointer<T>, UnsafeMutablePointer<Int32>, UnsafeMutablePointer<T>, UnsafeMutablePointer<T>,
              UnsafeMutablePointer<Int32>) -> Int32
) throws -> (Matrix, Double, [Double]) {
    var w = [T](repeating: 0, count: p)
    var z = [T](repeating: 0, count: p * r)
    var isuppz = [Int32](repeating: 0, count: 2 * r)
    var found: Int32 = 0
    let info = syevr(&g, &found, &w, &z, &isuppz)
    if info != 0 { throw LinearAlgebraError.lapack(routine: routine, info: info) }
    if found != Int32(r) { throw LinearAlgebraError.lapack(routine: "\(routine) (found \(found) of \(r) eigenpairs)", info: -1) }
    // Eigenvalues ascending in w[0..<r], eigenvectors in z's columns (contiguous, column-major).
    var vecs = Matrix(rows: r, cols: p)
    for j in 0..<r {
        let src = (r - 1 - j) * p
        for i in 0..<p { vecs.data[j * p + i] = Float(z[src + i]) }
    }
    return (vecs, (0..<r).reduce(0.0) { $0 + max(Double(w[$1]), 0) }, (0..<r).map { Double(w[r - 1 - $0]) })
}
