import XCTest
@testable import SMoECompress

final class MergeCommandTests: XCTestCase {
    /// Merging the planted fixtures to their number of families finds the planted groups
    /// (ARI 1) with every similarity base that can see them, and the output barely moves.
    func testPlantedGroupsFoundByEverySimilarityThatSeesThem() throws {
        let dir = temporaryDirectory(self)
        for name in ["planted-switch", "planted-mixtral"] {
            let model = fixture(name + ".h5"), calib = fixture(name + ".calib.h5")
            let r = try CheckpointReader(model)
            let P = try XCTUnwrap(try SyntheticGenerator.readPlanted(r, layer: r.layers[0].name)).family.max()! + 1
            // `feature` (mean routed input) sees the families of the top-2 fixture only: in the top-1
            // fixture a follower's few tokens are the ones its own random router direction wins.
            var cases = [("router-logits", "dominant"), ("expert-output", "dominant"), ("expert-output", "hierarchical"),
                         ("router-logits", "hierarchical")]
            if name == "planted-mixtral" { cases.append(("feature", "dominant")) }
            for (similarity, method) in cases {
                for mergeMethod in ["frequency", "regmean+refit"] {
                    let out = dir + "/\(name)-\(similarity)-\(method)-\(mergeMethod).h5"
                    let res = try runCLI(["merge", model, "--calib", calib, "--groups", "\(P)", "--similarity", similarity,
                                          "--method", method, "--merge-method", mergeMethod, "-o", out, "--quiet"])
                    XCTAssertEqual(res.status, 0, res.stderr)
                    let m = try CheckpointReader(out)
                    let c = try CalibrationReader(calib)
                    for cfg in r.layers {
                        let truth = try XCTUnwrap(try SyntheticGenerator.readPlanted(r, layer: cfg.name))
                        let merged = try m.readLayer(cfg.name)
                        let label = "\(name) \(cfg.name) \(similarity)/\(method)/\(mergeMethod)"
                        XCTAssertEqual(Grouping.adjustedRandIndex(merged.expertMap!, truth.family), 1, label)
                        let x = try c.hiddenStates(cfg.name)
                        let err = relativeError(merged.forward(x), try r.readLayer(cfg.name).forward(x))
                        XCTAssertLessThan(err, 0.05, label)
                    }
                    XCTAssertEqual(m.history.last?["stage"], "merge")
                }
            }
        }
    }

