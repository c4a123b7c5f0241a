import Foundation
import XCTest
@testable import SMoECompress

final class StatisticsTests: XCTestCase {
    // MARK: counts

    func testPlantedCountsEqualPlantedTruth() throws {
        for name in ["planted-switch", "planted-mixtral"] {
            let model = try CheckpointReader(fixture(name + ".h5"))
            let calib = try CalibrationReader(fixture(name + ".calib.h5"))
            let stats = try Statistics.computeAll(model: model, calibration: calib)
            XCTAssertEqual(stats.map(\.name), model.layers.map(\.name), name)
            for s in stats {
                let truth = try XCTUnwrap(try SyntheticGenerator.readPlanted(model, layer: s.name), "\(name) \(s.name)")
                XCTAssertEqual(s.counts, truth.counts, "\(name) \(s.name): counts")
                XCTAssertEqual(s.numTokens, 1024, "\(name) \(s.name)")
                XCTAssertEqual(s.counts.reduce(0, +), s.numTokens * s.topK, "\(name) \(s.name): hits")
                XCTAssertEqual(s.frequency.reduce(0, +), 1, accuracy: 1e-12, "\(name) \(s.name): frequency sums to 1")
            }
        }
    }

    /// The usage tables of Fixtures/TRAINED.md (shared fixtures README), calibration capture.
    static let trainedCounts: [String: [String: [Int]]] = [
        "trained-switch": [
            "encoder.block.1.layer.1.mlp": [133, 7, 177, 204, 154, 1, 208, 140],
            "encoder.block.3.layer.1.mlp": [122, 285, 53, 73, 138, 240, 34, 79],
            "decoder.block.1.layer.2.mlp": [117, 240, 124, 144, 36, 10, 273, 80],
            "decoder.block.3.layer.2.mlp": [53, 104, 24, 37, 272, 278, 88, 168],
        ],
        "trained-mixtral": [
            "model.layers.0.block_sparse_moe": [83, 171, 331, 189, 218, 413, 200, 443],
            "model.layers.1.block_sparse_moe": [215, 190, 119, 898, 490, 74, 13, 49],
            "model.layers.2.block_sparse_moe": [126, 476, 11, 0, 180, 266, 677, 312],
            "model.layers.3.block_sparse_moe": [561, 168, 554, 10, 152, 221, 97, 285],
        ],
    ]

    func testTrainedCountsEqualFixtureTables() throws {
        for (name, table) in Self.trainedCounts.sorted(by: { $0.key < $1.key }) {
            let model = try CheckpointReader(fixture(name + ".h5"))
            let calib = try CalibrationReader(fixture(name + ".calib.h5"))
            let stats = try Statistics.computeAll(model: model, calibration: calib, tokens: TokenSettings(blockSize: 300))
            XCTAssertEqual(Set(stats.map(\.name)), Set(table.keys), name)
            for s in stats {
                XCTAssertEqual(s.counts, table[s.name], "\(name) \(s.name): counts")
                let k = s.topK
                XCTAssertEqual(s.frequency, s.counts.map { Double($0) / Double(1024 * k) }, "\(name) \(s.name): frequency")
            }
        }
    }

    // MARK: streaming

    func assertSame(_ a: LayerStatistics, _ b: LayerStatistics, tol: Double, _ label: String) {
        XCTAssertEqual(a.counts, b.counts, "\(label): counts")
        XCTAssertEqual(a.numTokens, b.numTokens, "\(label): tokens")
        XCTAssertEqual(a.frequency, b.frequency, "\(label): frequency")
        XCTAssertEqual(a.bases, b.bases, "\(label): bases")
        for base in a.bases {
            let d = a.similarity[base]!.maxAbsDifference(b.similarity[base]!)
            XCTAssertLessThanOrEqual(d, tol, "\(label): \(base.rawValue) similarity differs by \(d)")
        }
        XCTAssertEqual(a.features.keys.sorted(), b.features.keys.sorted(), "\(label): features")
        for (base, f) in a.features {
            let d = f.maxAbsDifference(b.features[base]!)
            XCTAssertLessThanOrEqual(d, tol, "\(label): \(base.rawValue) features differ by \(d)")
        }
    }

