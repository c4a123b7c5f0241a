import Foundation
import XCTest
@testable import SMoECompress

/// Block-scaled FP8 experts in a checkpoint (docs/FORMAT.md §1, `ExpertEncoding.fp8Block`) and
/// the planner's FP8 option (`compress --target-size F --fp8`, ALGORITHM.md §4.3).
final class FP8CheckpointTests: XCTestCase {
    /// A seeded GLU layer of 3 experts, d_model 40, d_ff 24 (16 × 16 blocks leave partial edge
    /// blocks), weights spread over six orders of magnitude so that some blocks need subnormals.
    func layer(seed: UInt64 = 11) -> MoELayer {
        var rng = SplitMix64(seed: seed)
        let d = 40, f = 24, E = 3
        func m(_ r: Int, _ c: Int) -> Matrix {
            Matrix(rows: r, cols: c, data: (0..<(r * c)).map { _ in
                Float(rng.nextDouble() - 0.5) * Float(sign: .plus, exponent: -Int(rng.next() % 20), significand: 1)
            })
        }
        let config = LayerConfig(name: "layers.0.moe", index: 0, numExperts: E, topK: 2, dModel: d, dFF: f, expertType: .glu,
                                 activation: .silu, routerType: .softmax_topk_norm)
        var l = MoELayer(config: config, router: m(E, d), experts: (0..<E).map { _ in Expert(up: m(f, d), gate: m(f, d), down: m(d, f)) })
        for e in 0..<E { l.experts[e].downBias = (0..<d).map { Float($0 + e) / 8 } }
        return l
    }

    func write(_ layers: [MoELayer], to path: String, dtype: StorageType = .f16, streaming: Bool = false) throws {
        let w = try CheckpointWriter(destination: path, architecture: "test", history: [], entry: ["stage": "test"],
                                     options: WriteOptions(dtype: dtype))
        for l in layers { if streaming { try w.write(LayerSource(l)) } else { try w.write(l) } }
        try w.commit()
    }

    /// Written as FP8 and read back, every expert matrix is what `roundedForStorage` promised
    /// (the reader's dequantization of the writer's bytes), within e4m3's rounding of the
    /// original: half a step (2⁻⁴ relative) for normal values, 2⁻¹⁰ of the block scale for
    /// subnormal ones. The bytes are one per weight plus one float32 per block, and `inspect`'s
    /// figures, the in-memory `expertBytes` and the file agree.
    func testFP8ExpertsRoundTripWithinE4M3Rounding() throws {
        let dir = temporaryDirectory(self)
        var l = layer()
        l.expertEncoding = .fp8Block(rows: 16, cols: 16)
        try write([l], to: dir + "/a.h5")
        let r = try CheckpointReader(dir + "/a.h5")
        let back = try r.readLayer(l.name)
        XCTAssertEqual(back.expertEncoding, .fp8Block(rows: 16, cols: 16))
        let expected = l.roundedForStorage(.f16)
        XCTAssertEqual(back, expected, "read back = roundedForStorage (FP8 matrices, f16 router and biases)")
        let eg = try r.file.root.openGroup("moe_layers/\(l.name)/experts")
        for (e, x) in l.experts.enumerated() {
            for (name, op) in x.namedMatrices {
                let w = op.dense(), q = back.experts[e][matrix: name]!.dense()
                let scales = try eg.openDataset(name + "_scale").readFloats(rows: e..<(e + 1))
                let gc = (w.cols + 15) / 16
                for i in 0..<w.rows {
                    for j in 0..<w.cols {
                        let a = w[i, j], b = q[i, j], s = scales[(i / 16) * gc + j / 16]
                        let bound = max(a.magnitude * 0x1p-4, s * 0x1p-10) * (1 + 1e-6)
                        XCTAssertLessThanOrEqual((a - b).magnitude, bound, "expert \(e) \(name)[\(i), \(j)]: \(a) → \(b), scale \(s)")
                    }
                }
            }
        }
        // 2 × 24 × 40 + 40 × 24 weights per expert = 2,880 bytes; blocks: up and gate 2 × 3, down 3 × 2.
        let perExpert = 3 * 24 * 40 + 3 * 6 * 4
        let summary = try r.summary(l.name)
        XCTAssertEqual(summary.expertFileBytes, 3 * perExpert + 3 * 40 * 2, "FP8 matrices, their scales, and the f16 down bias")
        XCTAssertEqual(summary.expertFileBytes, expected.expertBytes(floatBytes: 2), "in memory as in the file")
        XCTAssertEqual(summary.matrices.map(\.encoding), [.fp8Block(rows: 16, cols: 16), .fp8Block(rows: 16, cols: 16), .fp8Block(rows: 16, cols: 16)])
        XCTAssertEqual(try r.expertStorage(), .f16, "the file's float type, from the router")
        let inspect = try runCLI(["inspect", "--json", dir + "/a.h5"])
        XCTAssertEqual(inspect.status, 0, inspect.stderr)
        XCTAssertTrue(inspect.stdout.contains("\"dtype\": \"f8_e4m3\"") && inspect.stdout.contains("\"block_size\""), inspect.stdout)
    }

