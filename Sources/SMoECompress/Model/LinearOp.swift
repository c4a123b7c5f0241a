/// A sparse matrix in compressed sparse row form, `[rows, cols]`.
public struct CSRMatrix: Sendable, Equatable {
    public var rows: Int
    public var cols: Int
    /// Row pointers, `rows + 1` entries, non-decreasing, starting at 0.
    public var indptr: [Int]
    /// Column index of each stored entry (sorted within a row).
    public var indices: [Int32]
    public var values: [Float]

    public init(rows: Int, cols: Int, indptr: [Int], indices: [Int32], values: [Float]) {
        self.rows = rows
        self.cols = cols
        self.indptr = indptr
        self.indices = indices
        self.values = values
    }

    /// An all-zero matrix (no stored entries).
    public static func empty(rows: Int, cols: Int) -> CSRMatrix {
        CSRMatrix(rows: rows, cols: cols, indptr: [Int](repeating: 0, count: rows + 1), indices: [], values: [])
    }

    public var nnz: Int { values.count }

    /// Checks the CSR invariants; returns a description of the first violation, or nil.
    public func validationError() -> String? {
        if rows < 0 || cols < 0 { return "negative shape \(rows)x\(cols)" }
        if indptr.count != rows + 1 { return "indptr has \(indptr.count) entries, expected \(rows + 1)" }
        if indptr.first != 0 { return "indptr does not start at 0" }
        if indptr.last != values.count { return "indptr ends at \(indptr.last ?? -1), expected nnz \(values.count)" }
        if indices.count != values.count { return "\(indices.count) indices for \(values.count) values" }
        for i in 0..<rows {
            let a = indptr[i], b = indptr[i + 1]
            if b < a { return "indptr decreases at row \(i)" }
            if a < 0 || b > indices.count { return "indptr entry out of range 0...\(indices.count) at row \(i)" }
            var prev: Int32 = -1
            for k in a..<b {
                let c = indices[k]
                if c < 0 || Int(c) >= cols { return "column index \(c) out of range in row \(i)" }
                if c <= prev { return "column indices not strictly increasing in row \(i)" }
                prev = c
            }
        }
        if !values.allSatisfy({ $0.isFinite }) { return "values contain NaN or Inf" }
        return nil
    }

    /// Dense form.
    public func dense() -> Matrix {
        var m = Matrix(rows: rows, cols: cols)
        add(to: &m)
        return m
    }

    /// `W += scale · S` in place, entry by entry (the one CSR scatter: densifying, expanding a
    /// factored matrix, taking S off a residual).
    public func add(to w: inout Matrix, scale: Float = 1) {
        precondition(w.rows == rows && w.cols == cols)
        for i in 0..<rows {
            for k in indptr[i]..<indptr[i + 1] { w.data[i * cols + Int(indices[k])] += scale * values[k] }
        }
    }

    /// Builds the CSR form of a dense matrix keeping entries where `keep` is true.
    public static func from(_ m: Matrix, keep: (Int, Int) -> Bool) -> CSRMatrix {
        var indptr = [0]
        var idx: [Int32] = []
        var vals: [Float] = []
        for i in 0..<m.rows {
            for j in 0..<m.cols where keep(i, j) {
                idx.append(Int32(j))
                vals.append(m.data[i * m.cols + j])
            }
            indptr.append(vals.count)
        }
        return CSRMatrix(rows: m.rows, cols: m.cols, indptr: indptr, indices: idx, values: vals)
    }

    /// `Y += X · Sᵀ` for a token block X [n, cols] and Y [n, rows].
    public func accumulateProduct(_ x: Matrix, into y: inout Matrix) {
        precondition(x.cols == cols && y.cols == rows && x.rows == y.rows)
        if nnz == 0 { return }
        let n = x.rows
        x.data.withUnsafeBufferPointer { px in
            y.data.withUnsafeMutableBufferPointer { py in
                for t in 0..<n {
                    let xr = px.baseAddress! + t * cols
                    let yr = py.baseAddress! + t * rows
                    for i in 0..<rows {
                        var s: Float = 0
                        for k in indptr[i]..<indptr[i + 1] { s += values[k] * xr[Int(indices[k])] }
                        yr[i] += s
                    }
                }
            }
        }
    }
}

