import Foundation

/// float8_e4m3fn: sign bit 7, exponent bits 6...3 (bias 7), mantissa bits 2...0; exponent 0 is
/// subnormal (m/8 · 2⁻⁶); 0x7F and 0xFF are NaN; no infinities; largest finite ±448 (0x7E).
public enum FP8E4M3 {
    public static let maxValue: Float = 448

    /// Every byte's value (NaN for 0x7F and 0xFF).
    public static let values: [Float] = (0..<256).map { b -> Float in
        let sign: Float = b & 0x80 != 0 ? -1 : 1
        let e = (b >> 3) & 0xF, m = b & 7
        if e == 15 && m == 7 { return .nan }
        if e == 0 { return sign * Float(m) / 8 * 0x1p-6 }
        return sign * (1 + Float(m) / 8) * Float(sign: .plus, exponent: e - 7, significand: 1)
    }

    @inline(__always) public static func decode(_ b: UInt8) -> Float { values[Int(b)] }

    /// The nearest float8_e4m3fn, ties to the even code, saturating at ±448 (as torch's cast of
    /// a value already clamped to ±448); NaN → 0x7F. The sign of zero is kept.
    @inline(__always) public static func encode(_ x: Float) -> UInt8 {
        if x.isNaN { return 0x7F }
        let sign: UInt8 = x.sign == .minus ? 0x80 : 0
        let a = x.magnitude
        if a >= maxValue { return sign | 0x7E }
        if a < 0x1p-6 {
            // Subnormals: multiples of 2⁻⁹ (code 8 is the smallest normal, 2⁻⁶).
            return sign | UInt8((a * 512).rounded(.toNearestOrEven))
        }
        // Normal: keep 3 of float32's 23 mantissa bits, rounding to nearest even on the bits
        // (a carry moves into the exponent); float32 exponent E ↔ e4m3 exponent E − 120.
        let bits = a.bitPattern
        let r = bits &+ 0x7FFFF &+ ((bits >> 20) & 1)
        return sign | UInt8(truncatingIfNeeded: ((((r >> 23) & 0xFF) - 120) << 3) | ((r >> 20) & 7))
    }

    /// `encode` by search over the value table (the definition `encode` is tested against).
    static func encodeBySearch(_ x: Float) -> UInt8 {
        if x.isNaN { return 0x7F }
        let sign: UInt8 = x.sign == .minus ? 0x80 : 0
        let a = x.magnitude
        if a >= maxValue { return sign | 0x7E }
        // Largest code k (0 ... 125) with values[k] <= a < values[k + 1]; codes 0 ... 0x7E increase.
        var lo = 0, hi = 0x7E
        while hi - lo > 1 {
            let mid = (lo + hi) / 2
            if values[mid] <= a { lo = mid } else { hi = mid }
        }
        // The midpoint of two neighbours has one more significant bit: exact in float32.
        let half = (values[lo] + values[hi]) / 2
        let k = a < half ? lo : a > half ? hi : (lo % 2 == 0 ? lo : hi)
        return sign | UInt8(k)
    }
}

/// Block-scaled FP8 ("fine-grained FP8", `quant_method: fp8`): a weight [rows, cols] (or a stack
/// [batch, rows, cols]) of float8_e4m3fn and one scale per (bo × bi) block, grid
/// [ceil(rows/bo), ceil(cols/bi)]; element (i, j) = float(q[i, j]) · scale[i / bo, j / bi] in float32.
/// The last row and column of blocks may be partial.
public enum FP8Block {
    /// The scale grid of a [rows, cols] weight.
    public static func grid(rows: Int, cols: Int, block: (Int, Int)) -> (Int, Int) {
        ((rows + block.0 - 1) / block.0, (cols + block.1 - 1) / block.1)
    }

