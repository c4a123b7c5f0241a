import Foundation
import XCTest
@testable import SMoECompress

/// A per-expert Mixtral folder whose experts are block-scaled FP8 (block 16 × 16, partial edge
/// blocks: d_ff 24, d_model 40), with the float values each expert matrix dequantizes to.
func fakeFP8Mixtral(_ dir: String, scaleType: SafetensorsDType = .F32, seed: UInt64 = 7,
                    edit: (inout [FakeTensor]) -> Void = { _ in }) throws -> [String: [Float]] {
    let E = 4, H = 40, I = 24, block = 16
    var rng = SplitMix64(seed: seed)
    var tensors: [FakeTensor] = []
    var want: [String: [Float]] = [:]
    let p = "model.layers.0.block_sparse_moe"
    let router = (0..<(E * H)).map { _ in Float(rng.nextDouble() - 0.5) }
    tensors.append(FakeTensor(name: p + ".gate.weight", dtype: .F32, shape: [E, H], bytes: SafetensorsDType.F32.encode(router)))
    for e in 0..<E {
        for (m, r, c) in [("w1", I, H), ("w3", I, H), ("w2", H, I)] {
            let name = "\(p).experts.\(e).\(m).weight"
            // Every byte but the NaNs 0x7F / 0xFF.
            let q = (0..<(r * c)).map { _ -> UInt8 in var b = UInt8(truncatingIfNeeded: rng.next()); if b & 0x7F == 0x7F { b ^= 1 }; return b }
            let (gr, gc) = ((r + block - 1) / block, (c + block - 1) / block)
            // Powers of two and bfloat16-exact values: scales of every order of magnitude.
            let s = (0..<(gr * gc)).map { _ in Float(1 + Int(rng.next() % 8)) / 8 * Float(sign: .plus, exponent: Int(rng.next() % 20) - 16, significand: 1) }
            tensors.append(FakeTensor(name: name, dtype: .F8_E4M3, shape: [r, c], bytes: q))
            tensors.append(FakeTensor(name: name + "_scale_inv", dtype: scaleType, shape: [gr, gc], bytes: scaleType.encode(s)))
            var v = [Float](repeating: 0, count: r * c)
            for i in 0..<r { for j in 0..<c { v[i * c + j] = FP8E4M3.decode(q[i * c + j]) * s[(i / block) * gc + j / block] } }
            want[name] = v
        }
    }
    // A dense FP8 tensor with its scale: copied byte for byte.
    tensors.append(FakeTensor(name: "model.layers.0.self_attn.q_proj.weight", dtype: .F8_E4M3, shape: [H, H], bytes: (0..<(H * H)).map { UInt8($0 % 126) }))
    tensors.append(FakeTensor(name: "model.layers.0.self_attn.q_proj.weight_scale_inv", dtype: .F32, shape: [3, 3], bytes: SafetensorsDType.F32.encode([Float](repeating: 0.5, count: 9))))
    tensors.append(FakeTensor(name: "model.embed_tokens.weight", dtype: .BF16, shape: [8, H], bytes: SafetensorsDType.BF16.encode((0..<(8 * H)).map { Float($0) / 64 })))
    edit(&tensors)
    let config: [(String, JSONValue)] = [
        ("model_type", "mixtral"), ("num_local_experts", .int(E)), ("num_experts_per_tok", .int(2)), ("hidden_act", "silu"),
        ("num_hidden_layers", .int(1)), ("hidden_size", .int(H)), ("intermediate_size", .int(I)),
        ("quantization_config", ["activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": [.int(block), .int(block)]]),
    ]
    try writeFakeModel(dir, tensors, config: config)
    return want
}