/// A low-rank plus sparse factorisation `W ≈ U · V + S` of a matrix `[out, in]`.
public struct LowRankSparse: Sendable, Equatable {
    public var u: Matrix  // [out, r]
    public var v: Matrix  // [r, in]
    public var s: CSRMatrix  // [out, in]

    public init(u: Matrix, v: Matrix, s: CSRMatrix) {
        precondition(u.cols == v.rows && s.rows == u.rows && s.cols == v.cols)
        self.u = u
        self.v = v
        self.s = s
    }

    public var rank: Int { u.cols }
    public var outFeatures: Int { u.rows }
    public var inFeatures: Int { v.cols }

    /// `U · V + S` as a dense matrix.
    public func dense() -> Matrix {
        var w = BLAS.matmul(u, v)
        s.add(to: &w)
        return w
    }

    /// The exact factorisation of a dense W [out, in]: I·W, or W·I when `in` is the smaller side
    /// (how a dense matrix is stored beside factored ones, FORMAT.md).
    public static func exact(_ w: Matrix) -> LowRankSparse {
        let (r, c) = (w.rows, w.cols)
        return r <= c ? LowRankSparse(u: .identity(r), v: w, s: .empty(rows: r, cols: c))
                      : LowRankSparse(u: w, v: .identity(c), s: .empty(rows: r, cols: c))
    }
}

/// One stored weight matrix of an expert `[out, in]`: dense, or factored as `U · V + S`.
public enum LinearOp: Sendable, Equatable {
    case dense(Matrix)
    case factored(LowRankSparse)

    public var outFeatures: Int {
        switch self {
        case .dense(let w): return w.rows
        case .factored(let f): return f.outFeatures
        }
    }

    public var inFeatures: Int {
        switch self {
        case .dense(let w): return w.cols
        case .factored(let f): return f.inFeatures
        }
    }

    public var isFactored: Bool { if case .factored = self { return true } else { return false } }

    /// The dense matrix (materialised for factored forms).
    public func dense() -> Matrix {
        switch self {
        case .dense(let w): return w
        case .factored(let f): return f.dense()
        }
    }

    /// Stored numbers: out·in when dense; U, V and the CSR values (indices counted separately).
    public var parameterCount: Int {
        switch self {
        case .dense(let w): return w.count
        case .factored(let f): return f.u.count + f.v.count + f.s.nnz
        }
    }

    /// Bytes on disk with floats of `floatBytes` each (CSR indices int32, row pointers int64).
    public func storedBytes(floatBytes: Int) -> Int {
        switch self {
        case .dense(let w): return w.count * floatBytes
        case .factored(let f):
            return (f.u.count + f.v.count + f.s.nnz) * floatBytes + f.s.nnz * 4 + (f.s.rows + 1) * 8
        }
    }

    /// FLOPs per token to apply this matrix (2 per multiply–add; factored: U, V and S's nonzeros).
    public var flopsPerToken: Int {
        switch self {
        case .dense(let w): return 2 * w.count
        case .factored(let f): return 2 * (f.u.count + f.v.count + f.s.nnz)
        }
    }

    /// Applies the matrix to a token block: `X [n, in] → X · Wᵀ [n, out]`. Factored forms are
    /// applied as `(X · Vᵀ) · Uᵀ + X · Sᵀ`, never densified.
    public func apply(_ x: Matrix) -> Matrix {
        switch self {
        case .dense(let w):
            return BLAS.matmul(x, w, transB: true)
        case .factored(let f):
            let t = BLAS.matmul(x, f.v, transB: true)  // [n, r]
            var y = BLAS.matmul(t, f.u, transB: true)  // [n, out]
            f.s.accumulateProduct(x, into: &y)
            return y
        }
    }
}
