import CHDF5
import Foundation
import XCTest
@testable import SMoECompress

/// Everything an HDF5 file holds, object by object (attributes, dataset types, shapes, chunks,
/// filters and stored bytes), except `skipping` root attributes: two files with equal
/// contents have equal contents maps.
func h5Contents(_ path: String, skipping skipped: Set<String> = ["history"]) throws -> [String: String] {
    let f = try H5File.open(path)
    var out: [String: String] = [:]
    func attributes(_ o: H5Object) -> String {
        var names: [String] = []
        let n = H5Oget_info_attr_count(o)
        for i in 0..<n {
            let len = H5Aget_name_by_idx(o.id, ".", H5_INDEX_NAME, H5_ITER_INC, hsize_t(i), nil, 0, hid_t(H5P_DEFAULT))
            var buf = [CChar](repeating: 0, count: Int(len) + 1)
            H5Aget_name_by_idx(o.id, ".", H5_INDEX_NAME, H5_ITER_INC, hsize_t(i), &buf, Int(len) + 1, hid_t(H5P_DEFAULT))
            names.append(String(decoding: buf.prefix(Int(len)).map { UInt8(bitPattern: $0) }, as: UTF8.self))
        }
        return names.sorted().filter { !(o.path == "/" && skipped.contains($0)) }.map { n in
            let v = (try? o.stringAttribute(n)) ?? (try? o.intArrayAttribute(n)).map { "\($0)" }
                ?? (try? o.doubleAttribute(n)).map { "\($0.bitPattern)" } ?? "?"
            return "\(n)=\(v)"
        }.joined(separator: ";")
    }
    func walk(_ g: H5Group) throws {
        out[g.path] = "group " + attributes(g)
        for n in try g.childNames() {
            if g.isGroup(n) { try walk(try g.openGroup(n)) } else {
                let d = try g.openDataset(n)
                var h = FNV1a()
                h.add(bytes: try d.readRaw())
                out[d.path] = "\(d.rawElementType?.rawValue ?? "?") \(d.shape) chunk \(d.chunkShape ?? []) \(d.filters) \(h.hex) " + attributes(d)
            }
        }
    }
    try walk(f.root)
    return out
}

private func H5Oget_info_attr_count(_ o: H5Object) -> Int {
    var info = H5O_info_t()
    H5Oget_info2(o.id, &info, UInt32(H5O_INFO_NUM_ATTRS))
    return Int(info.num_attrs)
}

/// Asserts two HDF5 files hold the same objects, attributes and bytes (root history aside).
func assertSameContents(_ a: String, _ b: String, file: StaticString = #filePath, line: UInt = #line) throws {
    let x = try h5Contents(a), y = try h5Contents(b)
    let differing = Set(x.keys).union(y.keys).filter { x[$0] != y[$0] }.sorted()
    XCTAssertTrue(differing.isEmpty, "\(a) and \(b) differ in \(differing.prefix(5))", file: file, line: line)
    XCTAssertGreaterThan(x.count, 10, file: file, line: line)
}

final class ShardTests: XCTestCase {
    let fixtures = ["trained-switch", "trained-mixtral"]

    func cli(_ args: [String], file: StaticString = #filePath, line: UInt = #line) throws -> CLIResult {
        let r = try runCLI(args)
        XCTAssertEqual(r.status, 0, "smoe-compress \(args.joined(separator: " ")): \(r.stderr)", file: file, line: line)
        return r
    }

    /// Runs `args` with `--shard i/n` for every i, writing `dir/name.i.h5`; returns the paths.
    func shards(_ args: [String], _ n: Int, dir: String, name: String) throws -> [String] {
        try (0..<n).map { i in
            let p = "\(dir)/\(name).\(i).h5"
            _ = try cli(args + ["--shard", "\(i)/\(n)", "-o", p, "--quiet"])
            return p
        }
    }