    /// --groups E reproduces the original model exactly; merging to a quarter stores a quarter
    /// of the expert bytes.
    func testGroupsEqualToEIsExactAndBytesDrop() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-switch.h5"), calib = fixture("trained-switch.calib.h5")
        XCTAssertEqual(try runCLI(["merge", model, "--calib", calib, "--groups", "8", "-o", dir + "/same.h5"]).status, 0)
        let a = try CheckpointReader(model), b = try CheckpointReader(dir + "/same.h5")
        for l in a.layers { XCTAssertEqual(try b.readLayer(l.name), try a.readLayer(l.name), l.name) }
        XCTAssertEqual(try runCLI(["merge", model, "--calib", calib, "--groups", "2", "-o", dir + "/q.h5"]).status, 0)
        let q = try CheckpointReader(dir + "/q.h5")
        for l in a.layers {
            XCTAssertEqual(try q.summary(l.name).expertFileBytes * 4, try a.summary(l.name).expertFileBytes, l.name)
        }
        // /dense is copied verbatim.
        XCTAssertEqual(try q.denseSummary().parameters, try a.denseSummary().parameters)
    }

    func testBadMergeInputs() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("trained-switch.h5"), calib = fixture("trained-switch.calib.h5")
        for (args, mention) in [
            (["--groups", "0"], "--groups"), (["--groups", "9"], "--groups"), (["--groups", "2", "--layers", "nope"], "nope"),
            (["--groups", "2", "--similarity", "cosmic"], "--similarity"),
        ] {
            let r = try runCLI(["merge", model, "--calib", calib, "-o", dir + "/x.h5"] + args)
            XCTAssertEqual(r.status == 0, false, "\(args)")
            XCTAssertTrue(r.stderr.hasPrefix("error: ") && r.stderr.contains(mention) && r.stderr.split(separator: "\n").count == 1, "\(args): \(r.stderr)")
        }
        let wrong = try runCLI(["merge", model, "--calib", fixture("trained-mixtral.calib.h5"), "--groups", "2", "-o", dir + "/x.h5"])
        XCTAssertEqual(wrong.status, 1)
        XCTAssertTrue(wrong.stderr.contains("encoder.block.1.layer.1.mlp"), wrong.stderr)
        let nocalib = try runCLI(["merge", model, "--groups", "2", "-o", dir + "/x.h5"])
        XCTAssertEqual(nocalib.status, 1)
        XCTAssertTrue(nocalib.stderr.contains("--calib"), nocalib.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/x.h5"))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [])
    }

    // MARK: the command end to end (planted fixtures)

    /// --adaptive shares one budget: the stored experts over the merged layers add up to
    /// groups × layers, every layer keeps at least one and its most used slot is a dominant; on
    /// planted-switch with --groups 4 the budget is not spread evenly.
    func testAdaptiveSharesOneBudget() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("planted-switch.h5"), calib = fixture("planted-switch.calib.h5")
        let res = try runCLI(["merge", model, "--calib", calib, "--groups", "4", "--adaptive", "-o", dir + "/a.h5", "--json", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        let a = try CheckpointReader(dir + "/a.h5")
        let stored = try a.layers.map { try a.summary($0.name).numStored }
        XCTAssertEqual(stored.reduce(0, +), 4 * a.layers.count, "stored experts \(stored)")
        XCTAssertTrue(stored.allSatisfy { $0 >= 1 }, "\(stored)")
        XCTAssertGreaterThan(Set(stored).count, 1, "the budget moved between layers: \(stored)")
        let doc = try JSONValue.parse(res.stdout)
        let layers = try XCTUnwrap(doc["layers"]?.arrayValue)
        XCTAssertEqual(layers.compactMap { $0["groups"]?.intValue }, stored, "--json groups agree with the file")
        let history = try XCTUnwrap(a.history.last)
        XCTAssertEqual(history["adaptive"], .bool(true))
        for (l, c) in zip(layers, a.layers) {
            let members = try XCTUnwrap(l["members"]?.arrayValue)
            var freq = [Double](repeating: 0, count: c.numExperts)
            for g in members {
                for (slot, f) in zip(g["members"]!.arrayValue!.compactMap(\.intValue), g["frequency"]!.arrayValue!.compactMap(\.doubleValue)) {
                    freq[slot] = f
                }
            }
            let top = freq.indices.max { freq[$0] < freq[$1] }!
            XCTAssertTrue(members.contains { $0["dominant"]?.intValue == top }, "\(c.name): most used slot \(top) is a dominant")
        }
    }

    /// Bit patterns of everything a layer stores.
    func bits(_ l: MoELayer) -> [UInt32] {
        var out = l.router.data.map(\.bitPattern) + (l.routerBias ?? []).map(\.bitPattern)
        for e in l.experts {
            for m in e.namedMatrices { out += m.op.dense().data.map(\.bitPattern) }
            out += (e.upBias ?? []).map(\.bitPattern) + (e.downBias ?? []).map(\.bitPattern)
        }
        return out
    }

    /// --layers X merges X only; every other layer is bit-identical to the input.
    func testLayersLeavesTheOthersBitIdentical() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("planted-switch.h5"), calib = fixture("planted-switch.calib.h5")
        let r = try CheckpointReader(model)
        let chosen = r.layers[2].name
        let res = try runCLI(["merge", model, "--calib", calib, "--groups", "3", "--layers", chosen, "-o", dir + "/m.h5", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        let m = try CheckpointReader(dir + "/m.h5")
        XCTAssertEqual(m.layers.map(\.name), r.layers.map(\.name))
        for c in r.layers {
            let before = try r.readLayer(c.name), after = try m.readLayer(c.name)
            if c.name == chosen {
                XCTAssertEqual(after.experts.count, 3, c.name)
                XCTAssertNotNil(after.expertMap, c.name)
            } else {
                XCTAssertEqual(after.config, before.config, c.name)
                XCTAssertNil(after.expertMap, c.name)
                XCTAssertEqual(bits(after), bits(before), "\(c.name) changed")
                XCTAssertEqual(try m.summary(c.name).matrices.map(\.storage), try r.summary(c.name).matrices.map(\.storage), c.name)
            }
        }
        let history = try XCTUnwrap(m.history.last)
        XCTAssertEqual(history["layers"]?.arrayValue?.compactMap { $0["name"]?.stringValue }, [chosen])
    }

    /// A statistics file given with --stats gives the same groups (and, with the same
    /// calibration, the same merged weights) as statistics computed on the fly; with --stats and
    /// --merge-method frequency no calibration is needed.
    func testStatsFileEqualsOnTheFly() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("planted-mixtral.h5"), calib = fixture("planted-mixtral.calib.h5")
        var res = try runCLI(["stats", model, "--calib", calib, "-o", dir + "/s.h5", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        res = try runCLI(["merge", model, "--calib", calib, "--groups", "3", "-o", dir + "/fly.h5", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        res = try runCLI(["merge", model, "--calib", calib, "--stats", dir + "/s.h5", "--groups", "3", "-o", dir + "/file.h5", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        res = try runCLI(["merge", model, "--stats", dir + "/s.h5", "--merge-method", "frequency", "--groups", "3",
                          "-o", dir + "/nocalib.h5", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        res = try runCLI(["merge", model, "--calib", calib, "--merge-method", "frequency", "--groups", "3",
                          "-o", dir + "/flyfreq.h5", "--quiet"])
        XCTAssertEqual(res.status, 0, res.stderr)
        let fly = try CheckpointReader(dir + "/fly.h5"), file = try CheckpointReader(dir + "/file.h5")
        let nocalib = try CheckpointReader(dir + "/nocalib.h5"), flyfreq = try CheckpointReader(dir + "/flyfreq.h5")
        for c in fly.layers {
            let a = try fly.readLayer(c.name)
            XCTAssertEqual(a.experts.count, 3, c.name)
            XCTAssertEqual(try file.readLayer(c.name).expertMap, a.expertMap, "\(c.name): groups")
            XCTAssertEqual(try file.readLayer(c.name), a, "\(c.name): merged weights")
            XCTAssertEqual(try nocalib.readLayer(c.name), try flyfreq.readLayer(c.name), "\(c.name): frequency merge without --calib")
        }
        XCTAssertEqual(fly.history.last?["layers"], file.history.last?["layers"])
    }

    /// --no-align averages unaligned members: same groups and G stored experts, different
    /// weights, and (the planted experts being permuted copies) a much larger output error.
    func testNoAlignDiffersButKeepsGroups() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("planted-switch.h5"), calib = fixture("planted-switch.calib.h5")
        for (name, extra) in [("a.h5", [String]()), ("n.h5", ["--no-align"])] {
            let res = try runCLI(["merge", model, "--calib", calib, "--groups", "3", "-o", dir + "/" + name, "--quiet"] + extra)
            XCTAssertEqual(res.status, 0, res.stderr)
        }
        let r = try CheckpointReader(model), a = try CheckpointReader(dir + "/a.h5"), n = try CheckpointReader(dir + "/n.h5")
        let c = try CalibrationReader(calib)
        XCTAssertEqual(a.history.last?["align"], .bool(true))
        XCTAssertEqual(n.history.last?["align"], .bool(false))
        var errA = 0.0, errN = 0.0
        for cfg in r.layers {
            let la = try a.readLayer(cfg.name), ln = try n.readLayer(cfg.name)
            XCTAssertEqual(ln.experts.count, 3, cfg.name)
            XCTAssertEqual(ln.expertMap, la.expertMap, "\(cfg.name): same groups")
            XCTAssertNotEqual(ln.experts, la.experts, "\(cfg.name): --no-align changed nothing")
            let x = try c.hiddenStates(cfg.name), y = try r.readLayer(cfg.name).forward(x)
            errA += relativeError(la.forward(x), y)
            errN += relativeError(ln.forward(x), y)
        }
        XCTAssertLessThan(errA * 5, errN, "aligned error \(errA) vs unaligned \(errN) (summed over layers)")
    }

    /// --json is one JSON document with per layer the groups, their members and usage shares,
    /// agreeing with the file; the history entry records per layer the groups, their dominant
    /// experts, and the options.
    func testJSONReportAndHistory() throws {
        let dir = temporaryDirectory(self)
        let model = fixture("planted-mixtral.h5"), calib = fixture("planted-mixtral.calib.h5")
        let res = try runCLI(["merge", model, "--calib", calib, "--groups", "4", "--merge-method", "regmean",
                              "--regmean-alpha", "0.5", "-o", dir + "/m.h5", "--json"])
        XCTAssertEqual(res.status, 0, res.stderr)
        // stderr is not a terminal here: no redrawn display and no warnings, one line per finished layer.
        XCTAssertEqual(res.stderr.split(separator: "\n").map { $0.prefix(14) }, ["merge: layer 1", "merge: layer 2"], res.stderr)
        let doc = try JSONValue.parse(res.stdout)
        XCTAssertEqual(doc["output"]?.stringValue, dir + "/m.h5")
        XCTAssertEqual(doc["merge_method"]?.stringValue, "regmean")
        XCTAssertEqual(doc["similarity"]?.stringValue, "router-logits")
        XCTAssertGreaterThan(doc["expert_bytes_before"]!.intValue!, doc["expert_bytes_after"]!.intValue!)
        let m = try CheckpointReader(dir + "/m.h5"), r = try CheckpointReader(model)
        let stats = try Statistics.computeAll(model: r, calibration: try CalibrationReader(calib))
        let layers = try XCTUnwrap(doc["layers"]?.arrayValue)
        XCTAssertEqual(layers.compactMap { $0["name"]?.stringValue }, r.layers.map(\.name))
        let history = try XCTUnwrap(m.history.last)
        for (key, value) in [("stage", "merge"), ("method", "dominant"), ("merge_method", "regmean"),
                             ("similarity", "router-logits"), ("calibration", JSONValue(calib))] as [(String, JSONValue)] {
            XCTAssertEqual(history[key], value, "history \(key)")
        }
        XCTAssertEqual(history["groups"], 4)
        XCTAssertEqual(history["adaptive"], .bool(false))
        XCTAssertEqual(history["align"], .bool(true))
        XCTAssertEqual(history["regmean_alpha"]?.doubleValue, 0.5)
        XCTAssertNil(history["refit_ridge"], "regmean has no refit")
        let hLayers = try XCTUnwrap(history["layers"]?.arrayValue)
        XCTAssertEqual(hLayers.count, r.layers.count)
        for ((l, h), (cfg, st)) in zip(zip(layers, hLayers), zip(r.layers, stats)) {
            let label = cfg.name
            XCTAssertEqual(l["groups"]?.intValue, 4, label)
            let map = try XCTUnwrap(try m.readLayer(cfg.name).expertMap, label)
            XCTAssertEqual(l["expert_map"]?.arrayValue?.compactMap(\.intValue), map, label)
            let groups = try XCTUnwrap(l["members"]?.arrayValue, label)
            XCTAssertEqual(groups.count, 4, label)
            var seen: [Int] = []
            var shares = 0.0
            for (gi, g) in groups.enumerated() {
                let members = g["members"]!.arrayValue!.compactMap(\.intValue)
                let freq = g["frequency"]!.arrayValue!.compactMap(\.doubleValue)
                let dom = try XCTUnwrap(g["dominant"]?.intValue, label)
                XCTAssertEqual(members.count, freq.count, label)
                XCTAssertTrue(members.contains(dom), "\(label): dominant \(dom) in \(members)")
                XCTAssertTrue(members.allSatisfy { map[$0] == gi }, "\(label): group \(gi) members \(members) vs map \(map)")
                // (JSON keeps 9 significant digits.)
                let domShare = freq[members.firstIndex(of: dom) ?? 0]
                for (slot, f) in zip(members, freq) {
                    XCTAssertEqual(f, st.frequency[slot], accuracy: 1e-8, "\(label): usage share of slot \(slot)")
                    XCTAssertLessThanOrEqual(f, domShare, "\(label): the dominant is its group's most used slot")
                }
                seen += members
                shares += freq.reduce(0, +)
            }
            XCTAssertEqual(seen.sorted(), Array(0..<cfg.numExperts), "\(label): every slot in exactly one group")
            XCTAssertEqual(shares, 1, accuracy: 1e-8, "\(label): usage shares sum to 1")
            // History: the same groups and dominants, compactly.
            XCTAssertEqual(h["name"]?.stringValue, cfg.name)
            XCTAssertEqual(h["groups"]?.arrayValue?.map { $0.arrayValue!.compactMap(\.intValue) },
                           groups.map { $0["members"]!.arrayValue!.compactMap(\.intValue).sorted() }, label)
            XCTAssertEqual(h["dominant"]?.arrayValue?.compactMap(\.intValue), groups.compactMap { $0["dominant"]?.intValue }, label)
        }
    }

    /// A factored (low-rank) checkpoint cannot be merged: one error line naming the file and the
    /// first factored layer it would merge, with or without --no-align, and no output.
    func testFactoredCheckpointIsOneErrorNamingTheLayer() throws {
        let dir = temporaryDirectory(self)
        let factored = try factoredCheckpoint(dir)
        let calib = fixture("planted-mixtral.calib.h5")
        let layers = try CheckpointReader(factored).layers.map(\.name)
        for extra in [[], ["--no-align"], ["--merge-method", "frequency", "--no-align"], ["--layers", layers[1]]] {
            let res = try runCLI(["merge", factored, "--calib", calib, "--groups", "4", "-o", dir + "/x.h5"] + extra)
            assertFactoredError(res, file: factored, layer: extra.count == 2 && extra[0] == "--layers" ? layers[1] : layers[0],
                                "\(extra)")
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["l.h5"], "\(extra): no output left")
        }
        // The library stage says the same about a layer in memory.
        let layer = try CheckpointReader(factored).readLayer(layers[0])
        let grouping = LayerGrouping(groups: [Array(0..<8)], dominant: [0])
        XCTAssertThrowsError(try MergeStage.apply(layer, grouping: grouping, frequency: [Double](repeating: 0.125, count: 8),
                                                  settings: MergeSettings(groups: 1, merging: MergeOptions(method: .frequency, align: false)),
                                                  tokens: nil)) { e in
            XCTAssertTrue("\(e)".hasPrefix(layers[0] + ": merge needs dense experts"), "\(e)")
        }
    }
}

/// A low-rank (factored) copy of planted-mixtral, `dir/l.h5`.
func factoredCheckpoint(_ dir: String, file: StaticString = #filePath, line: UInt = #line) throws -> String {
    let out = dir + "/l.h5"
    let res = try runCLI(["lowrank", fixture("planted-mixtral.h5"), "--rank", "8", "-o", out, "--quiet"])
    XCTAssertEqual(res.status, 0, res.stderr, file: file, line: line)
    XCTAssertTrue(try CheckpointReader(out).layers.allSatisfy { try CheckpointReader(out).summary($0.name).isCompressed },
                  file: file, line: line)
    return out
}

/// One `error:` line naming the factored file and layer, non-zero exit.
func assertFactoredError(_ res: CLIResult, file path: String, layer: String, _ label: String,
                         file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(res.status, 1, "\(label): \(res.stderr)", file: file, line: line)
    XCTAssertEqual(res.stderr.split(separator: "\n").count, 1, "\(label): one line: \(res.stderr)", file: file, line: line)
    XCTAssertEqual(res.stderr, "error: \(path): \(layer): merge needs dense experts, but this layer is factored "
                   + "(merge before lowrank, or run expand first)\n", label, file: file, line: line)
}
