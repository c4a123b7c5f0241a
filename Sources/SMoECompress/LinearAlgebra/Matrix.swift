import CLinAlg

/// A dense row-major matrix of `Float` over one contiguous buffer.
///
/// Weight matrices follow the PyTorch `nn.Linear` convention `[out, in]`; token blocks are
/// `[tokens, features]`, so a linear layer applied to a block is `X · Wᵀ`.
public struct Matrix: Sendable, Equatable {
    public var rows: Int
    public var cols: Int
    /// Row-major storage, `rows * cols` elements.
    public var data: [Float]

    public init(rows: Int, cols: Int, repeating value: Float = 0) {
        precondition(rows >= 0 && cols >= 0)
        self.rows = rows
        self.cols = cols
        self.data = [Float](repeating: value, count: rows * cols)
    }

    public init(rows: Int, cols: Int, data: [Float]) {
        precondition(data.count == rows * cols, "Matrix data count \(data.count) != \(rows)x\(cols)")
        self.rows = rows
        self.cols = cols
        self.data = data
    }

    /// Builds a matrix from nested rows (tests and small literals).
    public init(_ nested: [[Float]]) {
        let r = nested.count
        let c = nested.first?.count ?? 0
        precondition(nested.allSatisfy { $0.count == c })
        self.init(rows: r, cols: c, data: nested.flatMap { $0 })
    }

    public static func identity(_ n: Int) -> Matrix {
        var m = Matrix(rows: n, cols: n)
        for i in 0..<n { m.data[i * n + i] = 1 }
        return m
    }

    @inlinable public var count: Int { rows * cols }

    @inlinable public subscript(i: Int, j: Int) -> Float {
        get { data[i * cols + j] }
        set { data[i * cols + j] = newValue }
    }

    public func row(_ i: Int) -> ArraySlice<Float> { data[(i * cols)..<((i + 1) * cols)] }

    /// The rows at `indices`, in that order.
    public func gatherRows(_ indices: [Int]) -> Matrix {
        var out = Matrix(rows: indices.count, cols: cols)
        data.withUnsafeBufferPointer { src in
            out.data.withUnsafeMutableBufferPointer { dst in
                for (k, i) in indices.enumerated() {
                    let s = src.baseAddress! + i * cols
                    (dst.baseAddress! + k * cols).update(from: s, count: cols)
                }
            }
        }
        return out
    }

    /// The columns at `indices`, in that order.
    public func gatherColumns(_ indices: [Int]) -> Matrix {
        var out = Matrix(rows: rows, cols: indices.count)
        for i in 0..<rows {
            let base = i * cols
            let obase = i * indices.count
            for (k, j) in indices.enumerated() { out.data[obase + k] = data[base + j] }
        }
        return out
    }

    /// Rows `start ..< start+count`.
    public func rowBlock(_ start: Int, _ count: Int) -> Matrix {
        Matrix(rows: count, cols: cols, data: Array(data[(start * cols)..<((start + count) * cols)]))
    }

    public func transposed() -> Matrix {
        var out = Matrix(rows: cols, cols: rows)
        if rows == 0 || cols == 0 { return out }
        data.withUnsafeBufferPointer { src in
            out.data.withUnsafeMutableBufferPointer { dst in
                // Blocked transpose for cache friendliness.
                let b = 32
                var i0 = 0
                while i0 < rows {
                    let i1 = min(i0 + b, rows)
                    var j0 = 0
                    while j0 < cols {
                        let j1 = min(j0 + b, cols)
                        for i in i0..<i1 {
                            for j in j0..<j1 { dst[j * rows + i] = src[i * cols + j] }
                        }
                        j0 = j1
                    }
                    i0 = i1
                }
            }
        }
        return out
    }

    /// Concatenates matrices with equal column counts vertically.
    public static func vstack(_ parts: [Matrix]) -> Matrix {
        guard let c = parts.first?.cols else { return Matrix(rows: 0, cols: 0) }
        precondition(parts.allSatisfy { $0.cols == c })
        var d: [Float] = []
        d.reserveCapacity(parts.reduce(0) { $0 + $1.count })
        for p in parts { d.append(contentsOf: p.data) }
        return Matrix(rows: d.count / max(c, 1), cols: c, data: d)
    }

    /// Concatenates matrices with equal row counts horizontally.
    public static func hstack(_ parts: [Matrix]) -> Matrix {
        guard let r = parts.first?.rows else { return Matrix(rows: 0, cols: 0) }
        precondition(parts.allSatisfy { $0.rows == r })
        let c = parts.reduce(0) { $0 + $1.cols }
        var out = Matrix(rows: r, cols: c)
        var off = 0
        for p in parts {
            for i in 0..<r {
                for j in 0..<p.cols { out.data[i * c + off + j] = p.data[i * p.cols + j] }
            }
            off += p.cols
        }
        return out
    }

    // MARK: norms and element-wise

    /// Frobenius norm, accumulated in Float64.
    public var frobeniusNorm: Double {
        var s = 0.0
        for v in data { s += Double(v) * Double(v) }
        return s.squareRoot()
    }

    public var allFinite: Bool { data.allSatisfy { $0.isFinite } }

    public static func - (a: Matrix, b: Matrix) -> Matrix {
        precondition(a.rows == b.rows && a.cols == b.cols)
        var out = a
        for i in 0..<out.data.count { out.data[i] -= b.data[i] }
        return out
    }

    public static func + (a: Matrix, b: Matrix) -> Matrix {
        precondition(a.rows == b.rows && a.cols == b.cols)
        var out = a
        for i in 0..<out.data.count { out.data[i] += b.data[i] }
        return out
    }

    /// `self += alpha * other` through BLAS saxpy.
    public mutating func addScaled(_ other: Matrix, _ alpha: Float) {
        precondition(rows == other.rows && cols == other.cols)
        let n = Int32(count)
        other.data.withUnsafeBufferPointer { x in
            data.withUnsafeMutableBufferPointer { y in
                cblas_saxpy(n, alpha, x.baseAddress, 1, y.baseAddress, 1)
            }
        }
    }

    public func scaled(_ alpha: Float) -> Matrix {
        var out = self
        for i in 0..<out.data.count { out.data[i] *= alpha }
        return out
    }

    /// Adds `bias` to every row.
    public mutating func addRowVector(_ bias: [Float]) {
        precondition(bias.count == cols)
        for i in 0..<rows {
            let base = i * cols
            for j in 0..<cols { data[base + j] += bias[j] }
        }
    }
}

/// Relative Frobenius distance ‖a − b‖ / ‖b‖ in Float64 (0 when both are zero).
public func relativeError(_ a: Matrix, _ reference: Matrix) -> Double {
    precondition(a.rows == reference.rows && a.cols == reference.cols)
    var num = 0.0, den = 0.0
    for i in 0..<a.data.count {
        let d = Double(a.data[i]) - Double(reference.data[i])
        num += d * d
        den += Double(reference.data[i]) * Double(reference.data[i])
    }
    if den == 0 { return num == 0 ? 0 : .infinity }
    return (num / den).squareRoot()
}