final class QuantizedEncodingTests: XCTestCase {
    func testE4M3DecodeAndEncode() {
        XCTAssertEqual(FP8E4M3.decode(0x7E), 448)
        XCTAssertEqual(FP8E4M3.decode(0xFE), -448)
        XCTAssertEqual(FP8E4M3.decode(0x01), 0x1p-9)  // smallest subnormal
        XCTAssertEqual(FP8E4M3.decode(0x07), 7 * 0x1p-9)  // largest subnormal
        XCTAssertEqual(FP8E4M3.decode(0x08), 0x1p-6)  // smallest normal
        XCTAssertEqual(FP8E4M3.decode(0x38), 1)
        XCTAssertEqual(FP8E4M3.decode(0x80).sign, .minus)
        XCTAssertTrue(FP8E4M3.decode(0x7F).isNaN && FP8E4M3.decode(0xFF).isNaN)
        for b in 0...255 where b & 0x7F != 0x7F { XCTAssertEqual(FP8E4M3.encode(FP8E4M3.decode(UInt8(b))), UInt8(b), "byte \(b)") }
        // Round to nearest, ties to even (torch: 1.0625 → 1.0, 1.1875 → 1.25), saturation at ±448.
        XCTAssertEqual(FP8E4M3.encode(1.0625), 0x38)
        XCTAssertEqual(FP8E4M3.encode(1.1875), 0x3A)
        XCTAssertEqual(FP8E4M3.encode(1.05), 0x38)
        XCTAssertEqual(FP8E4M3.encode(1.07), 0x39)
        XCTAssertEqual(FP8E4M3.encode(449), 0x7E)
        XCTAssertEqual(FP8E4M3.encode(-1e9), 0xFE)
        XCTAssertEqual(FP8E4M3.encode(.infinity), 0x7E)
        XCTAssertEqual(FP8E4M3.encode(0x1p-10), 0x00)  // tie between 0 and the smallest subnormal: 0
        XCTAssertEqual(FP8E4M3.encode(3 * 0x1p-10), 0x02)  // tie between codes 1 and 2: 2
        XCTAssertEqual(FP8E4M3.encode(-0.0), 0x80)
        XCTAssertEqual(FP8E4M3.encode(.nan), 0x7F)
        // The bit-twiddling encoder equals nearest-by-search on every code's neighbourhood (the
        // values, the midpoints and the floats next to them) and on a million random floats.
        var probes: [Float] = []
        for b in 0..<0x7E {
            let lo = FP8E4M3.decode(UInt8(b)), hi = FP8E4M3.decode(UInt8(b + 1)), mid = (lo + hi) / 2
            probes += [lo, lo.nextUp, mid.nextDown, mid, mid.nextUp, hi.nextDown]
        }
        var rng = SplitMix64(seed: 9)
        for _ in 0..<1_000_000 { probes.append(Float(bitPattern: UInt32(truncatingIfNeeded: rng.next())) ) }
        let edges: [Float] = [0x1p-6, Float(0x1p-6).nextDown, 0x1p-130, 447.99, 448, 464, 1e30]
        for x in probes + probes.map({ -$0 }) + edges {
            XCTAssertEqual(FP8E4M3.encode(x), FP8E4M3.encodeBySearch(x), "\(x)")
        }
    }

    func testFP8BlockPartialEdgeBlocks() {
        // 20 × 36 in 16 × 16 blocks: grid 2 × 3, the last row and column of blocks partial.
        let q = [UInt8](repeating: 0x38, count: 20 * 36)  // every element 1.0
        let s: [Float] = [1, 2, 3, 4, 5, 6]
        let w = q.withUnsafeBytes { FP8Block.dequantize($0, scales: s, batch: 1, rows: 20, cols: 36, block: (16, 16)) }
        XCTAssertEqual(w[0], 1)
        XCTAssertEqual(w[15 * 36 + 16], 2)
        XCTAssertEqual(w[15 * 36 + 35], 3)
        XCTAssertEqual(w[16 * 36 + 0], 4)
        XCTAssertEqual(w[19 * 36 + 31], 5)
        XCTAssertEqual(w[19 * 36 + 35], 6)
        // Stacked: the second matrix uses the second grid.
        let q2 = q + q
        let w2 = q2.withUnsafeBytes { FP8Block.dequantize($0, scales: s + s.map { $0 * 10 }, batch: 2, rows: 20, cols: 36, block: (16, 16)) }
        XCTAssertEqual(w2[20 * 36 + 19 * 36 + 35], 60)
    }

    func testFP8BlockQuantizeReferenceAndLosslessRoundTrip() {
        // One 2 × 3 block with amax 2: scale 448 / 2 = 224, scale_inv 1 / 224; 1.0 → 224 (exact
        // e4m3), 0.3 → 67.2 → 68 (nearest of 64, 72 ... spacing 4 above 64 → 68), -2 → -448.
        let w: [Float] = [1, 0.3, -2, 0, 0.001, 2]
        let (q, s, _) = FP8Block.quantize(w, batch: 1, rows: 2, cols: 3, block: (128, 128))
        XCTAssertEqual(s, [1 / Float(224)].map { $0 })
        XCTAssertEqual(q.map { FP8E4M3.decode($0) }, [224, 68, -448, 0, 0.224, 448].map { FP8E4M3.decode(FP8E4M3.encode($0)) })
        // A zero block: scale_inv 1, zeros keep their sign.
        let z = FP8Block.quantize([0, -0.0], batch: 1, rows: 1, cols: 2, block: (128, 128))
        XCTAssertEqual(z.scales, [1])
        XCTAssertEqual(z.bytes, [0x00, 0x80])
        // Dequantized FP8 quantizes back to the same bytes and scales (partial edge blocks too).
        var rng = SplitMix64(seed: 3)
        let rows = 37, cols = 50, block = (16, 16)
        let qb = (0..<(2 * rows * cols)).map { _ -> UInt8 in var b = UInt8(truncatingIfNeeded: rng.next()); if b & 0x7F == 0x7F { b ^= 1 }; return b }
        for scaleType in [SafetensorsDType.F32, .BF16] {
            let grid = 2 * 3 * 4
            var sc = (0..<grid).map { _ in Float(rng.nextDouble() * 0.01 + 1e-4) }
            if scaleType == .BF16 { sc = sc.map { Float(bitPattern: UInt32(bfloat16Bits($0)) << 16) } }
            // Blocks quantized by the reference have a largest element of ±448: make one per block.
            var qq = qb
            for b in 0..<2 { for bi in 0..<3 { for bj in 0..<4 { qq[(b * rows + bi * 16) * cols + bj * 16] = 0x7E } } }
            let v = qq.withUnsafeBytes { FP8Block.dequantize($0, scales: sc, batch: 2, rows: rows, cols: cols, block: block) }
            let (q2, s2, _) = FP8Block.quantize(v, batch: 2, rows: rows, cols: cols, block: block, scaleType: scaleType)
            XCTAssertEqual(s2, sc, "\(scaleType)")
            XCTAssertEqual(q2.map { $0 == 0x80 ? 0 : $0 }, qq.map { FP8E4M3.decode($0) == 0 ? 0 : $0 }, "\(scaleType)")
        }
    }

