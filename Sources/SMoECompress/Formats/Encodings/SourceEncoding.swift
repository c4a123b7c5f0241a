import Foundation

/// How a source folder encodes its routed experts, from `config.json`'s `quantization_config`
/// and the tensors themselves; recorded in the checkpoint's import entry (`source_encoding`) so
/// `export` can write the experts back the same way.
public enum SourceEncoding: Sendable, Equatable {
    /// float8_e4m3fn weights with a `…_scale_inv` grid of one scale per (rows × cols) block;
    /// `scaleType` is the scales' safetensors dtype (F32, BF16, or U8 = E8M0 exponents).
    case fp8Block(rows: Int, cols: Int, scaleType: SafetensorsDType)
    /// GPT-OSS MXFP4 `…_blocks` / `…_scales` (groups of 32 along the input axis); `biasType` is
    /// the dtype of the (unquantized) expert biases.
    case mxfp4(biasType: SafetensorsDType)

    public var format: String {
        switch self {
        case .fp8Block: return "fp8_e4m3_block"
        case .mxfp4: return "mxfp4"
        }
    }

    public var json: JSONValue {
        switch self {
        case .fp8Block(let r, let c, let t):
            return .object([("format", .string(format)), ("block_size", .array([.int(r), .int(c)])), ("scale_dtype", .string(t.rawValue))])
        case .mxfp4(let b):
            return .object([("format", .string(format)), ("block_size", .array([.int(1), .int(MXFP4.groupSize)])),
                            ("scale_dtype", .string("U8")), ("bias_dtype", .string(b.rawValue))])
        }
    }

    /// Reads an import entry's `source_encoding` (nil when absent).
    public init?(json: JSONValue?, path: String) throws {
        guard let j = json, j != .null else { return nil }
        let bad = SMoEError.dataset(path, "/@history", "import entry's source_encoding \(j.serialized()) is not understood")
        switch j["format"]?.stringValue {
        case "fp8_e4m3_block":
            guard let b = j["block_size"]?.arrayValue, b.count == 2, let r = b[0].intValue, let c = b[1].intValue, r >= 1, c >= 1,
                  let t = j["scale_dtype"]?.stringValue.flatMap(SafetensorsDType.init(rawValue:)), [.F32, .BF16, .U8].contains(t) else { throw bad }
            self = .fp8Block(rows: r, cols: c, scaleType: t)
        case "mxfp4":
            guard let t = j["bias_dtype"]?.stringValue.flatMap(SafetensorsDType.init(rawValue:)), t.isFloat else { throw bad }
            self = .mxfp4(biasType: t)
        default: throw bad
        }
    }
}

/// The `quantization_config` of a source `config.json`, as far as import reads it.
public enum SourceQuantization: Sendable, Equatable {
    case none
    /// `quant_method: fp8` with its `weight_block_size` ([128, 128] when absent) and whether
    /// scales are E8M0 (`scale_fmt: ue8m0`).
    case fp8(rows: Int, cols: Int)
    case mxfp4

    /// Parses `quantization_config`; other quantization methods are refused (their tensors
    /// would be read as something they are not).
    public static func parse(_ text: String, path: String) throws -> SourceQuantization {
        guard let json = try? JSONValue.parse(text), let q = json["quantization_config"], q != .null else { return .none }
        let key = "quantization_config"
        guard case .object = q else { throw SMoEError.dataset(path, key, "must be an object") }
        guard let method = q["quant_method"]?.stringValue else { throw SMoEError.dataset(path, key + ".quant_method", "missing") }
        switch method {
        case "fp8":
            if let f = q["fmt"]?.stringValue, f != "e4m3" {
                throw SMoEError.dataset(path, key + ".fmt", "\"\(f)\" is not supported (e4m3 only)")
            }
            var rows = 128, cols = 128
            if let b = q["weight_block_size"], b != .null {
                guard let a = b.arrayValue, a.count == 2, let r = a[0].intValue, let c = a[1].intValue, r >= 1, c >= 1, r <= 1 << 16, c <= 1 << 16 else {
                    throw SMoEError.dataset(path, key + ".weight_block_size", "must be two positive integers [rows, cols], not \(b.serialized())")
                }
                rows = r
                cols = c
            }
            return .fp8(rows: rows, cols: cols)
        case "mxfp4":
            return .mxfp4
        default:
            throw SMoEError.dataset(path, key + ".quant_method", "\"\(method)\" is not supported (fp8 block-scaled and mxfp4 are; dequantize other encodings first)")
        }
    }

    /// The weight a scale tensor belongs to: `X.weight_scale_inv` / `X_scale_inv` → `X.weight` /
    /// `X` (FP8), `X_scales` → `X_blocks` (MXFP4); nil for other names.
    public func weight(ofScale name: String) -> String? {
        switch self {
        case .fp8 where name.hasSuffix("_scale_inv"): return String(name.dropLast("_scale_inv".count))
        case .mxfp4 where name.hasSuffix("_scales"): return String(name.dropLast("_scales".count)) + "_blocks"
        default: return nil
        }
    }
}

