import Foundation

/// How `export` writes routed experts (the library's `storage` setting of export): `auto` writes
/// them as the source folder did (FP8 block-scaled again, MXFP4 again, or the source float type);
/// `f32`, `f16`, `bf16` write floats (quantized sources dequantized); `f8-block` quantizes them to
/// block-scaled FP8 (the source's block and scale type when it was FP8, else 128 × 128 with
/// float32 scales); `mxfp4` to GPT-OSS MXFP4.
public enum ExportEncoding: String, Sendable, CaseIterable {
    case auto, f32, f16, bf16, f8Block = "f8-block", mxfp4
}

/// The resolved expert encoding of one export.
enum ExpertWriteEncoding: Equatable {
    case plain(SafetensorsDType)
    case fp8(rows: Int, cols: Int, scaleType: SafetensorsDType)
    case mxfp4(biasType: SafetensorsDType)

    var description: String {
        switch self {
        case .plain(let t): return t.rawValue
        case .fp8(let r, let c, let t): return "fp8_e4m3_block \(r)x\(c) (\(t.rawValue) scales)"
        case .mxfp4: return "mxfp4"
        }
    }

    /// Resolves `choice` for a checkpoint imported with `source` encoding (nil: floats of
    /// `expertType`) of family `family` in `layout`.
    static func resolve(_ choice: ExportEncoding, source: SourceEncoding?, expertType: SafetensorsDType,
                        family: ModelFamily, layout: ExpertLayout) throws -> ExpertWriteEncoding {
        let interleaved = family.fusedInputMajorInterleaved && layout == .fused
        let result: ExpertWriteEncoding
        switch choice {
        case .auto:
            switch source {
            case .fp8Block(let r, let c, let t)?: result = .fp8(rows: r, cols: c, scaleType: t)
            case .mxfp4(let b)?: result = .mxfp4(biasType: b)
            case nil: result = .plain(expertType.isFloat ? expertType : .F32)
            }
        case .f32: result = .plain(.F32)
        case .f16: result = .plain(.F16)
        case .bf16: result = .plain(.BF16)
        case .f8Block:
            if case .fp8Block(let r, let c, let t)? = source { result = .fp8(rows: r, cols: c, scaleType: t) } else {
                result = .fp8(rows: 128, cols: 128, scaleType: .F32)
            }
        case .mxfp4:
            if case .mxfp4(let b)? = source { result = .mxfp4(biasType: b) } else {
                result = .mxfp4(biasType: expertType.isFloat ? expertType : .BF16)
            }
        }
        switch result {
        case .fp8(_, _, let t):
            guard !interleaved else {
                throw SMoEError.setting(.storage, "f8-block writes per-expert or fused [E, 2·d_ff, d_model] experts; \(family.rawValue) experts are written as mxfp4 or floats")
            }
            guard t != .U8 else {
                throw SMoEError.setting(.storage, "the source's FP8 scales are E8M0 exponents (scale_fmt ue8m0), which export does not write: choose bf16 or f32")
            }
        case .mxfp4:
            guard interleaved else {
                throw SMoEError.setting(.storage, "mxfp4 is GPT-OSS's expert encoding; \(family.rawValue) experts are written as f8-block or floats")
            }
        case .plain: break
        }
        return result
    }

    /// `config.json` with `quantization_config` made true for the written tensors: kept when it
    /// already says the same method; set for FP8 / MXFP4 otherwise; removed for floats unless
    /// `/dense` still holds FP8 tensors (then the source's FP8 config stays, and the loader
    /// dequantizes exactly the tensors that have scales). Unchanged text when nothing changes.
    static func adjustConfig(_ text: String, encoding: ExpertWriteEncoding, denseHasFP8: Bool,
                             notConverted: [String]) throws -> String {
        guard case .object(var kv)? = try? JSONValue.parse(text) else { return text }
        let current = kv.first { $0.0 == "quantization_config" }?.1
        let method = current?["quant_method"]?.stringValue
        var want: JSONValue?? = .none  // .none: keep; .some(nil): remove; .some(x): set x
        switch encoding {
        case .plain:
            if method != nil && !(method == "fp8" && denseHasFP8) { want = .some(nil) }
        case .fp8(let r, let c, _):
            if method != "fp8" {
                want = .some(.object([("activation_scheme", "dynamic"), ("quant_method", "fp8"),
                                      ("weight_block_size", .array([.int(r), .int(c)])),
                                      ("modules_to_not_convert", JSONValue(notConverted))]))
            }
        case .mxfp4:
            if method != "mxfp4" {
                want = .some(.object([("quant_method", "mxfp4"), ("modules_to_not_convert", JSONValue(
                    ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]))]))
            }
        }
        guard case .some(let value) = want else { return text }
        kv.removeAll { $0.0 == "quantization_config" }
        if let v = value { kv.append(("quantization_config", v)) }
        return JSONValue.object(kv).serialized(pretty: true) + "\n"
    }
}

extension ExpertWriteEncoding {
    var isMXFP4: Bool { if case .mxfp4 = self { return true } else { return false } }
}
