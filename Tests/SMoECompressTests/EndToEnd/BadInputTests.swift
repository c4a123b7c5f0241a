import Foundation
import XCTest
@testable import SMoECompress

/// Every bad input gets one `error:` line naming the file and dataset, and exit status 1.
final class BadInputTests: XCTestCase {
    func copyFixture(_ name: String, _ dir: String) -> String {
        let dst = dir + "/" + name
        try! FileManager.default.copyItem(atPath: fixture(name), toPath: dst)
        return dst
    }

    func assertOneLineError(_ args: [String], mentions: [String], file: StaticString = #filePath, line: UInt = #line) throws {
        let r = try runCLI(args)
        XCTAssertEqual(r.status, 1, "\(args): status \(r.status), stderr \(r.stderr)", file: file, line: line)
        let lines = r.stderr.split(separator: "\n")
        XCTAssertEqual(lines.count, 1, "\(args): stderr should be one line: \(r.stderr)", file: file, line: line)
        XCTAssertTrue(r.stderr.hasPrefix("error: "), "\(args): \(r.stderr)", file: file, line: line)
        for m in mentions { XCTAssertTrue(r.stderr.contains(m), "\(args): '\(m)' not in: \(r.stderr)", file: file, line: line) }
    }

    func testMissingAndNonHDF5Files() throws {
        let dir = temporaryDirectory(self)
        try assertOneLineError(["inspect", dir + "/nope.h5"], mentions: ["nope.h5", "no such file"])
        try "hello".write(toFile: dir + "/text.h5", atomically: true, encoding: .utf8)
        try assertOneLineError(["inspect", dir + "/text.h5"], mentions: ["text.h5", "not an HDF5 file"])
        try assertOneLineError(["inspect", dir], mentions: ["directory"])
    }

    func testFormatAttribute() throws {
        let dir = temporaryDirectory(self)
        let p = copyFixture("planted-switch.h5", dir)
        do {
            let f = try H5File.open(p, writable: true)
            try f.root.setAttribute("format", "something-else")
        }
        try assertOneLineError(["inspect", p], mentions: ["planted-switch.h5", "/@format", "something-else"])
        do {
            let f = try H5File.open(p, writable: true)
            f.root.deleteAttribute("format")
        }
        try assertOneLineError(["inspect", p], mentions: ["/@format", "missing"])
        do {
            let f = try H5File.open(p, writable: true)
            try f.root.setAttribute("format", "smoe-checkpoint")
            try f.root.setAttribute("format_version", 7)
        }
        try assertOneLineError(["inspect", p], mentions: ["/@format_version", "7"])
    }

    /// Edits one layer of a copy of the planted fixture and checks the error names the dataset.
    func checkCorruption(_ dataset: String, mentions: [String], _ edit: (H5Group) throws -> Void) throws {
        let dir = temporaryDirectory(self)
        let p = copyFixture("planted-switch.h5", dir)
        let layer = "encoder.block.3.layer.1.mlp"
        do {
            let f = try H5File.open(p, writable: true)
            try edit(try f.root.openGroup("moe_layers/" + layer))
        }
        try assertOneLineError(["inspect", "--check", p], mentions: ["planted-switch.h5", layer + "/" + dataset] + mentions)
    }

    func testMissingDataset() throws {
        try checkCorruption("experts/down", mentions: ["missing"]) { try $0.delete("experts/down") }
        try checkCorruption("router/weight", mentions: ["missing"]) { try $0.delete("router/weight") }
    }

    func testInconsistentShapes() throws {
        try checkCorruption("router/weight", mentions: ["shape"]) { g in
            try g.delete("router/weight")
            try g.write("router/weight", floats: [Float](repeating: 0, count: 7 * 32), shape: [7, 32])
        }
        try checkCorruption("experts/up", mentions: ["shape"]) { g in
            try g.delete("experts/up")
            try g.write("experts/up", floats: [Float](repeating: 0, count: 8 * 63 * 32), shape: [8, 63, 32])
        }
    }

