import Foundation
import XCTest
@testable import SMoECompress

/// Layers read a few experts at a time (issue 15, item 1): a checkpoint's `LayerSource` gives the
/// experts `readLayer` gives, merging reads each stored expert once, group by group, and the
/// streamed stages write what the in-memory path computes, to the bit.
final class StreamingTests: XCTestCase {
    /// A source over `layer` that counts the reads of each stored expert.
    final class Counter: @unchecked Sendable {
        let lock = NSLock()
        var reads: [Int]
        var order: [Int] = []
        init(_ n: Int) { reads = [Int](repeating: 0, count: n) }
        func read(_ i: Int) {
            lock.lock()
            reads[i] += 1
            order.append(i)
            lock.unlock()
        }
    }

    func countingSource(_ layer: MoELayer) -> (LayerSource, Counter) {
        let counter = Counter(layer.numStored)
        var header = layer
        header.experts = []
        let source = LayerSource(header: header, parameters: layer.experts.map(\.parameterCount),
                                 flops: layer.experts.map(\.flopsPerToken)) { i in
            counter.read(i)
            return layer.experts[i]
        }
        return (source, counter)
    }

    func testCheckpointSourceGivesTheExpertsReadLayerGives() throws {
        for name in ["trained-mixtral.h5", "trained-switch.h5", "planted-mixtral.h5"] {
            let model = try CheckpointReader(fixture(name))
            for c in model.layers {
                let whole = try model.readLayer(c.name)
                let source = try model.layerSource(c.name)
                XCTAssertEqual(source.numStored, whole.numStored, "\(name) \(c.name)")
                XCTAssertEqual(source.header.router, whole.router, "\(name) \(c.name)")
                XCTAssertEqual(source.header.routerBias, whole.routerBias, "\(name) \(c.name)")
                XCTAssertEqual(source.header.expertMap, whole.expertMap, "\(name) \(c.name)")
                XCTAssertTrue(source.header.experts.isEmpty, "\(name) \(c.name): the header holds no experts")
                for i in 0..<whole.numStored { XCTAssertEqual(try source.expert(i), whole.experts[i], "\(name) \(c.name) expert \(i)") }
                // Sizes from the shapes alone, as the layer in memory computes them.
                XCTAssertEqual(source.expertParameterCount, whole.expertParameterCount, "\(name) \(c.name)")
                XCTAssertEqual(source.expertFlopsPerToken, whole.expertFlopsPerToken, "\(name) \(c.name)")
                // The layer's output from experts read one at a time is the in-memory one, to the bit.
                let x = try CalibrationReader(fixture(name.replacingOccurrences(of: ".h5", with: ".calib.h5")))
                    .hiddenStates(c.name, rows: 0..<100)
                XCTAssertEqual(try source.forward(x, routing: source.route(x)), whole.forward(x), "\(name) \(c.name)")
            }
        }
    }

    func testMergingReadsEachExpertOnceGroupByGroup() throws {
        let model = try CheckpointReader(fixture("trained-mixtral.h5"))
        let calib = try CalibrationReader(fixture("trained-mixtral.calib.h5"))
        let layer = try model.readLayer(model.layers[0].name)
        let stats = try Statistics.compute(layer: layer, calibration: calib)
        let grouping = Grouping.uniform(frequency: stats.frequency, similarity: stats.similarity[.routerLogits]!.values, groups: 3)
        for method in MergeMethod.allCases {
            let (source, counter) = countingSource(layer)
            let options = MergeOptions(method: method)
            let tokens = calib.tokenBlocks(layer.name)
            let (streamed, _) = try Merging.mergeLayer(source, grouping: grouping, frequency: stats.frequency, options: options, tokens: tokens)
            let (inMemory, _) = try Merging.mergeLayer(layer, grouping: grouping, frequency: stats.frequency, options: options, tokens: tokens)
            XCTAssertEqual(streamed, inMemory, "\(method): the streamed merge differs from the in-memory one")
            XCTAssertEqual(counter.reads, [Int](repeating: 1, count: layer.numStored), "\(method): each stored expert is read once")
            // Group by group: the reads of one group come before those of the next (the dominant first).
            let groupOf = grouping.slotToGroup
            XCTAssertEqual(counter.order.map { groupOf[$0] }, counter.order.map { groupOf[$0] }.sorted(), "\(method): reads \(counter.order)")
            for (g, dom) in grouping.dominant.enumerated() {
                XCTAssertEqual(counter.order.first { groupOf[$0] == g }, dom, "\(method): group \(g) starts with its dominant")
            }
        }
    }

