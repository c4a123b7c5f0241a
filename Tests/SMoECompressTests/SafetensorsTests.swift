import Foundation
import XCTest
@testable import SMoECompress

/// Builds a safetensors file by hand (header text and data bytes given verbatim), for
/// malformed-file tests.
func handMadeSafetensors(_ path: String, header: String, data: [UInt8], headerLength: UInt64? = nil) {
    var bytes: [UInt8] = []
    let h = Array(header.utf8)
    var len = (headerLength ?? UInt64(h.count)).littleEndian
    withUnsafeBytes(of: &len) { bytes += $0 }
    bytes += h
    bytes += data
    _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
}

final class SafetensorsTests: XCTestCase {
    func testWriterReaderRoundTripAllDTypes() throws {
        let dir = temporaryDirectory(self)
        let path = dir + "/t.safetensors"
        let w = try SafetensorsWriter(destination: path, metadata: [("format", "pt")])
        var expected: [String: (SafetensorsDType, [Int], [UInt8])] = [:]
        var rng = SplitMix64(seed: 7)
        for (i, dt) in SafetensorsDType.allCases.enumerated() {
            let shape = i % 3 == 0 ? [] : [2, i % 4 + 1]
            let n = shape.reduce(1, *) * dt.byteSize
            var bytes = (0..<n).map { _ in UInt8(rng.nextInt(below: 256)) }
            if dt == .BOOL { bytes = bytes.map { $0 & 1 } }
            let name = "t\(i).\(dt.rawValue.lowercased())"
            try w.add(name, dtype: dt, shape: shape, bytes: bytes)
            expected[name] = (dt, shape, bytes)
        }
        try w.add("empty", dtype: .F32, shape: [0, 3], bytes: [])
        try w.commit()
        let raw = try Data(contentsOf: URL(fileURLWithPath: path))
        let hlen = raw.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
        XCTAssertEqual(hlen % 8, 0, "header padded to 8 bytes")
        let f = try SafetensorsFile(path)
        XCTAssertEqual(f.metadata.map(\.0), ["format"])
        XCTAssertEqual(f.metadata.first?.1, "pt")
        XCTAssertEqual(f.tensors.count, expected.count + 1)
        for (name, (dt, shape, bytes)) in expected {
            let info = try f.info(name)
            XCTAssertEqual(info.dtype, dt)
            XCTAssertEqual(info.shape, shape)
            XCTAssertEqual(try f.bytes(name), bytes, name)
        }
        XCTAssertEqual(try f.info("empty").shape, [0, 3])
        XCTAssertEqual(try f.floats("empty"), [])
        // No temporary files left behind.
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["t.safetensors"])
    }

    func testFloatDecodingAndEncoding() throws {
        let dir = temporaryDirectory(self)
        let path = dir + "/f.safetensors"
        let values: [Float] = [0, 1, -2.5, 0.1, 1e-3, 65504, -0.0]
        let w = try SafetensorsWriter(destination: path)
        for dt in [SafetensorsDType.F32, .F16, .BF16, .F64] {
            try w.add(dt.rawValue, dtype: dt, shape: [values.count], floats: values)
        }
        try w.commit()
        let f = try SafetensorsFile(path)
        XCTAssertEqual(try f.floats("F32"), values)
        XCTAssertEqual(try f.floats("F64"), values)
        XCTAssertEqual(try f.floats("F16"), values.map { Float(Float16($0)) })
        XCTAssertEqual(try f.floats("BF16"), values.map { Float(bitPattern: UInt32(bfloat16Bits($0)) << 16) })
        XCTAssertThrowsError(try SafetensorsFile(path).floats("nope"))
    }

    func testReadsFilesWrittenByPythonSafetensors() throws {
        try XCTSkipUnless(pythonHas("safetensors.numpy"), "python safetensors not installed")
        let dir = temporaryDirectory(self)
        let path = dir + "/py.safetensors"
        _ = try runPython("""
            import sys, numpy as np
            from safetensors.numpy import save_file
            a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
            save_file({"a": a, "b": a.astype(np.float16), "c": np.array([1, -2, 3], dtype=np.int64),
                       "d": np.array([True, False]), "e": np.zeros((0,), np.float32)}, sys.argv[1], metadata={"format": "np"})
            """, [path])
        let f = try SafetensorsFile(path)
        let a = (0..<12).map { Float($0) / 7 }
        XCTAssertEqual(try f.floats("a"), a)
        XCTAssertEqual(try f.floats("b"), a.map { Float(Float16($0)) })
        XCTAssertEqual(try f.info("c").dtype, .I64)
        XCTAssertEqual(try f.bytes("c"), [1, 0, 0, 0, 0, 0, 0, 0, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 3, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(try f.info("d").dtype, .BOOL)
        XCTAssertEqual(try f.bytes("d"), [1, 0])
        XCTAssertEqual(f.metadata.first?.1, "np")

        // And python reads what the Swift writer writes.
        let out = dir + "/swift.safetensors"
        let w = try SafetensorsWriter(destination: out, metadata: [("format", "pt")])
        try w.add("x", dtype: .BF16, shape: [2, 2], floats: [1, 2, 3, 4])
        try w.add("y", dtype: .F16, shape: [3], floats: [0.5, -1, 2])
        try w.commit()
        let text = try runPython("""
            import sys
            from safetensors import safe_open
            with safe_open(sys.argv[1], "np") as f:
                print(f.metadata()["format"], sorted(f.keys()), f.get_tensor("y").tolist())
            """, [out])
        XCTAssertEqual(text.trimmingCharacters(in: .whitespacesAndNewlines), "pt ['x', 'y'] [0.5, -1.0, 2.0]")
    }

    func testMalformedFilesGiveOneLineErrors() throws {
        let dir = temporaryDirectory(self)
        func expectError(_ name: String, header: String, data: [UInt8], headerLength: UInt64? = nil, raw: [UInt8]? = nil,
                         contains: [String], line: UInt = #line) {
            let path = dir + "/" + name + ".safetensors"
            if let r = raw {
                _ = FileManager.default.createFile(atPath: path, contents: Data(r))
            } else {
                handMadeSafetensors(path, header: header, data: data, headerLength: headerLength)
            }
            XCTAssertThrowsError(try SafetensorsFile(path), name, line: line) { e in
                guard let s = e as? SMoEError else { return XCTFail("not an SMoEError: \(e)", line: line) }
                XCTAssertFalse(s.message.contains("\n"), line: line)
                XCTAssertTrue(s.message.contains(path), "\(s.message) names the file", line: line)
                for c in contains { XCTAssertTrue(s.message.contains(c), "\(s.message) should mention \(c)", line: line) }
            }
        }
        let ok = #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#
        expectError("truncated-length", header: "", data: [], raw: [1, 2, 3], contains: ["truncated"])
        expectError("empty", header: "", data: [], raw: [], contains: ["truncated"])
        expectError("header-past-end", header: ok, data: [UInt8](repeating: 0, count: 8), headerLength: 4000, contains: ["past the end"])
        expectError("header-too-big", header: ok, data: [], headerLength: 1 << 40, contains: ["100 MB"])
        expectError("truncated-header", header: String(ok.prefix(20)), data: [], contains: ["invalid JSON"])
        expectError("not-json", header: "{not json}", data: [], contains: ["invalid JSON"])
        expectError("overlap", header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                    data: [UInt8](repeating: 0, count: 12), contains: ["overlap", "b"])
        expectError("out-of-range", header: #"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                    data: [UInt8](repeating: 0, count: 8), contains: ["w", "outside the data section"])
        expectError("negative", header: #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}"#,
                    data: [UInt8](repeating: 0, count: 8), contains: ["w", "outside"])
        expectError("size-mismatch", header: #"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    data: [UInt8](repeating: 0, count: 8), contains: ["w", "needs 12"])
        expectError("dtype-mismatch", header: #"{"w":{"dtype":"F64","shape":[2],"data_offsets":[0,8]}}"#,
                    data: [UInt8](repeating: 0, count: 8), contains: ["w", "F64", "needs 16"])
        expectError("unknown-dtype", header: #"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}}"#,
                    data: [UInt8](repeating: 0, count: 8), contains: ["w", "unknown dtype \"Q4\""])
        expectError("bad-shape", header: #"{"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
                    data: [UInt8](repeating: 0, count: 8), contains: ["w", "shape"])
        expectError("huge-shape", header: #"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
                    data: [UInt8](repeating: 0, count: 8), contains: ["w", "too large"])
        expectError("bad-offsets", header: #"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#,
                    data: [UInt8](repeating: 0, count: 8), contains: ["w", "data_offsets"])
        expectError("bad-metadata", header: #"{"__metadata__":{"a":1}}"#, data: [], contains: ["__metadata__.a"])
        expectError("duplicate", header: #"{"w":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"w":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}"#,
                    data: [], contains: ["twice"])
        expectError("array", header: "[1,2]   ", data: [], contains: ["not a JSON object"])
        // Directory and missing file.
        XCTAssertThrowsError(try SafetensorsFile(dir)) { XCTAssertTrue("\($0)".contains("directory")) }
        XCTAssertThrowsError(try SafetensorsFile(dir + "/none.safetensors")) { XCTAssertTrue("\($0)".contains("no such file")) }
    }

    func testShardedWriterAndModelReader() throws {
        let dir = temporaryDirectory(self)
        let w = try ShardedSafetensorsWriter(directory: dir, maxShardBytes: 100, metadata: [("format", "pt")])
        for i in 0..<5 {
            try w.add("t\(i)", dtype: .F32, shape: [10 + i], bytes: [UInt8](repeating: UInt8(i), count: 4 * (10 + i)))
        }
        let files = try w.finish()
        // 40+44 bytes | 48+52 (exactly the limit) | 56
        XCTAssertEqual(files, ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                               "model-00003-of-00003.safetensors", "model.safetensors.index.json"])
        let index = try JSONValue.parse(String(contentsOfFile: dir + "/model.safetensors.index.json", encoding: .utf8))
        XCTAssertEqual(index["metadata"]?["total_size"]?.intValue, 4 * (10 + 11 + 12 + 13 + 14))
        XCTAssertEqual(index["weight_map"]?["t3"]?.stringValue, "model-00002-of-00003.safetensors")
        let m = try SafetensorsModel(dir)
        XCTAssertEqual(m.names, ["t0", "t1", "t2", "t3", "t4"])
        XCTAssertEqual(try m.locate("t2").file.path, dir + "/model-00002-of-00003.safetensors")
        XCTAssertEqual(try m.withBytes("t4") { Array($0) }, [UInt8](repeating: 4, count: 56))
        XCTAssertEqual(m.metadata.first?.1, "pt")

        // Two tensors per shard when they fit.
        let dir2 = temporaryDirectory(self)
        let w2 = try ShardedSafetensorsWriter(directory: dir2, maxShardBytes: 100)
        for i in 0..<3 { try w2.add("t\(i)", dtype: .U8, shape: [40], bytes: [UInt8](repeating: 1, count: 40)) }
        XCTAssertEqual(try w2.finish().count, 3)  // 2 shards + index
        // One file without an index when it all fits.
        let dir3 = temporaryDirectory(self)
        let w3 = try ShardedSafetensorsWriter(directory: dir3, maxShardBytes: 1000)
        try w3.add("a", dtype: .U8, shape: [3], bytes: [1, 2, 3])
        XCTAssertEqual(try w3.finish(), ["model.safetensors"])
        XCTAssertEqual(try SafetensorsModel(dir3).names, ["a"])
    }

    func testModelReaderRejectsInconsistentIndex() throws {
        let dir = temporaryDirectory(self)
        let w = try SafetensorsWriter(destination: dir + "/a.safetensors")
        try w.add("x", dtype: .U8, shape: [1], bytes: [1])
        try w.add("y", dtype: .U8, shape: [1], bytes: [2])
        try w.commit()
        func index(_ map: String) {
            _ = FileManager.default.createFile(atPath: dir + "/model.safetensors.index.json",
                                           contents: Data(#"{"metadata":{},"weight_map":{\#(map)}}"#.utf8))
        }
        index(#""x":"a.safetensors""#)
        XCTAssertThrowsError(try SafetensorsModel(dir)) { XCTAssertTrue("\($0)".contains("y"), "\($0)") }
        index(#""x":"a.safetensors","y":"a.safetensors","z":"a.safetensors""#)
        XCTAssertThrowsError(try SafetensorsModel(dir)) { XCTAssertTrue("\($0)".contains("z"), "\($0)") }
        index(#""x":"a.safetensors","y":"b.safetensors""#)
        XCTAssertThrowsError(try SafetensorsModel(dir)) { XCTAssertTrue("\($0)".contains("b.safetensors"), "\($0)") }
        index(#""x":"a.safetensors","y":"a.safetensors""#)
        XCTAssertEqual(try SafetensorsModel(dir).names, ["x", "y"])
        try FileManager.default.removeItem(atPath: dir + "/model.safetensors.index.json")
        XCTAssertEqual(try SafetensorsModel(dir).names, ["x", "y"])  // the only .safetensors file
        XCTAssertEqual(try parseByteSize("5GB"), 5_000_000_000)
        XCTAssertEqual(try parseByteSize("2GiB"), 2 << 30)
        XCTAssertEqual(try parseByteSize("100"), 100)
        XCTAssertThrowsError(try parseByteSize("lots"))
    }
}