/// Reading quantized expert tensors of a source folder.
enum QuantizedRead {
    /// Checks the FP8 weight `name` [.., rows, cols] (stacked over `batch` when 3-D) and its scale
    /// tensor: dtypes and grid shape. Returns the scale dtype.
    static func checkFP8(_ name: String, scale: String, model: SafetensorsModel, block: (Int, Int)) throws -> SafetensorsDType {
        let (file, w) = try model.locate(name)
        let s = try model.info(scale)
        let sp = try model.locate(scale).file.path
        guard w.dtype == .F8_E4M3 else {
            throw SMoEError.dataset(file.path, name, "has a scale tensor \(scale) but is \(w.dtype.rawValue), not F8_E4M3")
        }
        guard [.F32, .BF16, .F16, .U8].contains(s.dtype) else {
            throw SMoEError.dataset(sp, scale, "is \(s.dtype.rawValue): FP8 block scales must be F32, BF16, F16 or U8 (E8M0)")
        }
        guard w.shape.count >= 2 else { throw SMoEError.dataset(file.path, name, "shape \(w.shape) is not a matrix") }
        let rows = w.shape[w.shape.count - 2], cols = w.shape[w.shape.count - 1]
        let (gr, gc) = FP8Block.grid(rows: rows, cols: cols, block: block)
        let want = Array(w.shape.dropLast(2)) + [gr, gc]
        guard s.shape == want else {
            throw SMoEError.dataset(sp, scale, "shape \(s.shape) does not match \(name) \(w.shape) in \(block.0)×\(block.1) blocks (want \(want))")
        }
        return s.dtype
    }

    /// The scales of an FP8 weight as float32, each finite.
    static func fp8Scales(_ scale: String, model: SafetensorsModel) throws -> [Float] {
        let (file, info) = try model.locate(scale)
        let v: [Float] = try file.withBytes(scale) { p in
            info.dtype == .U8 ? p.map { $0 == 255 ? Float.nan : MXFP4.scaleValue($0) } : info.dtype.decode(p)
        }
        if let i = v.firstIndex(where: { !$0.isFinite }) {
            throw SMoEError.dataset(file.path, scale, "scale \(v[i]) at flat index \(i) is not a finite number")
        }
        return v
    }

    /// The FP8 weight `name` dequantized (float32, same shape).
    static func fp8(_ name: String, scale: String, model: SafetensorsModel, block: (Int, Int)) throws -> [Float] {
        _ = try checkFP8(name, scale: scale, model: model, block: block)
        let w = try model.info(name)
        let rows = w.shape[w.shape.count - 2], cols = w.shape[w.shape.count - 1]
        let batch = w.shape.dropLast(2).reduce(1, *)
        let s = try fp8Scales(scale, model: model)
        return try model.withBytes(name) { FP8Block.dequantize($0, scales: s, batch: batch, rows: rows, cols: cols, block: block) }
    }

    /// Checks MXFP4 `blocks` [E, rows, groups, 16] and `scales` [E, rows, groups] (u8 both);
    /// returns (E, rows, cols = groups · 32).
    static func checkMXFP4(_ blocks: String, scale: String, model: SafetensorsModel) throws -> (Int, Int, Int) {
        let (file, b) = try model.locate(blocks)
        let s = try model.info(scale)
        let sp = try model.locate(scale).file.path
        guard b.dtype == .U8, b.shape.count == 4, b.shape[3] == 16, b.shape[0] >= 1, b.shape[1] >= 1, b.shape[2] >= 1 else {
            throw SMoEError.dataset(file.path, blocks, "MXFP4 blocks must be U8 [experts, rows, groups, 16], is \(b.dtype.rawValue) \(b.shape)")
        }
        guard s.dtype == .U8 else { throw SMoEError.dataset(sp, scale, "is \(s.dtype.rawValue): MXFP4 scales must be U8 (E8M0 exponents)") }
        guard s.shape == Array(b.shape.prefix(3)) else {
            throw SMoEError.dataset(sp, scale, "shape \(s.shape) does not match \(blocks) \(b.shape) (want \(Array(b.shape.prefix(3))))")
        }
        return (b.shape[0], b.shape[1], b.shape[2] * MXFP4.groupSize)
    }

    /// MXFP4 `blocks` decoded and transposed to transformers' module layout [E, cols, rows]
    /// (GPT-OSS `gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]).
    static func mxfp4(_ blocks: String, scale: String, model: SafetensorsModel) throws -> [Float] {
        let (E, R, C) = try checkMXFP4(blocks, scale: scale, model: model)
        let sp = try model.locate(scale).file.path
        let stored: [Float] = try model.withBytes(scale) { s in
            if let i = s.firstIndex(of: 255) {
                throw SMoEError.dataset(sp, scale, "scale byte 255 (E8M0 NaN) at flat index \(i)")
            }
            return try model.withBytes(blocks) { MXFP4.dequantize(blocks: $0, scales: s, batch: E, rows: R, groups: C / MXFP4.groupSize) }
        }
        var out = [Float](repeating: 0, count: stored.count)
        for e in 0..<E { for r in 0..<R { for c in 0..<C { out[(e * C + c) * R + r] = stored[(e * R + r) * C + c] } } }
        return out
    }
}