    /// The stages that stream (merge, compress, stats) write the same bits from the file's layer
    /// source, read a part at a time, as from the whole layer in memory.
    func testStreamedStagesEqualTheWholeLayerPath() throws {
        let model = try CheckpointReader(fixture("trained-switch.h5"))
        let calib = try CalibrationReader(fixture("trained-switch.calib.h5"))
        let settings = CompressSettings(merge: MergeSettings(groups: 4), lowRank: LowRankOptions(rank: .fixed(16)))
        let stage = try CompressStage(model: model, calibration: calib, stats: nil, settings: settings, storage: .f32)
        for name in stage.layers {
            let (a, ra) = try stage.process(source: try model.layerSource(name), progress: nil)
            let (b, rb) = try stage.process(source: LayerSource(try model.readLayer(name)), progress: nil)
            XCTAssertEqual(a, b, name)
            XCTAssertEqual(ra.json.serialized(), rb.json.serialized(), name)
        }
        let stats = try StatisticsStage(model: model, calibration: calib, bases: [.routerLogits, .feature])
        for name in stats.layers {
            let (a, _) = try stats.process(source: try model.layerSource(name), progress: nil)
            let (b, _) = try stats.process(source: LayerSource(try model.readLayer(name)), progress: nil)
            XCTAssertEqual(a.frequency, b.frequency, name)
            XCTAssertEqual(a.similarity[.routerLogits]!.values, b.similarity[.routerLogits]!.values, name)
            XCTAssertEqual(a.similarity[.feature]!.values, b.similarity[.feature]!.values, name)
        }
    }

    /// align reads the reference and every other expert once to align the layer and once more
    /// as the writer stores it, never the layer whole; the file holds what the in-memory
    /// alignment computes, to the bit, for both kinds of parallelism.
    func testAlignStreamsTheLayerAndWritesItExpertByExpert() throws {
        let dir = temporaryDirectory(self)
        let model = try CheckpointReader(fixture("trained-mixtral.h5"))
        for parallelism in Alignment.Parallelism.allCases {
            for c in model.layers {
                let layer = try model.readLayer(c.name)
                let (expected, expectedReport) = try Alignment.alignLayer(layer, reference: 2, parallelism: parallelism)
                let (source, counter) = countingSource(layer)
                let (aligned, report) = try Alignment.alignLayer(source, reference: 2, parallelism: parallelism)
                XCTAssertEqual(counter.reads, [Int](repeating: 1, count: layer.numStored), "\(c.name): aligning reads each expert once")
                XCTAssertEqual(counter.order.first, 2, "\(c.name): the reference is read first")
                // The same permutations and cosines (the timings differ).
                XCTAssertEqual(report.experts.map(\.permutation), expectedReport.experts.map(\.permutation), "\(c.name) \(parallelism)")
                XCTAssertEqual(report.experts.map { [$0.cosineBefore, $0.cosineAfter] },
                               expectedReport.experts.map { [$0.cosineBefore, $0.cosineAfter] }, "\(c.name) \(parallelism)")
                let path = dir + "/aligned-\(parallelism)-\(c.index).h5"
                let w = try CheckpointWriter(destination: path, derivedFrom: model, entry: ["stage": "test"])
                try w.write(aligned)
                try w.commit()
                XCTAssertEqual(counter.reads, [Int](repeating: 2, count: layer.numStored), "\(c.name): writing reads each expert once more")
                XCTAssertEqual(Array(counter.order.suffix(layer.numStored)), Array(0..<layer.numStored), "\(c.name): written in order")
                XCTAssertEqual(try CheckpointReader(path).readLayer(c.name), expected, "\(c.name) \(parallelism)")
            }
        }
    }