    func testSplitIsDeterministicBalancedAndPlanPrintsIt() throws {
        let model = try CheckpointReader(fixture("trained-mixtral.h5"))
        let split = try model.shardSplit(count: 3)
        XCTAssertEqual(split.map(\.layers.count), [2, 1, 1])
        XCTAssertEqual(Set(split.flatMap(\.layers)), Set(model.layers.map(\.name)))
        XCTAssertEqual(try model.shardSplit(count: 3).map(\.layers), split.map(\.layers))
        XCTAssertEqual(try model.shardSplit(count: 6).filter(\.layers.isEmpty).count, 2)
        XCTAssertEqual(try Shard(parsing: "2/4"), try Shard(index: 2, count: 4))
        for bad in ["4/4", "-1/4", "1", "a/b", "0/0"] {
            XCTAssertThrowsError(try Shard(parsing: bad)) { XCTAssertEqual(($0 as? SMoEError)?.setting, .shard, bad) }
        }
        let r = try cli(["plan", fixture("trained-mixtral.h5"), "--shards", "2", "--json"])
        let json = try JSONValue.parse(r.stdout)
        XCTAssertEqual(json["split"]?.arrayValue?.compactMap { $0["layers"]?.arrayValue?.count }, [2, 2])
        let bad = try runCLI(["compress", fixture("trained-mixtral.h5"), "--calib", fixture("trained-mixtral.calib.h5"),
                              "--groups", "4", "--shard", "4/4", "-o", temporaryDirectory(self) + "/x.h5"])
        XCTAssertEqual(bad.status, 1)
        XCTAssertTrue(bad.stderr.hasPrefix("error: --shard: index 4 is outside 0...3"), bad.stderr)
    }

    /// The issue's acceptance test: compress with --shard i/4 plus assemble equals the single
    /// compress bit for bit, on both trained fixtures, uniform and adaptive (with --stats, itself
    /// sharded and assembled), with and without --rank; shard files hold only their layers.
    func testShardedCompressAssemblesBitIdenticalToSingleRun() throws {
        let dir = temporaryDirectory(self)
        for name in fixtures {
            let model = fixture(name + ".h5"), calib = fixture(name + ".calib.h5")
            // Statistics: single and sharded + assembled agree.
            let stats = "\(dir)/\(name).stats.h5"
            _ = try cli(["stats", model, "--calib", calib, "-o", stats, "--quiet"])
            let statShards = try shards(["stats", model, "--calib", calib], 4, dir: dir, name: "\(name).stats")
            _ = try cli(["assemble", model] + statShards + ["-o", "\(dir)/\(name).stats-asm.h5"])
            try assertSameContents(stats, "\(dir)/\(name).stats-asm.h5")
            for (label, extra) in [("uniform", ["--groups", "4"]), ("uniform-rank", ["--groups", "4", "--rank", "16"]),
                                   ("adaptive", ["--groups", "4", "--adaptive", "--stats", stats]),
                                   ("adaptive-rank", ["--groups", "4", "--adaptive", "--stats", stats, "--rank", "16"])] {
                let args = ["compress", model, "--calib", calib] + extra
                let single = "\(dir)/\(name).\(label).h5"
                _ = try cli(args + ["-o", single, "--quiet"])
                let parts = try shards(args, 4, dir: dir, name: "\(name).\(label)")
                let out = "\(dir)/\(name).\(label).asm.h5"
                _ = try cli(["assemble", model] + parts.reversed() + ["-o", out])
                try assertSameContents(single, out)
                if label == "uniform-rank" {  // the comparison does see a difference
                    XCTAssertNotEqual(try h5Contents(single), try h5Contents("\(dir)/\(name).uniform.h5"))
                }
                // Only their layers: no /dense, one layer each, about a quarter of the layers' bytes.
                let singleSize = try FileManager.default.attributesOfItem(atPath: single)[.size] as! Int
                for p in parts {
                    let f = try H5File.open(p)
                    XCTAssertFalse(f.root.isGroup("dense"), p)
                    XCTAssertEqual(try f.root.openGroup("moe_layers").childNames().count, 1, p)
                    let size = try FileManager.default.attributesOfItem(atPath: p)[.size] as! Int
                    XCTAssertLessThan(size, singleSize / 3, "\(p): \(size) bytes of \(singleSize)")
                }
            }
        }
    }