    func testExpertMapOutOfRange() throws {
        try checkCorruption("expert_map", mentions: ["outside"]) { g in
            try g.write("expert_map", ints: [0, 1, 2, 3, 4, 5, 6, 8], shape: [8], as: .i32)
        }
    }

    func testNaNAndInfInWeights() throws {
        try checkCorruption("experts/down", mentions: ["NaN"]) { g in
            let d = try g.openDataset("experts/down")
            var v = try d.readFloats(rows: 2..<3)
            v[17] = .nan
            try d.write(floats: v, rows: 2..<3)
        }
        try checkCorruption("router/weight", mentions: ["Inf"]) { g in
            let d = try g.openDataset("router/weight")
            var v = try d.readFloats()
            v[3] = -.infinity
            try d.write(floats: v)
        }
    }

    func testTruncatedFileIsAnError() throws {
        let dir = temporaryDirectory(self)
        let data = try Data(contentsOf: URL(fileURLWithPath: fixture("planted-switch.h5")))
        for fraction in [0.01, 0.3, 0.6, 0.95] {
            let p = dir + "/trunc-\(fraction).h5"
            try data.prefix(Int(Double(data.count) * fraction)).write(to: URL(fileURLWithPath: p))
            let r = try runCLI(["inspect", "--check", p])
            XCTAssertEqual(r.status, 1, "truncated at \(fraction): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix("error: ") && r.stderr.contains("trunc-"), "truncated at \(fraction): \(r.stderr)")
        }
    }

    /// Every command that reads a checkpoint, capture or statistics file, given a missing file, a
    /// non-HDF5 file or a truncated copy of a fixture (model or capture position): one `error:`
    /// line naming that file, exit status 1 (a crash would show as the signal number, since
    /// `Process` reports a signal's number as the status), and no output file left.
    func testEveryCommandRejectsMissingNonHDF5AndTruncatedFiles() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("planted-switch.h5"), c = fixture("planted-switch.calib.h5")
        try "hello\n".write(toFile: dir + "/text.h5", atomically: true, encoding: .utf8)
        for (name, src) in [("trunc.h5", m), ("trunc.calib.h5", c)] {
            let data = try Data(contentsOf: URL(fileURLWithPath: src))
            try data.prefix(data.count / 2).write(to: URL(fileURLWithPath: dir + "/" + name))
        }
        let inputs = try FileManager.default.contentsOfDirectory(atPath: dir).sorted()
        let out = dir + "/out.h5"
        let kinds: [(label: String, model: String, capture: String)] = [
            ("missing", dir + "/nope.h5", dir + "/nope.calib.h5"),
            ("not HDF5", dir + "/text.h5", dir + "/text.h5"),
            ("truncated", dir + "/trunc.h5", dir + "/trunc.calib.h5"),
        ]
        for k in kinds {
            let b = k.model, bc = k.capture
            let cases: [(args: [String], names: String)] = [
                (["stats", b, "--calib", c, "-o", out], b),
                (["align", b, "-o", out], b),
                (["merge", b, "--calib", c, "--groups", "2", "-o", out], b),
                (["lowrank", b, "--rank", "4", "-o", out], b),
                (["eval", b, m, "--calib", c], b),
                (["eval", m, b, "--calib", c], b),
                (["expand", b, "-o", out], b),
                (["compress", b, "--calib", c, "--groups", "2", "-o", out], b),
                (["stats", m, "--calib", bc, "-o", out], bc),
                (["align", m, "--stats", bc, "-o", out], bc),
                (["merge", m, "--calib", bc, "--groups", "2", "-o", out], bc),
                (["merge", m, "--stats", bc, "--merge-method", "frequency", "--groups", "2", "-o", out], bc),
                (["eval", m, m, "--calib", bc], bc),
                (["compress", m, "--calib", bc, "--groups", "2", "-o", out], bc),
                (["compress", m, "--calib", c, "--eval-calib", bc, "--groups", "2", "-o", out], bc),
            ]
            for (args, named) in cases {
                let label = "\(k.label): \(args.joined(separator: " "))"
                // --json changes nothing here (checked on one kind; all of them would double the time).
                for mode in k.label == "not HDF5" ? [[], ["--json"]] : [[String]()] {
                    let r = try runCLI(args + mode)
                    XCTAssertEqual(r.status, 1, "\(label) \(mode): status \(r.status) (a signal?), stderr \(r.stderr)")
                    XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(label) \(mode): one line: \(r.stderr)")
                    XCTAssertTrue(r.stderr.hasPrefix("error: " + named + ": "), "\(label) \(mode): names the file: \(r.stderr)")
                    XCTAssertEqual(r.stdout, "", "\(label) \(mode): nothing on stdout")
                    XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir).sorted(), inputs,
                                   "\(label) \(mode): no output or temporary file left")
                }
            }
        }
    }

    /// Random byte flips never crash the tool: it exits 0 (the flip hit unused bytes or only
    /// changed values) or 1 with one error line, never a signal.
    func testBitFlippedFilesDoNotCrash() throws {
        let dir = temporaryDirectory(self)
        let data = try Data(contentsOf: URL(fileURLWithPath: fixture("planted-switch.h5")))
        var rng = SplitMix64(seed: 42)
        for trial in 0..<24 {
            var d = data
            // Flip bytes in the first 8 KiB (superblock, object headers, B-trees) or anywhere.
            let limit = trial % 2 == 0 ? min(8192, d.count) : d.count
            for _ in 0..<4 {
                let i = rng.nextInt(below: limit)
                d[i] ^= UInt8(1 << rng.nextInt(below: 8))
            }
            let p = dir + "/flip-\(trial).h5"
            try d.write(to: URL(fileURLWithPath: p))
            let r = try runCLI(["inspect", "--check", p])
            XCTAssertTrue(r.status == 0 || r.status == 1, "trial \(trial): exit status \(r.status) (crash?) \(r.stderr)")
            if r.status == 1 {
                XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "trial \(trial): \(r.stderr)")
            }
        }
    }
}