    /// Writing a layer read from an FP8 file again keeps its encoding and its bytes exactly (the
    /// quantizer keeps a scale that represents the block), and the streaming writer (one expert
    /// at a time) stores the same bytes as the whole-layer one.
    func testRewritingIsByteIdenticalAndStreamingMatches() throws {
        let dir = temporaryDirectory(self)
        var l = layer(seed: 5)
        l.expertEncoding = .fp8
        try write([l], to: dir + "/a.h5")
        try write([l], to: dir + "/s.h5", streaming: true)
        let again = try CheckpointReader(dir + "/a.h5").readLayer(l.name)
        try write([again], to: dir + "/b.h5")
        func raw(_ p: String) throws -> [[UInt8]] {
            let eg = try H5File.open(p).root.openGroup("moe_layers/\(l.name)/experts")
            return try ["up", "gate", "down"].flatMap { [try eg.openDataset($0).readRaw(), try eg.openDataset($0 + "_scale").readRaw()] }
        }
        let a = try raw(dir + "/a.h5")
        XCTAssertEqual(a, try raw(dir + "/b.h5"), "read → write is byte-identical")
        XCTAssertEqual(a, try raw(dir + "/s.h5"), "streaming write = whole-layer write")
        XCTAssertEqual(try CheckpointReader(dir + "/s.h5").readLayer(l.name), again)
    }

    /// A factored matrix cannot be FP8 (the writer refuses, naming the layer), and damaged FP8
    /// datasets are one error naming the file and the dataset.
    func testRefusalsAndDamagedFP8Datasets() throws {
        let dir = temporaryDirectory(self)
        var f = layer()
        f.expertEncoding = .fp8
        f.experts[0].down = .factored(LowRankSparse.exact(f.experts[0].down.dense()))
        XCTAssertThrowsError(try write([f], to: dir + "/f.h5")) { XCTAssertTrue("\($0)".contains("factored"), "\($0)") }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/f.h5"))

        var l = layer()
        l.expertEncoding = .fp8Block(rows: 16, cols: 16)
        try write([l], to: dir + "/good.h5")
        func damaged(_ name: String, _ edit: (H5Group) throws -> Void, mentions: [String]) throws {
            let p = dir + "/" + name + ".h5"
            try FileManager.default.copyItem(atPath: dir + "/good.h5", toPath: p)
            do { try edit(try H5File.open(p, writable: true).root.openGroup("moe_layers/\(l.name)/experts")) }
            let r = try runCLI(["inspect", "--check", p])
            XCTAssertEqual(r.status, 1, r.stderr)
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            for m in [p] + mentions { XCTAssertTrue(r.stderr.contains(m), "'\(m)' not in: \(r.stderr)") }
        }
        try damaged("noscale", { try $0.delete("gate_scale") }, mentions: ["experts/gate_scale", "missing"])
        try damaged("nanscale", { g in
            let d = try g.openDataset("down_scale")
            var v = try d.readFloats()
            v[4] = .nan
            try d.write(floats: v)
        }, mentions: ["experts/down_scale", "NaN"])
        try damaged("shape", { g in
            try g.delete("up_scale")
            try g.write("up_scale", floats: [Float](repeating: 1, count: 3 * 2 * 2), shape: [3, 2, 2])
        }, mentions: ["experts/up_scale", "shape"])
        try damaged("block", { try $0.openDataset("up").setAttribute("block_size", [0, 16]) }, mentions: ["experts/up@block_size"])
        try damaged("mixed", { g in
            try g.delete("down")
            try g.delete("down_scale")
            try g.write("down", floats: [Float](repeating: 0, count: 3 * 40 * 24), shape: [3, 40, 24], as: .f16)
        }, mentions: ["experts/down", "encoding"])
        try damaged("nanbyte", { g in
            let d = try g.openDataset("gate")
            var b = try d.readRaw(rows: 1..<2)
            b[7] = 0x7F
            try d.writeRaw(b, rows: 1..<2)
        }, mentions: ["experts/gate", "NaN"])
    }

