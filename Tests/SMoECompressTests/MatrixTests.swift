import XCTest
@testable import SMoECompress

final class MatrixTests: XCTestCase {
    func testGemmAgainstLoop() {
        var rng = SplitMix64(seed: 1)
        let a = Matrix(rows: 5, cols: 7, data: (0..<35).map { _ in rng.nextFloat(in: -1...1) })
        let b = Matrix(rows: 7, cols: 3, data: (0..<21).map { _ in rng.nextFloat(in: -1...1) })
        let c = a * b
        for i in 0..<5 { for j in 0..<3 {
            var s = 0.0
            for k in 0..<7 { s += Double(a[i, k]) * Double(b[k, j]) }
            XCTAssertEqual(Double(c[i, j]), s, accuracy: 1e-5)
        } }
        let ct = BLAS.matmul(b, transA: true, a, transB: true)
        XCTAssertLessThan(relativeError(ct, c.transposed()), 1e-6)
    }
}