    func testMXFP4KnownValuesAndExponentRange() {
        // Byte 0x2F, scale byte 128 (2¹): low nibble first → [-6 · 2, 1 · 2] (transformers: [-12, 2]).
        var blocks = [UInt8](repeating: 0, count: 16), scales: [UInt8] = [128]
        blocks[0] = 0x2F
        var v = blocks.withUnsafeBytes { b in scales.withUnsafeBytes { MXFP4.dequantize(blocks: b, scales: $0, batch: 1, rows: 1, groups: 1) } }
        XCTAssertEqual(Array(v[0..<3]), [-12, 2, 0])
        // The e2m1 grid's extremes and every code, at the E8M0 range ends 2⁻¹²⁷ (byte 0) and 2¹²⁷ (254).
        blocks = (0..<16).map { UInt8($0) | UInt8(15 - $0) << 4 }
        for (byte, p) in [(UInt8(0), Float(0x1p-127)), (127, 1), (254, Float(0x1p127))] {
            scales = [byte]
            v = blocks.withUnsafeBytes { b in scales.withUnsafeBytes { MXFP4.dequantize(blocks: b, scales: $0, batch: 1, rows: 1, groups: 1) } }
            for j in 0..<16 {
                XCTAssertEqual(v[2 * j], MXFP4.e2m1[j] * p)
                XCTAssertEqual(v[2 * j + 1], MXFP4.e2m1[15 - j] * p)
            }
            if byte == 254 { XCTAssertEqual(v[14], .infinity) }  // 6 · 2¹²⁷ overflows float32
            if byte == 0 { XCTAssertEqual(v[2], 0x1p-128); XCTAssertEqual(v[14], 6 * 0x1p-127) }
        }
        // Encoding: nearest, ties to the even code, saturating at ±6.
        XCTAssertEqual([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 7, -0.1, -100].map { MXFP4.encode(Float($0)) }, [0, 2, 2, 4, 4, 6, 6, 7, 8, 15])
        // Decoded groups whose largest code is ±4 or ±6 quantize back to the same bytes.
        var rng = SplitMix64(seed: 5)
        let rows = 6, groups = 3
        var b = (0..<(rows * groups * 16)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        for g in 0..<(rows * groups) { b[g * 16] = 0x7F }  // +6 and -6 in every group
        let s = (0..<(rows * groups)).map { _ in UInt8(1 + rng.next() % 250) }
        let d = b.withUnsafeBytes { bb in s.withUnsafeBytes { MXFP4.dequantize(blocks: bb, scales: $0, batch: 1, rows: rows, groups: groups) } }
        let (b2, s2) = MXFP4.quantize(d, batch: 1, rows: rows, cols: groups * 32)
        XCTAssertEqual(s2, s)
        // ±0 codes (0x0, 0x8) decode alike; compare values.
        let d2 = b2.withUnsafeBytes { bb in s2.withUnsafeBytes { MXFP4.dequantize(blocks: bb, scales: $0, batch: 1, rows: rows, groups: groups) } }
        XCTAssertEqual(d2, d)
    }

    func testImportDequantizesFP8ExpertsAndCopiesDenseBytes() throws {
        let dir = temporaryDirectory(self)
        for scaleType in [SafetensorsDType.F32, .BF16] {
            let src = dir + "/fp8-\(scaleType)"
            let want = try fakeFP8Mixtral(src, scaleType: scaleType)
            let out = dir + "/m-\(scaleType).h5"
            try HFImport.run(directory: src, output: out)
            let r = try CheckpointReader(out)
            let l = try r.readLayer("model.layers.0.block_sparse_moe")
            for e in 0..<4 {
                let p = "model.layers.0.block_sparse_moe.experts.\(e)."
                XCTAssertEqual(l.experts[e].gate!.dense().data, want[p + "w1.weight"])
                XCTAssertEqual(l.experts[e].up.dense().data, want[p + "w3.weight"])
                XCTAssertEqual(l.experts[e].down.dense().data, want[p + "w2.weight"])
            }
            let entry = try HFExport.importEntry(r)
            XCTAssertEqual(entry["source_encoding"], ["format": "fp8_e4m3_block", "block_size": [16, 16], "scale_dtype": .string(scaleType.rawValue)])
            XCTAssertEqual(entry["expert_dtype"]?.stringValue, "F8_E4M3")
            let dense = try r.file.root.openGroup("dense")
            let q = try dense.openDataset("model.layers.0.self_attn.q_proj.weight")
            XCTAssertEqual(q.rawElementType, .f8_e4m3)
            XCTAssertEqual(try q.readRaw(), (0..<1600).map { UInt8($0 % 126) })
            XCTAssertEqual(try dense.openDataset("model.layers.0.self_attn.q_proj.weight_scale_inv").shape, [3, 3])
            XCTAssertFalse(try dense.datasetPaths().contains { $0.contains("experts") })
        }
    }

    /// `import --keep-fp8`: the release's expert codes and scales are stored as they are (FP8
    /// matrices, FORMAT.md §1), the layer reads back to the same values as the dequantizing
    /// import, at a quarter of the float32 bytes plus the scales, and `export` writes the release
    /// back byte for byte. A float release, or fused FP8 experts, is one error naming the flag.
    func testImportKeepFP8StoresTheReleaseCodes() throws {
        let dir = temporaryDirectory(self)
        let layer = "model.layers.0.block_sparse_moe"
        for scaleType in [SafetensorsDType.F32, .BF16] {
            let src = dir + "/fp8-\(scaleType)", out = dir + "/kept-\(scaleType).h5"
            let want = try fakeFP8Mixtral(src, scaleType: scaleType)
            let report = try HFImport.run(directory: src, output: out, keepFP8: true)
            XCTAssertEqual(report.expertEncoding, .fp8Block(rows: 16, cols: 16))
            let r = try CheckpointReader(out)
            let l = try r.readLayer(layer)
            XCTAssertEqual(l.expertEncoding, .fp8Block(rows: 16, cols: 16))
            let release = try readFolder(src)
            let eg = try r.file.root.openGroup("moe_layers/\(layer)/experts")
            for (role, m) in [("gate", "w1"), ("up", "w3"), ("down", "w2")] {
                for e in 0..<4 {
                    let name = "\(layer).experts.\(e).\(m).weight"
                    let op = role == "gate" ? l.experts[e].gate! : role == "up" ? l.experts[e].up : l.experts[e].down
                    XCTAssertEqual(op.dense().data, want[name], name)
                    XCTAssertEqual(try eg.openDataset(role).readRaw(rows: e..<(e + 1)), release[name]?.2, "\(name): the release's codes")
                }
            }
            // 4 experts × (24·40·3) codes + 4 × 3 matrices × 3·2 scale blocks × 4 B.
            XCTAssertEqual(try r.summary(layer).expertFileBytes, 4 * 24 * 40 * 3 + 4 * 3 * 6 * 4)
            let history = r.history
            XCTAssertEqual(history.first?["expert_encoding"]?.stringValue, "f8-block 16x16")
            let back = try HFExport.run(checkpoint: out, outputDirectory: dir + "/out-\(scaleType)")
            XCTAssertTrue(back.expertEncoding.hasPrefix("fp8_e4m3_block 16x16"), back.expertEncoding)
            let exported = try readFolder(dir + "/out-\(scaleType)")
            XCTAssertEqual(Set(release.keys), Set(exported.keys))
            for (k, v) in release {
                XCTAssertEqual(v.0, exported[k]?.0, k)
                XCTAssertTrue(v.2 == exported[k]?.2, "\(k) differs")
            }
        }
        // Blocks whose largest codes are small (below 64) are kept with the same values: a power
        // of two times their largest value is one of the codes the writer's scale search tries.
        let small = "\(layer).experts.1.w3.weight"
        _ = try fakeFP8Mixtral(dir + "/small", edit: { t in
            let i = t.firstIndex { $0.name == small }!
            t[i].bytes = t[i].bytes.map { ($0 & 0x80) | ($0 & 0x3F) }
        })
        try HFImport.run(directory: dir + "/small", output: dir + "/small-kept.h5", keepFP8: true)
        try HFImport.run(directory: dir + "/small", output: dir + "/small-floats.h5")
        XCTAssertEqual(try CheckpointReader(dir + "/small-kept.h5").readLayer(layer).experts,
                       try CheckpointReader(dir + "/small-floats.h5").readLayer(layer).experts)
        // Values that are not FP8 under any block scale are an error under `exactFP8` (naming the
        // dataset and the expert), not silently rounded; nothing is written.
        var rng = SplitMix64(seed: 3)
        func m(_ r: Int, _ c: Int) -> Matrix { Matrix(rows: r, cols: c, data: (0..<(r * c)).map { _ in Float(rng.nextDouble() - 0.5) }) }
        var floats = MoELayer(config: LayerConfig(name: "l", index: 0, numExperts: 2, topK: 1, dModel: 16, dFF: 16, expertType: .mlp,
                                                  activation: .relu, routerType: .softmax_topk),
                              router: m(2, 16), experts: [Expert(up: m(16, 16), down: m(16, 16)), Expert(up: m(16, 16), down: m(16, 16))])
        floats.expertEncoding = .fp8Block(rows: 16, cols: 16)
        let w = try CheckpointWriter(destination: dir + "/exact.h5", architecture: "test", history: [], entry: ["stage": "test"],
                                     options: WriteOptions(exactFP8: true))
        XCTAssertThrowsError(try w.write(floats)) { e in
            XCTAssertTrue("\(e)".contains("experts/up") && "\(e)".contains("expert 0") && "\(e)".contains("cannot be stored exactly"), "\(e)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/exact.h5"))
        let (t, c) = fakeModel(.mixtral, dtype: .BF16)
        try writeFakeModel(dir + "/bf16", t, config: c)
        XCTAssertThrowsError(try HFImport.run(directory: dir + "/bf16", output: dir + "/no.h5", keepFP8: true)) { e in
            XCTAssertEqual((e as? SMoEError)?.setting, .keepFP8)
            XCTAssertTrue("\(e)".contains("not block-scaled FP8"), "\(e)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/no.h5"))
    }

    func testMalformedFP8ScalesFailNamingTheTensor() throws {
        let dir = temporaryDirectory(self)
        let scale = "model.layers.0.block_sparse_moe.experts.1.w3.weight_scale_inv"
        let weight = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
        let cases: [(String, [String], (inout [FakeTensor]) -> Void)] = [
            ("shape", [scale, "shape [2, 2] does not match", "[2, 3]"], { t in
                let i = t.firstIndex { $0.name == scale }!
                t[i].shape = [2, 2]
                t[i].bytes = SafetensorsDType.F32.encode([1, 1, 1, 1])
            }),
            ("dtype", [scale, "I32", "must be F32, BF16, F16 or U8"], { t in
                let i = t.firstIndex { $0.name == scale }!
                t[i].dtype = .I32
            }),
            ("nan", [scale, "nan", "not a finite number"], { t in
                let i = t.firstIndex { $0.name == scale }!
                t[i].bytes = SafetensorsDType.F32.encode([1, .nan, 1, 1, 1, 1])
            }),
            ("inf", [scale, "inf", "not a finite number"], { t in
                let i = t.firstIndex { $0.name == scale }!
                t[i].bytes = SafetensorsDType.F32.encode([1, 1, 1, 1, 1, -.infinity])
            }),
            ("missing", [weight, "has no scale tensor"], { t in t.removeAll { $0.name == scale } }),
            ("orphan", ["experts.9.w3.weight_scale_inv", "without its weight"], { t in
                t.append(FakeTensor(name: "model.layers.0.block_sparse_moe.experts.9.w3.weight_scale_inv", dtype: .F32, shape: [1], bytes: SafetensorsDType.F32.encode([1])))
            }),
            ("weight dtype", [weight, "not F8_E4M3"], { t in
                let i = t.firstIndex { $0.name == weight }!
                t[i].dtype = .I8
            }),
        ]
        for (label, parts, edit) in cases {
            let src = dir + "/" + label.replacingOccurrences(of: " ", with: "-")
            _ = try fakeFP8Mixtral(src, edit: edit)
            let out = dir + "/\(label).h5"
            XCTAssertThrowsError(try HFImport.run(directory: src, output: out), label) { e in
                let m = "\(e)"
                XCTAssertFalse(m.contains("\n"), m)
                for p in parts { XCTAssertTrue(m.contains(p), "\(label): \(m) lacks \(p)") }
            }
            XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        }
    }

    func testUnmodifiedFP8RoundTripIsByteIdentical() throws {
        let dir = temporaryDirectory(self)
        for scaleType in [SafetensorsDType.F32, .BF16] {
            let src = dir + "/fp8-\(scaleType)"
            _ = try fakeFP8Mixtral(src, scaleType: scaleType)
            try HFImport.run(directory: src, output: dir + "/m.h5")
            let r = try HFExport.run(checkpoint: dir + "/m.h5", outputDirectory: dir + "/out-\(scaleType)")
            XCTAssertTrue(r.expertEncoding.hasPrefix("fp8_e4m3_block 16x16"), r.expertEncoding)
            let a = try readFolder(src), b = try readFolder(dir + "/out-\(scaleType)")
            XCTAssertEqual(Set(a.keys), Set(b.keys))
            for (k, v) in a {
                XCTAssertEqual(v.0, b[k]?.0, k)
                XCTAssertEqual(v.1, b[k]?.1, k)
                XCTAssertTrue(v.2 == b[k]?.2, "\(k) differs")
            }
            let config = try JSONValue.parse(String(contentsOfFile: dir + "/out-\(scaleType)/config.json", encoding: .utf8))
            XCTAssertEqual(config["quantization_config"]?["quant_method"]?.stringValue, "fp8")
            try FileManager.default.removeItem(atPath: dir + "/m.h5")
        }
    }

    func testExportF8BlockOfFloatCheckpointAndBackToFloats() throws {
        let dir = temporaryDirectory(self)
        let (t, c) = fakeModel(.mixtral, dtype: .BF16)
        try writeFakeModel(dir + "/src", t, config: c)
        try HFImport.run(directory: dir + "/src", output: dir + "/m.h5")
        let r = try HFExport.run(checkpoint: dir + "/m.h5", outputDirectory: dir + "/fp8", dtype: .f8Block)
        XCTAssertEqual(r.expertEncoding, "fp8_e4m3_block 128x128 (F32 scales)")
        let out = try readFolder(dir + "/fp8")
        let name = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
        XCTAssertEqual(out[name]?.0, .F8_E4M3)
        XCTAssertEqual(out[name + "_scale_inv"]?.1, [1, 1])
        XCTAssertEqual(out["model.layers.0.self_attn.q_proj.weight"]?.0, .BF16)  // dense untouched
        let config = try JSONValue.parse(String(contentsOfFile: dir + "/fp8/config.json", encoding: .utf8))
        let q = config["quantization_config"]
        XCTAssertEqual(q?["quant_method"]?.stringValue, "fp8")
        XCTAssertEqual(q?["weight_block_size"], [128, 128])
        let skip = q?["modules_to_not_convert"]?.arrayValue?.compactMap(\.stringValue) ?? []
        XCTAssertTrue(skip.contains("model.layers.0.self_attn.q_proj") && skip.contains("model.layers.1.block_sparse_moe.gate") && skip.contains("lm_head"), "\(skip)")
        // Each element within half an FP8 step of the source: |w − q·s| ≤ 2⁻⁴ |w| relative for normals
        // (3 mantissa bits) or half the smallest step 2⁻⁹ · s.
        let src = try SafetensorsModel(dir + "/src")
        let w = try src.floats(name)
        let s = try out[name + "_scale_inv"]!.2.withUnsafeBytes { SafetensorsDType.F32.decode($0) }[0]
        XCTAssertEqual(s, 1 / (448 / w.map(\.magnitude).max()!))
        for (x, b) in zip(w, out[name]!.2) {
            XCTAssertLessThanOrEqual(abs(x - FP8E4M3.decode(b) * s), max(x.magnitude / 16, 0x1p-10 * s) * 1.0001)
        }
        // Re-import: the FP8 folder dequantizes to those values; export bf16 drops quantization_config.
        try HFImport.run(directory: dir + "/fp8", output: dir + "/q.h5")
        let layer = try CheckpointReader(dir + "/q.h5").readLayer("model.layers.0.block_sparse_moe")
        XCTAssertEqual(layer.experts[1].down.dense().data, out[name]!.2.map { FP8E4M3.decode($0) * s })
        let r2 = try HFExport.run(checkpoint: dir + "/q.h5", outputDirectory: dir + "/bf16", dtype: .bf16)
        XCTAssertEqual(r2.expertEncoding, "BF16")
        let config2 = try JSONValue.parse(String(contentsOfFile: dir + "/bf16/config.json", encoding: .utf8))
        XCTAssertNil(config2["quantization_config"])
        XCTAssertEqual(try readFolder(dir + "/bf16")[name]?.0, .BF16)
        // MXFP4 is GPT-OSS's: refused for Mixtral, naming the setting.
        XCTAssertThrowsError(try HFExport.run(checkpoint: dir + "/q.h5", outputDirectory: dir + "/mx", dtype: .mxfp4)) { e in
            XCTAssertTrue("\(e)".contains("mxfp4 is GPT-OSS"), "\(e)")
        }
    }

    func testMXFP4GptOssImportExport() throws {
        let dir = temporaryDirectory(self)
        let E = 4, H = 64, I = 32
        var rng = SplitMix64(seed: 11)
        var tensors: [FakeTensor] = []
        func f(_ name: String, _ shape: [Int], _ dt: SafetensorsDType = .BF16) {
            let v = (0..<shape.reduce(1, *)).map { _ in Float(rng.nextGaussian()) * 0.5 }
            tensors.append(FakeTensor(name: name, dtype: dt, shape: shape, bytes: dt.encode(v)))
        }
        func u8(_ name: String, _ shape: [Int], _ gen: () -> UInt8) {
            tensors.append(FakeTensor(name: name, dtype: .U8, shape: shape, bytes: (0..<shape.reduce(1, *)).map { _ in gen() }))
        }
        let p = "model.layers.0.mlp"
        f("model.embed_tokens.weight", [16, H])
        f(p + ".router.weight", [E, H])
        f(p + ".router.bias", [E])
        u8(p + ".experts.gate_up_proj_blocks", [E, 2 * I, H / 32, 16]) { UInt8(truncatingIfNeeded: rng.next()) }
        u8(p + ".experts.gate_up_proj_scales", [E, 2 * I, H / 32]) { UInt8(120 + rng.next() % 8) }
        f(p + ".experts.gate_up_proj_bias", [E, 2 * I])
        u8(p + ".experts.down_proj_blocks", [E, H, I / 32, 16]) { UInt8(truncatingIfNeeded: rng.next()) }
        u8(p + ".experts.down_proj_scales", [E, H, I / 32]) { UInt8(120 + rng.next() % 8) }
        f(p + ".experts.down_proj_bias", [E, H])
        let config: [(String, JSONValue)] = [
            ("architectures", ["GptOssForCausalLM"]), ("model_type", "gpt_oss"), ("hidden_size", .int(H)), ("intermediate_size", .int(I)),
            ("num_local_experts", .int(E)), ("num_experts_per_tok", 2), ("num_hidden_layers", 1),
            ("quantization_config", ["quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]]),
        ]
        try writeFakeModel(dir + "/src", tensors, config: config)
        try HFImport.run(directory: dir + "/src", output: dir + "/m.h5")
        let r = try CheckpointReader(dir + "/m.h5")
        XCTAssertEqual(try HFExport.importEntry(r)["source_encoding"]?["format"]?.stringValue, "mxfp4")
        let layer = try r.readLayer(p)
        // Expert 2's gate row 5 = stored row 10 (even rows gate), up row 5 = stored row 11.
        let blocks = tensors.first { $0.name.hasSuffix("gate_up_proj_blocks") }!.bytes
        let scales = tensors.first { $0.name.hasSuffix("gate_up_proj_scales") }!.bytes
        let decoded = blocks.withUnsafeBytes { b in scales.withUnsafeBytes { MXFP4.dequantize(blocks: b, scales: $0, batch: E, rows: 2 * I, groups: H / 32) } }
        XCTAssertEqual(Array(layer.experts[2].gate!.dense().data[(5 * H)..<(6 * H)]), Array(decoded[((2 * 2 * I + 10) * H)..<((2 * 2 * I + 11) * H)]))
        XCTAssertEqual(Array(layer.experts[2].up.dense().data[(5 * H)..<(6 * H)]), Array(decoded[((2 * 2 * I + 11) * H)..<((2 * 2 * I + 12) * H)]))
        // Export writes MXFP4 again: every value the same, config kept; bf16 drops quantization_config.
        let x = try HFExport.run(checkpoint: dir + "/m.h5", outputDirectory: dir + "/mx")
        XCTAssertEqual(x.expertEncoding, "mxfp4")
        let out = try readFolder(dir + "/mx")
        XCTAssertEqual(out[p + ".experts.gate_up_proj_blocks"]?.1, [E, 2 * I, H / 32, 16])
        XCTAssertEqual(out[p + ".experts.down_proj_scales"]?.1, [E, H, I / 32])
        XCTAssertEqual(out[p + ".experts.down_proj_bias"]?.0, .BF16)
        XCTAssertNil(out[p + ".experts.gate_up_proj"])
        try HFImport.run(directory: dir + "/mx", output: dir + "/m2.h5")
        let again = try CheckpointReader(dir + "/m2.h5").readLayer(p)
        for e in 0..<E {
            XCTAssertEqual(again.experts[e].gate!.dense().data, layer.experts[e].gate!.dense().data)
            XCTAssertEqual(again.experts[e].down.dense().data, layer.experts[e].down.dense().data)
            XCTAssertEqual(again.experts[e].upBias, layer.experts[e].upBias)
        }
        _ = try HFExport.run(checkpoint: dir + "/m.h5", outputDirectory: dir + "/bf", dtype: .bf16)
        let bf = try readFolder(dir + "/bf")
        XCTAssertEqual(bf[p + ".experts.gate_up_proj"]?.1, [E, H, 2 * I])
        XCTAssertNil(try JSONValue.parse(String(contentsOfFile: dir + "/bf/config.json", encoding: .utf8))["quantization_config"])
        XCTAssertThrowsError(try HFExport.run(checkpoint: dir + "/m.h5", outputDirectory: dir + "/f8", dtype: .f8Block)) { e in
            XCTAssertTrue("\(e)".contains("f8-block"), "\(e)")
        }
        // A scale byte 255 (E8M0 NaN) is refused naming the tensor.
        var bad = tensors
        let i = bad.firstIndex { $0.name.hasSuffix("down_proj_scales") }!
        bad[i].bytes[3] = 255
        try writeFakeModel(dir + "/bad", bad, config: config)
        XCTAssertThrowsError(try HFImport.run(directory: dir + "/bad", output: dir + "/bad.h5")) { e in
            XCTAssertTrue("\(e)".contains("down_proj_scales") && "\(e)".contains("255"), "\(e)")
        }
    }

    func testFusedFP8ExpertsRoundTripAndCLI() throws {
        // Fused [E, 2I, H] experts (Qwen3-MoE as transformers 5 keeps them): f8-block writes them
        // per expert (X.weight + X.weight_scale_inv, the layout transformers dequantizes on load);
        // importing that folder and exporting it again gives the same bytes. A fused FP8 folder
        // (experts.gate_up_proj + experts.gate_up_proj_scale_inv [E, ⌈2I/b⌉, ⌈H/b⌉]) is read too.
        let dir = temporaryDirectory(self)
        let (t, c) = fakeModel(.qwen3Fused, dtype: .BF16)
        try writeFakeModel(dir + "/src", t, config: c)
        try HFImport.run(directory: dir + "/src", output: dir + "/m.h5")
        let r = try runCLI(["export", dir + "/m.h5", "-o", dir + "/fp8", "--dtype", "f8-block"])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertTrue(r.stdout.contains("per-expert experts in fp8_e4m3_block 128x128 (F32 scales)"), r.stdout)
        let a = try readFolder(dir + "/fp8")
        let g = "model.layers.1.mlp.experts.2.gate_proj.weight"
        XCTAssertEqual(a[g]?.0, .F8_E4M3)
        XCTAssertEqual(a[g + "_scale_inv"]?.1, [1, 1])
        XCTAssertNil(a["model.layers.1.mlp.experts.gate_up_proj"])
        try HFImport.run(directory: dir + "/fp8", output: dir + "/q.h5")
        let src = try SafetensorsModel(dir + "/src")
        let w = try src.floats("model.layers.1.mlp.experts.gate_up_proj")
        let got = try CheckpointReader(dir + "/q.h5").readLayer("model.layers.1.mlp")
        let per = fakeI * fakeH
        let s = a[g + "_scale_inv"]!.2.withUnsafeBytes { SafetensorsDType.F32.decode($0) }[0]
        XCTAssertEqual(s, 1 / (448 / w[(2 * 2 * per)..<(2 * 2 * per + per)].map(\.magnitude).max()!))
        XCTAssertEqual(got.experts[2].gate!.dense().data, a[g]!.2.map { FP8E4M3.decode($0) * s })
        _ = try HFExport.run(checkpoint: dir + "/q.h5", outputDirectory: dir + "/again")
        let b = try readFolder(dir + "/again")
        XCTAssertEqual(Set(a.keys), Set(b.keys))
        for (k, v) in a { XCTAssertTrue(v.2 == b[k]?.2, k) }
        // A fused FP8 folder: the stacked experts with a stacked grid [E, 1, 1].
        var fused: [FakeTensor] = t.filter { !$0.name.contains(".experts.") }
        var want: [Float] = []
        for l in [1, 2] {
            let p = "model.layers.\(l).mlp.experts."
            for (part, rows, cols) in [("gate_up_proj", 2 * fakeI, fakeH), ("down_proj", fakeH, fakeI)] {
                let v = try src.floats(p + part)
                let (q, sc, _) = FP8Block.quantize(v, batch: fakeE, rows: rows, cols: cols, block: (128, 128))
                fused.append(FakeTensor(name: p + part, dtype: .F8_E4M3, shape: [fakeE, rows, cols], bytes: q))
                // Layer 1, expert 2's gate: the first I rows of its [2I, H] matrix, scale sc[2].
                if l == 1 && part == "gate_up_proj" { want = q[(2 * rows * cols)..<(2 * rows * cols + per)].map { FP8E4M3.decode($0) * sc[2] } }
                fused.append(FakeTensor(name: p + part + "_scale_inv", dtype: .F32, shape: [fakeE, 1, 1], bytes: SafetensorsDType.F32.encode(sc)))
            }
        }
        try writeFakeModel(dir + "/fused", fused, config: c + [("quantization_config", ["quant_method": "fp8", "weight_block_size": [128, 128]])])
        try HFImport.run(directory: dir + "/fused", output: dir + "/f.h5")
        XCTAssertEqual(try CheckpointReader(dir + "/f.h5").readLayer("model.layers.1.mlp").experts[2].gate!.dense().data, want)
        // --keep-fp8: refused for the fused folder (one line naming the flag), taken for the
        // per-expert one, whose layer then reads back to the same values.
        let fusedKeep = try runCLI(["import", dir + "/fused", "-o", dir + "/fk.h5", "--keep-fp8"])
        XCTAssertNotEqual(fusedKeep.status, 0)
        XCTAssertTrue(fusedKeep.stderr.hasPrefix("error: --keep-fp8: the FP8 experts of"), fusedKeep.stderr)
        XCTAssertEqual(fusedKeep.stderr.split(separator: "\n").count, 1, fusedKeep.stderr)
        let keep = try runCLI(["import", dir + "/fp8", "-o", dir + "/k.h5", "--keep-fp8"])
        XCTAssertEqual(keep.status, 0, keep.stderr)
        XCTAssertTrue(keep.stdout.contains("expert matrices kept as FP8 (f8-block 128x128"), keep.stdout)
        XCTAssertEqual(try CheckpointReader(dir + "/k.h5").readLayer("model.layers.1.mlp").experts,
                       try CheckpointReader(dir + "/q.h5").readLayer("model.layers.1.mlp").experts)
        // A bad --dtype is one line naming the option and the choices.
        let bad = try runCLI(["export", dir + "/m.h5", "-o", dir + "/x", "--dtype", "fp4"])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertEqual(bad.stderr, "error: The value 'fp4' is invalid for '--dtype <dtype>'. Please provide one of the following: auto, f32, f16, bf16, f8-block, mxfp4\n")
        let gpt = try runCLI(["export", dir + "/m.h5", "-o", dir + "/x", "--dtype", "mxfp4"])
        XCTAssertNotEqual(gpt.status, 0)
        XCTAssertTrue(gpt.stderr.hasPrefix("error: --dtype: mxfp4 is GPT-OSS's expert encoding"), gpt.stderr)
        XCTAssertEqual(gpt.stderr.split(separator: "\n").count, 1, gpt.stderr)
    }
}