final class NonFiniteTests: XCTestCase {
    /// A finite weight near Float.greatestFiniteMagnitude (accepted on read) overflows float32
    /// inside a stage: the stage stops with one `error:` line naming the file and the layer,
    /// instead of writing Inf/NaN or printing nan (issue 14, item 3).
    func testOverflowingWeightsStopWithOneErrorLine() throws {
        let dir = temporaryDirectory(self)
        let source = try CheckpointReader(fixture("planted-switch.h5"))
        let path = dir + "/huge.h5"
        let writer = try CheckpointWriter(destination: path, derivedFrom: source, entry: ["stage": "test"])
        let damaged = source.layers[0].name
        for c in source.layers {
            var layer = try source.readLayer(c.name)
            if c.name == damaged {
                var up = layer.experts[7].up.dense()
                up.data[0] = 2.7e38; up.data[1] = 2.7e38  // σ₁ ≈ 3.8e38 > Float.greatestFiniteMagnitude
                layer.experts[7].up = .dense(up)
            }
            try writer.write(layer)
        }
        try writer.commit()
        let calib = fixture("planted-switch.calib.h5")
        for args in [["lowrank", path, "--rank", "8", "-o", dir + "/l.h5"],
                     ["stats", path, "--calib", calib, "--similarity", "all", "-o", dir + "/s.h5"]] {
            let r = try runCLI(args + ["--quiet"])
            XCTAssertEqual(r.status, 1, "\(args): \(r.stderr)")
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, "\(args): \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix("error: \(path): \(damaged): ") && r.stderr.contains("NaN or Inf"), "\(args): \(r.stderr)")
            XCTAssertFalse(r.stdout.lowercased().contains("nan"), "\(args): \(r.stdout)")
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["huge.h5"], "no output written")
    }
}
