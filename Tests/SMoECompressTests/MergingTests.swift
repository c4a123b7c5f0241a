import XCTest
@testable import SMoECompress

final class MergingTests: XCTestCase {
    func testWeightedAverageFormula() throws {
        var rng = SplitMix64(seed: 21)
        let layer = randomLayer(&rng, type: .glu, router: .softmax_topk_norm, E: 3, k: 1, d: 4, f: 6, biases: true)
        let w = [0.5, 0.3, 0.0]
        let m = try Merging.weightedAverage(layer.experts, weights: w)
        for name in ["up", "gate", "down"] {
            let got = m[matrix: name]!.dense()
            for i in 0..<got.count {
                let want = (0.5 * Double(layer.experts[0][matrix: name]!.dense().data[i]) + 0.3 * Double(layer.experts[1][matrix: name]!.dense().data[i])) / 0.8
                XCTAssertEqual(Double(got.data[i]), want, accuracy: 1e-5, "\(name)[\(i)]")
            }
        }
        XCTAssertEqual(Double(m.upBias![2]), Double(0.625 * layer.experts[0].upBias![2] + 0.375 * layer.experts[1].upBias![2]), accuracy: 1e-6)
        // All-zero weights: plain mean.
        let mean = try Merging.weightedAverage(layer.experts, weights: [0, 0, 0])
        XCTAssertEqual(Double(mean.down.dense()[1, 1]), Double(layer.experts.map { $0.down.dense()[1, 1] }.reduce(0, +) / 3), accuracy: 1e-6)
    }

    /// Identity grouping reproduces the original layer exactly, and singletons are copied exactly.
    func testGroupsEqualToEReproducesTheModel() throws {
        let r = try CheckpointReader(fixture("trained-mixtral.h5"))
        let layer = try r.readLayer(r.layers[0].name)
        let f = [Double](repeating: 0.125, count: 8)
        let (merged, groups) = try Merging.mergeLayer(layer, grouping: .identity(8), frequency: f)
        XCTAssertEqual(merged, layer)
        XCTAssertTrue(groups.allSatisfy { $0.how == "copied" })
    }

    /// A merged layer with expert_map computes what the explicit per-slot layer computes.
    func testExpertMapForwardEquivalence() throws {
        var rng = SplitMix64(seed: 22)
        let layer = randomLayer(&rng, type: .mlp, router: .softmax_topk, activation: .relu, E: 6, k: 2)
        let grouping = LayerGrouping(groups: [[0, 3], [1, 2, 5], [4]], dominant: [3, 1, 4])
        let f = [0.1, 0.3, 0.05, 0.2, 0.25, 0.1]
        let (merged, _) = try Merging.mergeLayer(layer, grouping: grouping, frequency: f)
        XCTAssertEqual(merged.experts.count, 3)
        XCTAssertEqual(merged.expertMap, [1, 0, 0, 1, 2, 0])  // groups ordered by dominant slot: 1, 3, 4
        var perSlot = merged
        perSlot.experts = (0..<6).map { merged.experts[merged.expertMap![$0]] }
        perSlot.expertMap = nil
        let x = randomMatrix(50, layer.config.dModel, &rng)
        XCTAssertLessThan(relativeError(merged.forward(x), perSlot.forward(x)), 1e-6)
        // Singleton group 2 is slot 4 copied exactly.
        XCTAssertEqual(merged.experts[2], layer.experts[4])
    }

    /// On the planted fixtures, merging to the planted number of families with router-logits
    /// similarity finds the planted groups (ARI 1) and the merged layer barely moves.
    func testPlantedGroupsAreFound() throws {
        for (model, calib) in [("planted-switch.h5", "planted-switch.calib.h5"), ("planted-mixtral.h5", "planted-mixtral.calib.h5")] {
            let r = try CheckpointReader(fixture(model))
            let c = try CalibrationReader(fixture(calib))
            for cfg in r.layers {
                let layer = try r.readLayer(cfg.name)
                let truth = try XCTUnwrap(try SyntheticGenerator.readPlanted(r, layer: cfg.name))
                let x = try c.hiddenStates(cfg.name)
                let z = layer.logits(x)
                let e = cfg.numExperts
                var sim = [Double](repeating: 0, count: e * e)
                for i in 0..<e { for j in 0..<e {
                    var d = 0.0, ni = 0.0, nj = 0.0
                    for t in 0..<z.rows { let a = Double(z[t, i]), b = Double(z[t, j]); d += a * b; ni += a * a; nj += b * b }
                    sim[i * e + j] = (d / (ni * nj).squareRoot() + 1) / 2
                } }
                let freq = truth.counts.map { Double($0) / Double(z.rows * cfg.topK) }
                let P = Set(truth.family).count
                let g = Grouping.uniform(frequency: freq, similarity: sim, groups: P)
                XCTAssertEqual(Grouping.adjustedRandIndex(g.slotToGroup, truth.family), 1, "\(model) \(cfg.name): \(g.groups)")
                let (merged, _) = try Merging.mergeLayer(layer, grouping: g, frequency: freq)
                let err = relativeError(merged.forward(x), layer.forward(x))
                XCTAssertLessThan(err, 0.05, "\(model) \(cfg.name): merged output error \(err)")
                // Without alignment the average mixes unrelated neurons and the error is large.
                let (unaligned, _) = try Merging.mergeLayer(layer, grouping: g, frequency: freq, options: MergeOptions(align: false))
                XCTAssertGreaterThan(relativeError(unaligned.forward(x), layer.forward(x)), 5 * err, "\(model) \(cfg.name)")
            }
        }
    }
}