    /// Dequantizes `batch` stacked [rows, cols] matrices of float8 bytes with their scale grids
    /// (`scales` flat, [batch, gridRows, gridCols]).
    public static func dequantize(_ q: UnsafeRawBufferPointer, scales: [Float], batch: Int, rows: Int, cols: Int,
                                  block: (Int, Int)) -> [Float] {
        let (gr, gc) = grid(rows: rows, cols: cols, block: block)
        var out = [Float](repeating: 0, count: batch * rows * cols)
        out.withUnsafeMutableBufferPointer { o in
            for b in 0..<batch {
                for i in 0..<rows {
                    let srow = b * gr * gc + (i / block.0) * gc
                    let base = (b * rows + i) * cols
                    for j in 0..<cols {
                        o[base + j] = FP8E4M3.values[Int(q[base + j])] * scales[srow + j / block.1]
                    }
                }
            }
        }
        return out
    }

    /// Quantizes `batch` stacked [rows, cols] float matrices block by block as transformers'
    /// reference quantizer (`Fp8Quantize`): amax over the block's real elements, scale = 448 / amax
    /// (1 when amax is 0), q = e4m3(clamp(w · scale, ±448)) rounding to nearest even,
    /// scale_inv = 1 / scale. A block that some scale represents exactly (a block dequantized from
    /// FP8 and left unchanged) keeps that scale and its bytes instead, so an unmodified FP8 round
    /// trip is byte-identical. `scaleType` is the stored scale type (F32 or BF16): with BF16 the
    /// scale is rounded to bfloat16 first and the block quantized with the rounded scale.
    /// `rounded`: how many blocks no scale represented exactly (their values were rounded).
    public static func quantize(_ w: [Float], batch: Int, rows: Int, cols: Int, block: (Int, Int),
                                scaleType: SafetensorsDType = .F32) -> (bytes: [UInt8], scales: [Float], rounded: Int) {
        let (gr, gc) = grid(rows: rows, cols: cols, block: block)
        var bytes = [UInt8](repeating: 0, count: batch * rows * cols)
        var scales = [Float](repeating: 1, count: batch * gr * gc)
        var rounded = 0
        let stored: (Float) -> Float = scaleType == .BF16 ? { Float(bitPattern: UInt32(bfloat16Bits($0)) << 16) } : { $0 }
        w.withUnsafeBufferPointer { w in
            for b in 0..<batch {
                for bi in 0..<gr {
                    for bj in 0..<gc {
                        let r0 = bi * block.0, r1 = min(rows, r0 + block.0)
                        let c0 = bj * block.1, c1 = min(cols, c0 + block.1)
                        func each(_ body: (Int) -> Bool) -> Bool {
                            for i in r0..<r1 {
                                let base = (b * rows + i) * cols
                                for j in c0..<c1 where !body(base + j) { return false }
                            }
                            return true
                        }
                        var amax: Float = 0
                        _ = each { amax = max(amax, w[$0].magnitude); return true }
                        // Exact: the scale v / d for the largest element v and d one of the
                        // largest e4m3 values, and the float32 numbers next to it.
                        var scaleInv: Float? = nil
                        if amax > 0 && amax.isFinite {
                            search: for code in stride(from: 0x7E, through: 0x70, by: -1) {
                                let s0 = amax / FP8E4M3.values[code]
                                for s in [s0, s0.nextDown, s0.nextUp, s0.nextDown.nextDown, s0.nextUp.nextUp] where s > 0 && s.isFinite && stored(s) == s {
                                    if each({ FP8E4M3.decode(FP8E4M3.encode(w[$0] / s)) * s == w[$0] }) {
                                        scaleInv = s
                                        break search
                                    }
                                }
                            }
                        }
                        let s: Float
                        if let e = scaleInv {
                            s = e
                            _ = each { bytes[$0] = FP8E4M3.encode(w[$0] / e); return true }
                        } else {
                            if amax > 0 { rounded += 1 }
                            let scale: Float = amax > 0 ? FP8E4M3.maxValue / amax : 1
                            s = stored(1 / scale)
                            if scaleType == .F32 {
                                _ = each { bytes[$0] = FP8E4M3.encode(min(max(w[$0] * scale, -FP8E4M3.maxValue), FP8E4M3.maxValue)); return true }
                            } else {
                                _ = each { bytes[$0] = FP8E4M3.encode(w[$0] / s); return true }
                            }
                        }
                        scales[(b * gr + bi) * gc + bj] = s
                    }
                }
            }
        }
        return (bytes, scales, rounded)
    }
}