    /// Block 7 vs 4096 must agree within 1e-12; the pass computes on aligned fixed-size chunks,
    /// so they are in fact bitwise equal, and that is what is asserted (tol 0).
    func testBlockSizeIndependence() throws {
        let all = Set(SimilarityBase.allCases)
        for name in ["planted-mixtral", "trained-switch"] {
            let model = try CheckpointReader(fixture(name + ".h5"))
            let calib = try CalibrationReader(fixture(name + ".calib.h5"))
            for c in model.layers.prefix(2) {
                let layer = try model.readLayer(c.name)
                let small = try Statistics.compute(layer: layer, calibration: calib, bases: all, tokens: TokenSettings(blockSize: 7))
                let big = try Statistics.compute(layer: layer, calibration: calib, bases: all, tokens: TokenSettings(blockSize: 4096))
                assertSame(small, big, tol: 0, "\(name) \(c.name) block 7 vs 4096")
            }
        }
        // In-memory layer with biases, an expert map and a factored expert: Matrix and block
        // sequence entry points agree with each other at any block size.
        var rng = SplitMix64(seed: 77)
        var layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 6, G: 4, k: 2, biases: true)
        let w = layer.experts[1].down.dense()
        layer.experts[1].down = .factored(LowRankSparse(u: randomMatrix(w.rows, 3, &rng, scale: 0.3), v: randomMatrix(3, w.cols, &rng, scale: 0.3),
                                                        s: CSRMatrix.from(w) { i, j in (i + j) % 5 == 0 }))
        let x = randomMatrix(301, layer.config.dModel, &rng)
        let a = try Statistics.compute(layer: layer, tokens: x, bases: all, blockSize: 7)
        let b = try Statistics.compute(layer: layer, tokens: x, bases: all, blockSize: 4096)
        let blocks = stride(from: 0, to: x.rows, by: 50).map { x.rowBlock($0, min(50, x.rows - $0)) }
        let c = try Statistics.compute(layer: layer, blocks: blocks, bases: all)
        assertSame(a, b, tol: 0, "random layer block 7 vs 4096")
        assertSame(c, b, tol: 1e-12, "random layer blocks of 50 vs one")
        XCTAssertEqual(a.counts.reduce(0, +), 301 * 2, "random layer hits")
        // maxTokens caps every statistic.
        let calib = try CalibrationReader(fixture("planted-switch.calib.h5"))
        let model = try CheckpointReader(fixture("planted-switch.h5"))
        let l0 = try model.readLayer(model.layers[0].name)
        let capped = try Statistics.compute(layer: l0, calibration: calib, tokens: TokenSettings(blockSize: 64, maxTokens: 100))
        let direct = try Statistics.compute(layer: l0, tokens: try calib.hiddenStates(l0.name, rows: 0..<100))
        assertSame(capped, direct, tol: 1e-12, "maxTokens 100")
        XCTAssertEqual(capped.numTokens, 100, "maxTokens 100: tokens")
    }

    /// Cosine of two columns of an [N, E] matrix, by a direct loop in Float64.
    func directCosine(_ z: Matrix, _ i: Int, _ j: Int) -> Double {
        var dot = 0.0, ni = 0.0, nj = 0.0
        for t in 0..<z.rows {
            let a = Double(z[t, i]), b = Double(z[t, j])
            dot += a * b
            ni += a * a
            nj += b * b
        }
        return dot / (ni * nj).squareRoot()
    }

    func testRouterLogitsGramEqualsDirectCosine() throws {
        for name in ["planted-switch", "trained-mixtral"] {
            let model = try CheckpointReader(fixture(name + ".h5"))
            let calib = try CalibrationReader(fixture(name + ".calib.h5"))
            for c in model.layers {
                let layer = try model.readLayer(c.name)
                let s = try Statistics.compute(layer: layer, calibration: calib, tokens: TokenSettings(blockSize: 100)).similarity[.routerLogits]!
                let x = try calib.hiddenStates(c.name)
                let z = Statistics.logits(layer: layer, tokens: x)  // the full N×E logits of the pass
                XCTAssertLessThanOrEqual(relativeError(z, layer.logits(x)), 1e-6, "\(name) \(c.name): chunked vs one-shot logits")
                let captured = try calib.routerLogits(c.name)
                var worst = 0.0, worstCaptured = 0.0
                for i in 0..<c.numExperts {
                    XCTAssertEqual(s[i, i], 1, "\(name) \(c.name): diagonal")
                    for j in 0..<c.numExperts where j != i {
                        XCTAssertEqual(s[i, j], s[j, i], "\(name) \(c.name): symmetric")
                        worst = max(worst, abs(s[i, j] - (directCosine(z, i, j) + 1) / 2))
                        worstCaptured = max(worstCaptured, abs(s[i, j] - (directCosine(captured, i, j) + 1) / 2))
                    }
                }
                XCTAssertLessThanOrEqual(worst, 1e-12, "\(name) \(c.name): Gram vs direct cosine")
                // The capture's own logits (computed by the source model) agree to float32 rounding.
                XCTAssertLessThanOrEqual(worstCaptured, 1e-5, "\(name) \(c.name): vs captured router_logits")
            }
        }
    }

    // MARK: planted families

    /// Mean similarity of slot pairs within a family and across families.
    func withinAndAcross(_ s: Float64Matrix, _ family: [Int]) -> (within: Double, across: Double) {
        var w = 0.0, nw = 0, a = 0.0, na = 0
        for i in 0..<s.rows {
            for j in 0..<s.rows where j != i {
                if family[i] == family[j] { w += s[i, j]; nw += 1 } else { a += s[i, j]; na += 1 }
            }
        }
        return (nw > 0 ? w / Double(nw) : .nan, na > 0 ? a / Double(na) : .nan)
    }

    func testPlantedFamiliesAreVisible() throws {
        var report: [String] = []
        for name in ["planted-switch", "planted-mixtral"] {
            let model = try CheckpointReader(fixture(name + ".h5"))
            let calib = try CalibrationReader(fixture(name + ".calib.h5"))
            let stats = try Statistics.computeAll(model: model, calibration: calib, bases: Set(SimilarityBase.allCases))
            for s in stats {
                let family = try XCTUnwrap(try SyntheticGenerator.readPlanted(model, layer: s.name)).family
                // A family's leader is its first slot (the generator's most used one).
                var leaders: [Int] = []
                for e in 0..<family.count where !leaders.contains(where: { family[$0] == family[e] }) { leaders.append(e) }
                for base in SimilarityBase.allCases {
                    let m = s.similarity[base]!
                    let (w, a) = withinAndAcross(m, family)
                    report.append("\(name) \(s.name) \(base.rawValue): within \(String(format: "%.4f", w)) across \(String(format: "%.4f", a))")
                    guard base == .routerLogits || base == .expertOutput else { continue }
                    for e in 0..<family.count {
                        let label = "\(name) \(s.name) \(base.rawValue) slot \(e) (family \(family[e]))"
                        if leaders.contains(e) {
                            // A leader's most similar other slot overall is of its family, when it has company.
                            if family.filter({ $0 == family[e] }).count > 1 {
                                let j = try XCTUnwrap(m.mostSimilar(to: e), label)
                                XCTAssertEqual(family[j], family[e], "\(label): most similar slot \(j)")
                            }
                        } else {
                            let j = try XCTUnwrap(m.mostSimilar(to: e, among: leaders), label)
                            XCTAssertEqual(family[j], family[e], "\(label): most similar leader \(j)")
                        }
                    }
                }
            }
        }
        print(report.joined(separator: "\n"))
    }

    // MARK: never-chosen slots, weight similarity

    func testNeverChosenSlotFeatureSimilarityIsZero() throws {
        let model = try CheckpointReader(fixture("trained-mixtral.h5"))
        let calib = try CalibrationReader(fixture("trained-mixtral.calib.h5"))
        let name = "model.layers.2.block_sparse_moe"
        let s = try Statistics.compute(layer: try model.readLayer(name), calibration: calib, bases: [.feature, .routerLogits])
        XCTAssertEqual(s.neverChosen, [3], "mixtral layer 2 never-chosen slots")
        let f = s.similarity[.feature]!
        for j in 0..<8 {
            XCTAssertEqual(f[3, j], j == 3 ? 1 : 0, "feature similarity of the never-chosen slot 3 with \(j)")
            XCTAssertEqual(f[j, 3], j == 3 ? 1 : 0, "feature similarity of \(j) with the never-chosen slot 3")
        }
        XCTAssertEqual(s.features[.feature]!.row(3), [Double](repeating: 0, count: 64), "mean input of slot 3")
        XCTAssertTrue(f.values.allSatisfy { $0.isFinite && $0 >= -1 && $0 <= 1 }, "feature similarity range")
        XCTAssertTrue(s.similarity[.routerLogits]!.values.allSatisfy { $0 >= 0 && $0 <= 1 }, "router-logits range")
    }

    func testWeightSimilarityFollowsExpertMapAndFactoredForm() throws {
        var rng = SplitMix64(seed: 91)
        var layer = randomLayer(&rng, type: .mlp, router: .softmax_topk, activation: .relu, E: 6, G: 3, k: 1)
        layer.expertMap = [0, 1, 2, 0, 1, 2]
        let s = Statistics.weightSimilarity(layer)
        XCTAssertEqual(s[0, 3], 1, accuracy: 1e-12, "slots sharing stored expert 0")
        XCTAssertEqual(s[1, 4], 1, accuracy: 1e-12, "slots sharing stored expert 1")
        // Direct cosine of the concatenated flattened matrices.
        func flat(_ g: Int) -> [Double] { layer.experts[g].namedMatrices.flatMap { $0.op.dense().data.map(Double.init) } }
        let a = flat(0), b = flat(1)
        let dot = zip(a, b).reduce(0) { $0 + $1.0 * $1.1 }
        let na = a.reduce(0) { $0 + $1 * $1 }.squareRoot(), nb = b.reduce(0) { $0 + $1 * $1 }.squareRoot()
        XCTAssertEqual(s[0, 1], dot / (na * nb), accuracy: 1e-12, "weight cosine of experts 0 and 1")
        // A factored expert gives the similarity of its dense product.
        var f = layer
        let w = layer.experts[2].up.dense()
        f.experts[2].up = .factored(LowRankSparse(u: Matrix.identity(w.rows), v: w, s: .empty(rows: w.rows, cols: w.cols)))
        XCTAssertLessThanOrEqual(Statistics.weightSimilarity(f).maxAbsDifference(s), 1e-12, "factored vs dense weight similarity")
        // Expert-output features of slots sharing an expert coincide (distance 0).
        let x = randomMatrix(50, layer.config.dModel, &rng)
        let st = try Statistics.compute(layer: layer, tokens: x, bases: [.expertOutput])
        XCTAssertEqual(st.similarity[.expertOutput]![0, 3], 0, "expert-output distance of slots sharing an expert")
        XCTAssertGreaterThan(st.expertOutputDistance![0, 1], 0, "expert-output distance of distinct experts")
    }

    func testSimilarityListParsing() throws {
        XCTAssertEqual(try SimilarityBase.parseList("router-logits"), [.routerLogits])
        XCTAssertEqual(try SimilarityBase.parseList("expert-output,weight,weight"), [.weight, .expertOutput])
        XCTAssertEqual(try SimilarityBase.parseList("all"), SimilarityBase.allCases)
        XCTAssertThrowsError(try SimilarityBase.parseList("router-logits,cosine")) { e in
            XCTAssertEqual((e as? SMoEError)?.setting, .similarity)
            XCTAssertTrue("\(e)".hasPrefix("similarity: unknown similarity \"cosine\""), "\(e)")
        }
    }

    // MARK: files and the command line

    func testStatsFileRoundTripThroughCLI() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("planted-switch.h5"), c = fixture("planted-switch.calib.h5")
        let r = try runCLI(["stats", m, "--calib", c, "-o", dir + "/s.h5", "--similarity", "all", "--block-size", "100"])
        XCTAssertEqual(r.status, 0, "stats: \(r.stderr)")
        XCTAssertTrue(r.stdout.contains("encoder.block.1.layer.1.mlp"), "usage table names the layer")
        let model = try CheckpointReader(m)
        let expected = try Statistics.computeAll(model: model, calibration: try CalibrationReader(c),
                                                 bases: Set(SimilarityBase.allCases), tokens: TokenSettings(blockSize: 100))
        let reader = try StatsReader(dir + "/s.h5")
        XCTAssertEqual(reader.layers.map(\.name), model.layers.map(\.name), "file layers")
        XCTAssertEqual(try JSONValue.parse(reader.source)["calibration"]?.stringValue, c, "source names the calibration file")
        XCTAssertEqual(try JSONValue.parse(reader.source)["model"]?.stringValue, m, "source names the model")
        for e in expected { XCTAssertEqual(try reader.read(e.name), e, "file round trip of \(e.name)") }
        try reader.checkMatches(model)
        XCTAssertThrowsError(try reader.checkMatches(try CheckpointReader(fixture("planted-mixtral.h5")))) { e in
            XCTAssertTrue("\(e)".contains("model.layers.0.block_sparse_moe"), "checkMatches names the layer: \(e)")
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["s.h5"], "no temporary files left")

        // --json parses and carries the counts.
        let j = try runCLI(["stats", m, "--calib", c, "-o", dir + "/s2.h5", "--json"])
        XCTAssertEqual(j.status, 0, "stats --json: \(j.stderr)")
        let doc = try JSONValue.parse(j.stdout)
        let layers = try XCTUnwrap(doc["layers"]?.arrayValue, "stats --json layers")
        XCTAssertEqual(layers.count, expected.count, "stats --json layer count")
        for (l, e) in zip(layers, expected) {
            XCTAssertEqual(l["name"]?.stringValue, e.name, "stats --json name")
            XCTAssertEqual(l["counts"]?.arrayValue?.compactMap(\.intValue), e.counts, "stats --json counts of \(e.name)")
        }
        XCTAssertEqual(try StatsReader(dir + "/s2.h5").layers.first?.bases, [.routerLogits], "default similarity")

        // inspect describes stats files, as text and JSON.
        let t = try runCLI(["inspect", dir + "/s.h5"])
        XCTAssertEqual(t.status, 0, "inspect: \(t.stderr)")
        XCTAssertTrue(t.stdout.contains("smoe-stats") && t.stdout.contains("router-logits,feature,weight,expert-output"), t.stdout)
        let ij = try runCLI(["inspect", dir + "/s.h5", "--json"])
        XCTAssertEqual(ij.status, 0, "inspect --json: \(ij.stderr)")
        let idoc = try JSONValue.parse(ij.stdout)
        XCTAssertEqual(idoc["format"]?.stringValue, "smoe-stats", "inspect --json format")
        XCTAssertEqual(idoc["layers"]?.arrayValue?.first?["counts"]?.arrayValue?.compactMap(\.intValue), expected[0].counts,
                       "inspect --json counts")
    }

    func testStatsFileReadableByH5py() throws {
        try XCTSkipUnless(pythonHas("h5py"), "h5py is not importable")
        let dir = temporaryDirectory(self)
        let model = try CheckpointReader(fixture("trained-mixtral.h5"))
        let calib = try CalibrationReader(fixture("trained-mixtral.calib.h5"))
        let stats = try Statistics.computeAll(model: model, calibration: calib, bases: [.routerLogits, .feature])
        let w = try StatsWriter(destination: dir + "/s.h5", source: "test")
        for s in stats { try w.write(s) }
        try w.commit()
        let out = try runPython("""
            import sys, h5py, numpy as np, json
            f = h5py.File(sys.argv[1], 'r')
            assert f.attrs['format'] == 'smoe-stats' and f.attrs['format_version'] == 1
            g = f['moe_layers/model.layers.2.block_sparse_moe']
            assert g['counts'].dtype == np.int64 and g['frequency'].dtype == np.float64
            s = g['similarity/router-logits']
            assert s.dtype == np.float64 and s.shape == (8, 8)
            print(json.dumps({'counts': [int(v) for v in g['counts'][:]], 'n': int(g.attrs['num_tokens']),
                              'undefined': [int(v) for v in g['similarity/feature'].attrs['undefined_slots']],
                              'undefined0': [int(v) for v in f['moe_layers/model.layers.0.block_sparse_moe/similarity/feature'].attrs['undefined_slots']]}))
            """, [dir + "/s.h5"])
        let doc = try JSONValue.parse(out)
        XCTAssertEqual(doc["counts"]?.arrayValue?.compactMap(\.intValue), Self.trainedCounts["trained-mixtral"]!["model.layers.2.block_sparse_moe"])
        XCTAssertEqual(doc["n"]?.intValue, 1024)
        XCTAssertEqual(doc["undefined"]?.arrayValue?.compactMap(\.intValue), [3])
        XCTAssertEqual(doc["undefined0"]?.arrayValue?.compactMap(\.intValue), [])
    }

    /// `stats` flags an expert the router never chooses, in its table and in --json: a copy of
    /// planted-mixtral whose layer 1 router gives one well used slot a bias of −10⁴.
    func testStatsFlagsNeverChosenExpert() throws {
        let dir = temporaryDirectory(self)
        let source = try CheckpointReader(fixture("planted-mixtral.h5"))
        let calib = fixture("planted-mixtral.calib.h5")
        let target = source.layers[1].name
        let before = try Statistics.compute(layer: try source.readLayer(target), calibration: try CalibrationReader(calib))
        XCTAssertEqual(before.neverChosen, [], "the planted layer uses every slot")
        let silenced = before.counts.indices.max { before.counts[$0] < before.counts[$1] }!  // the most used slot
        let path = dir + "/never.h5"
        let w = try CheckpointWriter(destination: path, derivedFrom: source, entry: ["stage": "test"])
        for c in source.layers {
            var layer = try source.readLayer(c.name)
            if c.name == target {
                var bias = [Float](repeating: 0, count: c.numExperts)
                bias[silenced] = -1e4
                layer.routerBias = bias
            }
            _ = try w.write(layer)
        }
        try w.commit()

        let t = try runCLI(["stats", path, "--calib", calib, "-o", dir + "/s.h5"])
        XCTAssertEqual(t.status, 0, t.stderr)
        let lines = t.stdout.split(separator: "\n").map(String.init)
        let header = try XCTUnwrap(lines.firstIndex { $0.hasPrefix(target + " (index") }, t.stdout)
        XCTAssertTrue(lines[header].hasSuffix(", never chosen: \(silenced)"), lines[header])
        let rows = lines[(header + 2)..<(header + 2 + 8)].map { $0.split(separator: " ").map(String.init) }
        for (slot, row) in rows.enumerated() {
            XCTAssertEqual(row.first, "\(slot)", lines[header + 2 + slot])
            if slot == silenced {
                XCTAssertEqual(row, ["\(slot)", "0", "0.0000", "never", "chosen"], "slot \(slot) row")
            } else {
                XCTAssertFalse(row.contains("never"), "slot \(slot) is chosen: \(row)")
            }
        }
        // The other layer is untouched and flags nothing.
        let other = try XCTUnwrap(lines.first { $0.hasPrefix(source.layers[0].name + " (index") })
        XCTAssertFalse(other.contains("never chosen"), other)

        let j = try runCLI(["stats", path, "--calib", calib, "-o", dir + "/s2.h5", "--json"])
        XCTAssertEqual(j.status, 0, j.stderr)
        let layers = try XCTUnwrap(try JSONValue.parse(j.stdout)["layers"]?.arrayValue)
        XCTAssertEqual(layers.map { $0["never_chosen"]?.arrayValue?.compactMap(\.intValue) }, [[], [silenced]])
        XCTAssertEqual(layers[1]["counts"]?.arrayValue?[silenced].intValue, 0)
        // The router still spends all its hits on the other slots.
        XCTAssertEqual(layers[1]["counts"]?.arrayValue?.compactMap(\.intValue).reduce(0, +), before.counts.reduce(0, +))
        XCTAssertEqual(try StatsReader(dir + "/s.h5").read(target).neverChosen, [silenced], "the stats file too")
    }

    /// Writes a calibration file from planted-switch's capture with the given layers.
    func calibration(_ path: String, layers: [(name: String, x: Matrix)]) throws {
        let w = try CalibrationWriter(destination: path, source: "test")
        for (i, l) in layers.enumerated() { try w.write(layer: l.name, index: i, hiddenStates: l.x) }
        try w.commit()
    }

    func testBadInputsFailWithOneErrorLine() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("planted-switch.h5")
        let model = try CheckpointReader(m)
        let calib = try CalibrationReader(fixture("planted-switch.calib.h5"))
        var layers = try model.layers.map { (name: $0.name, x: try calib.hiddenStates($0.name, rows: 0..<64)) }
        let missing = model.layers[2].name
        try calibration(dir + "/missing.h5", layers: layers.filter { $0.name != missing })
        try calibration(dir + "/extra.h5", layers: layers + [(name: "decoder.block.9.layer.2.mlp", x: layers[0].x)])
        let narrow = model.layers[1].name
        layers[1].x = layers[1].x.gatherColumns(Array(0..<16))
        try calibration(dir + "/narrow.h5", layers: layers)
        let cases: [(label: String, args: [String], mentions: [String])] = [
            ("calibration layer missing", [m, "--calib", dir + "/missing.h5"], [dir + "/missing.h5", missing]),
            ("extra calibration layer", [m, "--calib", dir + "/extra.h5"], [dir + "/extra.h5", "decoder.block.9.layer.2.mlp"]),
            ("d_model mismatch", [m, "--calib", dir + "/narrow.h5"], [dir + "/narrow.h5", narrow, "d_model 16"]),
            ("nonexistent model", [dir + "/nope.h5", "--calib", dir + "/extra.h5"], [dir + "/nope.h5"]),
            ("nonexistent calibration", [m, "--calib", dir + "/nope.calib.h5"], [dir + "/nope.calib.h5"]),
            ("calibration given as model", [fixture("planted-switch.calib.h5"), "--calib", dir + "/extra.h5"], ["smoe-checkpoint"]),
            ("bad --max-tokens", [m, "--calib", fixture("planted-switch.calib.h5"), "--max-tokens", "0"], ["--max-tokens"]),
        ]
        for c in cases {
            let r = try runCLI(["stats"] + c.args + ["-o", dir + "/out.h5"])
            XCTAssertEqual(r.status, 1, "\(c.label): exit status (stderr \(r.stderr))")
            let lines = r.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, "\(c.label): one stderr line, got \(r.stderr)")
            XCTAssertTrue(r.stderr.hasPrefix("error: "), "\(c.label): starts with error:, got \(r.stderr)")
            for s in c.mentions { XCTAssertTrue(r.stderr.contains(s), "\(c.label): names \(s), got \(r.stderr)") }
            XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/out.h5"), "\(c.label): no output written")
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasPrefix(".") }, [],
                           "\(c.label): no temporary file left")
        }
        // The library check itself names the layer.
        XCTAssertThrowsError(try Statistics.computeAll(model: model, calibration: try CalibrationReader(dir + "/missing.h5"))) { e in
            XCTAssertTrue("\(e)".contains(missing), "library error names the missing layer: \(e)")
        }
        XCTAssertThrowsError(try Statistics.compute(layer: try model.readLayer(narrow), calibration: try CalibrationReader(dir + "/narrow.h5"))) { e in
            XCTAssertTrue("\(e)".contains(narrow) && "\(e)".contains("d_model"), "library error names the layer: \(e)")
        }
    }
}
