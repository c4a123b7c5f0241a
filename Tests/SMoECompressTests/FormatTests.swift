import XCTest
@testable import SMoECompress

final class FormatTests: XCTestCase {
    func layerPair(_ seed: UInt64) -> [MoELayer] {
        var rng = SplitMix64(seed: seed)
        var a = randomLayer(&rng, type: .mlp, router: .softmax_topk, activation: .relu, E: 4, k: 1, biases: true)
        a.config.name = "encoder.block.1.layer.1.mlp"
        var b = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 6, G: 3, k: 2)
        b.config.name = "model.layers.1.block_sparse_moe"
        b.config.index = 1
        // One factored matrix in b.
        let w = b.experts[1].up.dense()
        b.experts[1].up = .factored(LowRankSparse(u: randomMatrix(w.rows, 2, &rng), v: randomMatrix(2, w.cols, &rng),
                                                  s: CSRMatrix.from(w) { i, j in i == j }))
        for g in [0, 2] { b.experts[g].up = .factored(LowRankSparse(u: randomMatrix(w.rows, 4, &rng), v: randomMatrix(4, w.cols, &rng), s: .empty(rows: w.rows, cols: w.cols))) }
        return [a, b]
    }

    func testCheckpointRoundTripFloat32IsExact() throws {
        let dir = temporaryDirectory(self)
        let layers = layerPair(1)
        let w = try CheckpointWriter(destination: dir + "/m.h5", architecture: "test", history: [["stage": "a"]], entry: ["stage": "b", "x": 1])
        for l in layers { try w.write(l) }
        try w.root.write("dense/emb", floats: [1, 2, 3, 4], shape: [2, 2])
        try w.commit()
        let r = try CheckpointReader(dir + "/m.h5")
        XCTAssertEqual(r.layers.map(\.name), layers.map(\.name))
        XCTAssertEqual(r.history.count, 2)
        XCTAssertEqual(r.history[1]["x"], 1)
        for l in layers { XCTAssertEqual(try r.readLayer(l.name), l, l.name) }
        // Derived writer copies /dense verbatim and appends history.
        let w2 = try CheckpointWriter(destination: dir + "/m2.h5", derivedFrom: r, entry: ["stage": "c"])
        try w2.write(layers[0])
        try w2.commit()
        let r2 = try CheckpointReader(dir + "/m2.h5")
        XCTAssertEqual(r2.history.map { $0["stage"]?.stringValue ?? "" }, ["a", "b", "c"])
        XCTAssertEqual(try r2.file.root.openDataset("dense/emb").readFloats(), [1, 2, 3, 4])
        // No temporary files left behind.
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir).sorted(), ["m.h5", "m2.h5"])
    }

    func testFloat16WriteRoundsToNearestEven() throws {
        let dir = temporaryDirectory(self)
        let layers = layerPair(2)
        let w = try CheckpointWriter(destination: dir + "/h.h5", architecture: "t", history: [], entry: ["stage": "t"],
                                     options: WriteOptions(dtype: .f16))
        for l in layers { try w.write(l) }
        try w.commit()
        let r = try CheckpointReader(dir + "/h.h5")
        let back = try r.readLayer(layers[0].name)
        let want = layers[0].experts[0].up.dense().data.map { Float(Float16($0)) }
        XCTAssertEqual(back.experts[0].up.dense().data, want)
        // Exact ties: 1 + 2^-11 is halfway between two halves and must round to even (1.0).
        let f = try H5File.create(dir + "/t.h5")
        let ties: [Float] = [1 + 0x1p-11, 1 + 3 * 0x1p-11, 65520, -65520]
        try f.root.write("t", floats: ties, shape: [4], as: .f16)
        XCTAssertEqual(try f.root.openDataset("t").readFloats(), [1, 1 + 4 * 0x1p-11, .infinity, -.infinity])
    }

    func testBFloat16AndFloat64Read() throws {
        let dir = temporaryDirectory(self)
        let f = try H5File.create(dir + "/b.h5")
        let v: [Float] = [1, -2.5, 3.140625, 1e-3]
        try f.root.write("bf", floats: v, shape: [4], as: .bf16)
        try f.root.write("d", doubles: v.map(Double.init), shape: [4])
        let bf = try f.root.openDataset("bf")
        XCTAssertEqual(bf.storage, .bf16)
        XCTAssertEqual(try bf.readFloats(), v.map { Float(bitPattern: UInt32(bfloat16Bits($0)) << 16) })
        XCTAssertEqual(try f.root.openDataset("d").readFloats(), v)
    }

    func testCalibrationRoundTripAndBlocks() throws {
        let dir = temporaryDirectory(self)
        var rng = SplitMix64(seed: 3)
        let x = randomMatrix(37, 5, &rng)
        let w = try CalibrationWriter(destination: dir + "/c.h5", source: "test")
        try w.write(layer: "l0", index: 0, hiddenStates: x, output: x)
        try w.commit()
        let c = try CalibrationReader(dir + "/c.h5")
        XCTAssertEqual(try c.hiddenStates("l0"), x)
        var rows: [Matrix] = []
        try c.forEachBlock("l0", blockSize: 10) { start, b in
            XCTAssertEqual(start, rows.reduce(0) { $0 + $1.rows })
            rows.append(b)
        }
        XCTAssertEqual(rows.map(\.rows), [10, 10, 10, 7])
        XCTAssertEqual(Matrix.vstack(rows), x)
    }

    func testJSONRoundTrip() throws {
        let v: JSONValue = ["b": 1, "a": [1.5, "x\n\"y", true, .null], "c": ["z": -2]]
        XCTAssertEqual(try JSONValue.parse(v.serialized()), v)
        XCTAssertEqual(try JSONValue.parse(v.serialized(pretty: true)), v)
        XCTAssertThrowsError(try JSONValue.parse("{\"a\": }"))
    }

    /// h5py reads our files (values, str attributes) and we read h5py's (float16 gzip chunks).
    func testH5pyInterop() throws {
        try XCTSkipUnless(pythonHas("h5py"), "h5py is not importable")
        let dir = temporaryDirectory(self)
        let layers = layerPair(4)
        let w = try CheckpointWriter(destination: dir + "/ours.h5", architecture: "test", history: [], entry: ["stage": "t"],
                                     options: WriteOptions(dtype: .f16, gzip: 4))
        for l in layers { try w.write(l) }
        try w.commit()
        let up0 = layers[0].experts[2].up.dense().data
        let out = try runPython("""
            import sys, h5py, numpy as np, json
            f = h5py.File(sys.argv[1], 'r')
            assert isinstance(f.attrs['format'], str), type(f.attrs['format'])
            assert f.attrs['format'] == 'smoe-checkpoint'
            json.loads(f.attrs['history'])
            up = f['moe_layers/encoder.block.1.layer.1.mlp/experts/up']
            assert up.dtype == np.float16 and up.chunks == (1,) + up.shape[1:], (up.dtype, up.chunks)
            print(json.dumps([float(v) for v in up[2].ravel()]))
            g = f['moe_layers/model.layers.1.block_sparse_moe/experts/up/1']
            assert g.attrs['rank'] == 2 and g['S_indptr'].dtype == np.int64 and g['S_indices'].dtype == np.int32
            f2 = h5py.File(sys.argv[2], 'w')
            f2.attrs['format'] = 'smoe-calibration'
            f2.attrs['format_version'] = 1
            x = (np.arange(40 * 6, dtype=np.float32).reshape(40, 6) / 7).astype(np.float16)
            f2.create_dataset('moe_layers/l/hidden_states', data=x, chunks=(8, 6), compression='gzip', shuffle=True)
            f2['moe_layers/l'].attrs['index'] = 0
            f2.close()
            """, [dir + "/ours.h5", dir + "/theirs.h5"])
        let got = try JSONValue.parse(out).arrayValue!.map { Float($0.doubleValue!) }
        XCTAssertEqual(got, up0.map { Float(Float16($0)) })
        let c = try CalibrationReader(dir + "/theirs.h5")
        let x = try c.hiddenStates("l", rows: 5..<9)
        XCTAssertEqual(x[0, 1], Float(Float16(Float(5 * 6 + 1) / 7)))
    }
}
