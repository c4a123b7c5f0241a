import Foundation

/// MXFP4 as GPT-OSS stores its experts: for a weight [rows, cols] (out × in), groups of 32
/// consecutive input elements of one row share an E8M0 scale byte s (value 2^(s − 127)); each
/// element is a 4-bit E2M1 code (bit 3 the sign, magnitudes 0, ½, 1, 1½, 2, 3, 4, 6), two per
/// byte with element 2j in the low nibble of byte j. `blocks` u8 [batch, rows, cols/32, 16],
/// `scales` u8 [batch, rows, cols/32].
public enum MXFP4 {
    public static let groupSize = 32
    public static let e2m1: [Float] = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]

    /// 2^(s − 127) in float32 (s = 255 gives +inf, as torch.ldexp).
    @inline(__always) public static func scaleValue(_ s: UInt8) -> Float {
        Float(sign: .plus, exponent: Int(s) - 127, significand: 1)
    }

    /// Decodes `batch` [rows, groups·32] matrices (out × in, as stored): value = e2m1[code] ·
    /// 2^(s − 127), one float32 multiply, as transformers' `convert_moe_packed_tensors`.
    public static func dequantize(blocks: UnsafeRawBufferPointer, scales: UnsafeRawBufferPointer, batch: Int, rows: Int,
                                  groups: Int) -> [Float] {
        let cols = groups * groupSize
        var out = [Float](repeating: 0, count: batch * rows * cols)
        out.withUnsafeMutableBufferPointer { o in
            for r in 0..<(batch * rows) {
                for g in 0..<groups {
                    let s = scaleValue(scales[r * groups + g])
                    let src = (r * groups + g) * 16, dst = r * cols + g * groupSize
                    for j in 0..<16 {
                        let byte = blocks[src + j]
                        o[dst + 2 * j] = e2m1[Int(byte & 0xF)] * s
                        o[dst + 2 * j + 1] = e2m1[Int(byte >> 4)] * s
                    }
                }
            }
        }
        return out
    }

    /// The nearest E2M1 code of x (ties to the even code, saturating at ±6; the sign of zero kept).
    public static func encode(_ x: Float) -> UInt8 {
        let sign: UInt8 = x.sign == .minus ? 8 : 0
        let a = x.magnitude
        if !(a < 6) { return sign | 7 }
        var k = 0
        while k < 7 && e2m1[k + 1] <= a { k += 1 }
        if k == 7 { return sign | 7 }
        let half = (e2m1[k] + e2m1[k + 1]) / 2
        let code = a < half ? k : a > half ? k + 1 : (k % 2 == 0 ? k : k + 1)
        return sign | UInt8(code)
    }

    /// Encodes `batch` [rows, cols] matrices (out × in; cols a multiple of 32). Per group of 32:
    /// amax, e = floor(log2 amax) − 2 (the OCP MX rule: 6 = 1.5 · 2²), one more when amax / 2^e
    /// exceeds 6 (so nothing saturates), clamped to the E8M0 range [−127, 127]; each element the
    /// nearest E2M1 of x / 2^e. A group of values that are exactly E2M1 multiples of 2^e
    /// (dequantized MXFP4 left unchanged) is stored without loss. An all-zero group gets scale byte 127.
    public static func quantize(_ w: [Float], batch: Int, rows: Int, cols: Int) -> (blocks: [UInt8], scales: [UInt8]) {
        precondition(cols % groupSize == 0)
        let groups = cols / groupSize
        var blocks = [UInt8](repeating: 0, count: batch * rows * groups * 16)
        var scales = [UInt8](repeating: 127, count: batch * rows * groups)
        for r in 0..<(batch * rows) {
            for g in 0..<groups {
                let base = r * cols + g * groupSize
                var amax: Float = 0
                for j in 0..<groupSize { amax = max(amax, w[base + j].magnitude) }
                var e = 0
                if amax > 0 {
                    e = amax.exponent - 2
                    if amax / Float(sign: .plus, exponent: e, significand: 1) > 6 { e += 1 }
                    e = min(max(e, -127), 127)
                }
                let inv = Float(sign: .plus, exponent: -e, significand: 1)
                scales[r * groups + g] = UInt8(e + 127)
                let dst = (r * groups + g) * 16
                for j in 0..<16 {
                    // x · 2^−e: exact unless it underflows (e near −127, where 2^−e is finite up to 2^127).
                    let lo = encode(w[base + 2 * j] * inv), hi = encode(w[base + 2 * j + 1] * inv)
                    blocks[dst + j] = lo | (hi << 4)
                }
            }
        }
        return (blocks, scales)
    }
}