    /// The planner's FP8 option, end to end on trained-switch at a third of the expert bytes:
    /// every option it measures in FP8 is a dense one at one byte per weight plus the block
    /// scales; the run writes exactly the planned bytes, FP8 where the plan says so, and its
    /// held-out error is below the best plan without FP8 (the FP8 originals alone are about 0.02
    /// from the original, §4.3; merges and factorings at a third of the bytes are far above).
    func testPlannerTakesFP8WhereItPays() throws {
        let model = try CheckpointReader(fixture("trained-switch.h5"))
        let calib = try CalibrationReader(fixture("trained-switch.calib.h5"))
        let heldout = try CalibrationReader(fixture("trained-switch.heldout.h5"))
        func run(fp8: Bool) throws -> (CompressReport, SizePlan, [MoELayer]) {
            var planner = PlannerSettings(target: .fraction(0.35), groupCandidates: [4, 6, 8])
            planner.levels = 8
            planner.fp8 = fp8
            var settings = CompressSettings(merge: MergeSettings(groups: 1), lowRank: nil)
            settings.target = planner
            let stage = try CompressStage(model: model, calibration: calib, evaluation: heldout, stats: nil, settings: settings, storage: .f16)
            var written: [MoELayer] = []
            let reports = try stage.run(model: model) { written.append($0) }.reports
            return (stage.report(reports), stage.plan!, written)
        }
        let (withFP8, plan, layers) = try run(fp8: true)
        let (without, _, _) = try run(fp8: false)
        XCTAssertTrue(plan.layers.contains { $0.encoding.isFP8 }, "\(plan.json.serialized())")
        for c in plan.candidates.joined() where c.encoding.isFP8 { XCTAssertEqual(c.ranks, "dense") }
        XCTAssertEqual(withFP8.bytesFinal, plan.bytes, "the run stores what was planned")
        XCTAssertLessThanOrEqual(plan.bytes, plan.budget)
        for (p, l) in zip(plan.layers, layers.filter { plan[$0.name] != nil }) {
            XCTAssertEqual(l.expertEncoding, p.encoding, p.name)
            // d_model 64, d_ff 128 (TRAINED.md): per expert 2 · 64 · 128 bytes and one block per matrix.
            if p.encoding.isFP8 { XCTAssertEqual(p.bytes, l.numStored * (2 * 64 * 128 + 2 * 4) + (l.experts.first?.downBias.map { $0.count * 2 * l.numStored } ?? 0)) }
        }
        XCTAssertLessThan(withFP8.evaluation.meanRelativeError, without.evaluation.meanRelativeError)
    }