    func testAdaptiveShardNeedsStatistics() throws {
        let r = try runCLI(["compress", fixture("trained-switch.h5"), "--calib", fixture("trained-switch.calib.h5"),
                            "--groups", "4", "--adaptive", "--shard", "0/2", "-o", temporaryDirectory(self) + "/x.h5"])
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.hasPrefix("error: --stats: is needed with --adaptive and --shard"), r.stderr)
    }

    /// Every other writing stage: shards assemble into the single run's output.
    func testOtherStagesShardToo() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-switch.h5"), calib = fixture("trained-switch.calib.h5")
        let stats = "\(dir)/stats.h5"
        _ = try cli(["stats", model, "--calib", calib, "-o", stats, "--quiet"])
        let lowrank = "\(dir)/lowrank.h5"
        _ = try cli(["lowrank", model, "--rank", "8", "-o", lowrank, "--quiet"])
        for (stage, args) in [("align", ["align", model, "--stats", stats]),
                              ("merge", ["merge", model, "--calib", calib, "--stats", stats, "--groups", "2", "--layers",
                                         "encoder.block.1.layer.1.mlp,decoder.block.3.layer.2.mlp"]),
                              ("lowrank", ["lowrank", model, "--rank", "8", "--dtype", "f32"]),
                              ("expand", ["expand", lowrank])] {
            let single = "\(dir)/\(stage).single.h5"
            _ = try cli(args + ["-o", single, "--quiet"])
            let parts = try shards(args, 3, dir: dir, name: stage)
            _ = try cli(["assemble", args[1]] + parts + ["-o", "\(dir)/\(stage).asm.h5"])
            try assertSameContents(single, "\(dir)/\(stage).asm.h5")
        }
    }

    /// Missing shards are an error; with --allow-partial their layers are copied unchanged, which
    /// is what a run with --layers of the other shards' layers writes.
    func testMissingShardsAndAllowPartial() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-mixtral.h5"), calib = fixture("trained-mixtral.calib.h5")
        let args = ["compress", model, "--calib", calib, "--groups", "4"]
        let parts = try shards(args, 4, dir: dir, name: "c")
        let r = try runCLI(["assemble", model, parts[0], parts[2], "-o", "\(dir)/out.h5"])
        XCTAssertEqual(r.status, 1)
        XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
        XCTAssertTrue(r.stderr.contains("missing shards 1/4, 3/4") && r.stderr.contains("--allow-partial"), r.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/out.h5"))
        _ = try cli(["assemble", model, parts[0], parts[2], "-o", "\(dir)/out.h5", "--allow-partial"])
        let reader = try CheckpointReader(model)
        let layers = [reader.layers[0].name, reader.layers[2].name]
        _ = try cli(args + ["--layers", layers.joined(separator: ","), "-o", "\(dir)/layers.h5", "--quiet"])
        try assertSameContents("\(dir)/layers.h5", "\(dir)/out.h5")
        let entry = try CheckpointReader("\(dir)/out.h5").history.last!
        XCTAssertEqual(entry["stage"]?.stringValue, "assemble")
        XCTAssertEqual(entry["shards"]?.arrayValue?.count, 2)
    }

    /// A shard of another model, one with other settings, a duplicate and a truncated shard: one
    /// error line each, naming the shard; nothing written.
    func testAssembleRejectsBadShardsOneLineEach() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-mixtral.h5"), calib = fixture("trained-mixtral.calib.h5")
        let args = ["compress", model, "--calib", calib, "--groups", "4"]
        let good = try shards(args, 4, dir: dir, name: "good")
        let other = try shards(["compress", fixture("trained-switch.h5"), "--calib", fixture("trained-switch.calib.h5"),
                                "--groups", "4"], 4, dir: dir, name: "switch")[1]
        let settings = try shards(args.dropLast() + ["2"], 4, dir: dir, name: "groups2")[2]
        let duplicate = "\(dir)/duplicate.h5"
        try FileManager.default.copyItem(atPath: good[3], toPath: duplicate)
        let truncated = "\(dir)/truncated.h5"
        let bytes = try Data(contentsOf: URL(fileURLWithPath: good[1]))
        try bytes.prefix(bytes.count * 2 / 3).write(to: URL(fileURLWithPath: truncated))
        let expected = [(other, "is a shard of another model"), (settings, "was made with other settings than \(good[0]): settings.merge.groups 2 vs 4"),
                        (duplicate, "shard 3/4 is given twice"), (truncated, "truncated")]
        for (bad, says) in expected {
            let r = try runCLI(["assemble", model] + good + [bad, "-o", "\(dir)/out.h5"])
            XCTAssertEqual(r.status, 1)
            let lines = r.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, r.stderr)
            XCTAssertTrue(lines.first?.hasPrefix("error: \(bad): ") ?? false, r.stderr)
            XCTAssertTrue(r.stderr.contains(says), "\(r.stderr) lacks \(says)")
        }
        let all = try runCLI(["assemble", model] + good + expected.map(\.0) + ["-o", "\(dir)/out.h5"])
        XCTAssertEqual(all.status, 1)
        XCTAssertEqual(all.stderr.split(separator: "\n").count, 4, all.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/out.h5"))
        // A shard is no checkpoint: other commands refuse it, naming its format.
        let inspect = try runCLI(["eval", model, good[0], "--calib", calib])
        XCTAssertEqual(inspect.status, 1)
        XCTAssertTrue(inspect.stderr.contains("smoe-shard"), inspect.stderr)
    }
}