    /// The writer's expert-by-expert path stores what the whole-layer path stores: biases (an
    /// expert without one gets zeros when another has one), an expert map, both expert types; a
    /// factored layer is read whole and written so.
    func testWritingFromASourceEqualsWritingTheLayer() throws {
        let dir = temporaryDirectory(self)
        var rng = SplitMix64(seed: 52)
        var layers: [MoELayer] = []
        for type in ExpertType.allCases {
            var l = randomLayer(&rng, type: type, router: .softmax_topk, E: 5, G: 3, k: 1, biases: true)
            l.experts[1].upBias = nil
            l.experts[2].downBias = nil
            layers.append(l)
        }
        var factored = randomLayer(&rng, type: .mlp, router: .softmax_topk, E: 3, k: 1)
        for g in 0..<3 { factored.experts[g].up = .factored(LowRankSparse(u: randomMatrix(20, 4, &rng), v: randomMatrix(4, 12, &rng),
                                                                          s: .empty(rows: 20, cols: 12))) }
        layers.append(factored)
        for (n, layer) in layers.enumerated() {
            let (source, counter) = countingSource(layer)
            let a = dir + "/source-\(n).h5", b = dir + "/whole-\(n).h5"
            for (path, write) in [(a, { (w: CheckpointWriter) in try w.write(source) }), (b, { try $0.write(layer) })] {
                let w = try CheckpointWriter(destination: path, architecture: "test", history: [], entry: ["stage": "test"])
                _ = try write(w)
                try w.commit()
            }
            XCTAssertEqual(try CheckpointReader(a).readLayer(layer.name), try CheckpointReader(b).readLayer(layer.name), "layer \(n)")
            XCTAssertEqual(counter.reads.max(), n < 2 ? 1 : 2, "layer \(n): a dense layer is read once; the factored one's first expert twice")
        }
    }

    /// The in-place solve (no copy of the system) is the copying one, also on the fallback path
    /// (the system is rebuilt from the triangle Cholesky leaves alone).
    func testInPlaceSolveOnBothPaths() throws {
        var rng = SplitMix64(seed: 51)
        let n = 7, m = 3
        let x = randomMatrix(20, n, &rng)
        var spd = [Double](repeating: 0, count: n * n)
        accumulateWeightedCross(x, x, weights: nil, into: &spd)
        var singular = spd
        for i in 0..<n { singular[i * n + n - 1] = singular[i * n]; singular[(n - 1) * n + i] = singular[i] }
        singular[(n - 1) * n + n - 1] = singular[0]  // last row and column = the first: rank n − 1
        let b = (0..<(n * m)).map { _ in Double(rng.nextGaussian()) }
        for (what, a, expected) in [("positive definite", spd, SymmetricSolver.Method.cholesky), ("singular", singular, .leastSquares)] {
            let (x1, method, _) = try SymmetricSolver.solve(a, b, n: n, m: m)
            XCTAssertEqual(method, expected, what)
            // A·X = B (least squares: Aᵀ(A·X − B) = 0 on the singular system).
            for j in 0..<m {
                var r = [Double](repeating: 0, count: n)
                for i in 0..<n { r[i] = (0..<n).reduce(0.0) { $0 + a[i * n + $1] * x1[$1 * m + j] } - b[i * m + j] }
                let resid = expected == .cholesky ? r : (0..<n).map { i in (0..<n).reduce(0.0) { $0 + a[$1 * n + i] * r[$1] } }
                XCTAssertLessThan(resid.map(abs).max()!, 1e-8 * (a.map(abs).max()! * a.map(abs).max()!), "\(what): column \(j)")
            }
        }
    }
}