    /// A checkpoint whose every layer stores FP8 experts exports under `auto` as a block-scaled
    /// FP8 folder with the stored codes and scales unchanged (what the plan measured is what is
    /// served, at one byte per weight); one float layer among them exports floats, as before.
    func testAllFP8CheckpointExportsItsCodesUnderAuto() throws {
        let dir = temporaryDirectory(self)
        let (t, c) = fakeModel(.mixtral, dtype: .BF16)
        try writeFakeModel(dir + "/src", t, config: c)
        try HFImport.run(directory: dir + "/src", output: dir + "/m.h5")
        let source = try CheckpointReader(dir + "/m.h5")
        func rewrite(_ path: String, fp8: (String) -> Bool) throws {
            let w = try CheckpointWriter(destination: path, derivedFrom: source, entry: ["stage": "test"], options: WriteOptions(dtype: .bf16))
            for l in source.layers {
                var layer = try source.readLayer(l.name)
                if fp8(l.name) { layer.expertEncoding = .fp8 }
                try w.write(layer)
            }
            try w.commit()
        }
        try rewrite(dir + "/f8.h5") { _ in true }
        let r = try HFExport.run(checkpoint: dir + "/f8.h5", outputDirectory: dir + "/out")
        XCTAssertEqual(r.expertEncoding, "fp8_e4m3_block 128x128 (F32 scales)")
        let out = try readFolder(dir + "/out")
        let config = try JSONValue.parse(String(contentsOfFile: dir + "/out/config.json", encoding: .utf8))
        XCTAssertEqual(config["quantization_config"]?["quant_method"]?.stringValue, "fp8")
        let f8 = try CheckpointReader(dir + "/f8.h5")
        let layer = f8.layers[0].name
        let eg = try f8.file.root.openGroup("moe_layers/\(layer)/experts")
        for (role, m) in [("w1", "gate"), ("w3", "up"), ("w2", "down")] {
            for e in 0..<f8.layers[0].numExperts {
                let name = "\(layer).experts.\(e).\(role).weight"
                XCTAssertEqual(out[name]?.0, .F8_E4M3, name)
                XCTAssertEqual(out[name]?.2, try eg.openDataset(m).readRaw(rows: e..<(e + 1)), "\(name): the stored codes")
                XCTAssertEqual(out[name + "_scale_inv"]?.2, SafetensorsDType.F32.encode(try eg.openDataset(m + "_scale").readFloats(rows: e..<(e + 1))))
            }
        }
        try rewrite(dir + "/mixed.h5") { $0 != source.layers[0].name }
        XCTAssertEqual(try HFExport.run(checkpoint: dir + "/mixed.h5", outputDirectory: dir + "/mixed").expertEncoding, "BF16")
        // --dtype f8-block serves every layer in FP8: the float layer quantized, an FP8 layer's codes as stored.
        try HFExport.run(checkpoint: dir + "/mixed.h5", outputDirectory: dir + "/mixed8", dtype: .f8Block)
        let mixed = try CheckpointReader(dir + "/mixed.h5"), out8 = try readFolder(dir + "/mixed8")
        let l1 = mixed.layers[1].name
        let stored = try mixed.file.root.openGroup("moe_layers/\(l1)/experts").openDataset("down").readRaw(rows: 0..<1)
        XCTAssertEqual(out8["\(l1).experts.0.w2.weight"]?.2, stored)
        XCTAssertEqual(out8["\(mixed.layers[0].name).experts.0.w2.weight"]?.0, .F8_E4M3)
    }

    /// `compress --fp8` without a target stores every merged layer in FP8: a compact merge to 4
    /// experts is then a quarter of the float16 bytes plus the block scales, in the checkpoint and
    /// in the export (`auto` writes the stored codes), and its reported errors are those of the
    /// FP8 layers (a little above the float16 merge's). With low rank it is refused, naming --fp8.
    func testCompressFP8WithoutATarget() throws {
        let dir = temporaryDirectory(self)
        let common = ["compress", fixture("trained-mixtral.h5"), "--calib", fixture("trained-mixtral.calib.h5"),
                      "--groups", "4", "--router", "compact", "--max-tokens", "512", "--json"]
        let f8 = try runCLI(common + ["--fp8", "-o", dir + "/f8.h5"])
        XCTAssertEqual(f8.status, 0, f8.stderr)
        let f16 = try runCLI(common + ["-o", dir + "/f16.h5"])
        func report(_ r: CLIResult) throws -> JSONValue { try JSONValue.parse(r.stdout)["report"]! }
        // 4 layers × 4 experts × (3 matrices of 64 × 128 bytes + one 4-byte scale each).
        XCTAssertEqual(try report(f8)["expert_bytes_final"]?.intValue, 4 * 4 * (3 * 8192 + 12))
        XCTAssertEqual(try CheckpointReader(dir + "/f8.h5").summary("model.layers.0.block_sparse_moe").expertFileBytes, 4 * (3 * 8192 + 12))
        let e8 = try report(f8)["mean_relative_error_final"]!.doubleValue!, e16 = try report(f16)["mean_relative_error_final"]!.doubleValue!
        XCTAssertGreaterThan(e8, e16)
        XCTAssertLessThan(e8, e16 + 0.02, "FP8 adds ~2⁻⁵ relative per weight")
        let export = try runCLI(["export", dir + "/f8.h5", "-o", dir + "/out", "--json"])
        XCTAssertEqual(export.status, 0, export.stderr)
        XCTAssertEqual(try readFolder(dir + "/out")["model.layers.0.block_sparse_moe.experts.3.w2.weight"]?.0, .F8_E4M3)
        let refused = try runCLI(common + ["--fp8", "--rank", "8", "-o", dir + "/r.h5"])
        XCTAssertEqual(refused.status, 1)
        XCTAssertTrue(refused.stderr.hasPrefix("error: --fp8"), refused.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/r.h5"))
    }

    /// Every stage that computes new experts from an FP8 checkpoint writes them in the file's
    /// float type (merge, prune, low rank, align); a layer a run leaves alone keeps its FP8 bytes.
    func testStagesOnAnFP8CheckpointWriteFloats() throws {
        let dir = temporaryDirectory(self)
        let source = try CheckpointReader(fixture("trained-mixtral.h5"))
        let w = try CheckpointWriter(destination: dir + "/f8.h5", derivedFrom: source, entry: ["stage": "test"], options: WriteOptions(dtype: .f16))
        for l in source.layers {
            var layer = try source.readLayer(l.name)
            layer.expertEncoding = .fp8
            try w.write(layer)
        }
        try w.commit()
        let calib = fixture("trained-mixtral.calib.h5"), first = source.layers[0].name, second = source.layers[1].name
        // Pruning makes compact layers, so it runs on every layer (one expert count).
        let few = ["--max-tokens", "256"]
        for (name, args) in [("merge", ["merge", "--calib", calib, "--groups", "4", "--layers", first] + few),
                             ("prune", ["merge", "--calib", calib, "--groups", "4", "--prune", "frequency"] + few),
                             ("lowrank", ["lowrank", "--rank", "8", "--layers", first]), ("align", ["align", "--layers", first])] {
            let out = dir + "/\(name).h5"
            let r = try runCLI(args.prefix(1) + [dir + "/f8.h5"] + args.dropFirst() + ["-o", out])
            XCTAssertEqual(r.status, 0, "\(name): \(r.stderr)")
            guard r.status == 0 else { continue }
            let reader = try CheckpointReader(out)
            XCTAssertEqual(try reader.summary(first).matrices.map(\.encoding), [.float, .float, .float], name)
            if name != "prune" {
                XCTAssertEqual(try reader.summary(second).matrices.first?.encoding, .fp8, "\(name): a layer left alone stays FP8")
            }
        }
    }
}
