import Foundation
import XCTest
@testable import SMoECompress

/// `--max-memory`: the calibration block is lowered to fit the predicted peak, or the run stops
/// up front naming the smallest budget that would work (issue 15, item 1).
final class MemoryModelTests: XCTestCase {
    func testBlockSizeFitsTheBudgetOrTheErrorNamesTheSmallest() throws {
        let model = try CheckpointReader(fixture("trained-mixtral.h5"))
        let c = model.layers[0]
        let regmean = MemoryModel.Work.merge(groups: 4, largestGroup: nil, outputAware: true, lowRank: false)
        let least = MemoryModel.peakBytes(regmean, layer: c, blockSize: 1)
        // Ample: the requested block stands.
        XCTAssertEqual(try MemoryModel.blockSize(regmean, model: model, layers: nil, budget: 1 << 40, requested: 4096), 4096)
        // Room for exactly 100 more tokens than one: a block of 101, and its peak fits.
        let budget = MemoryModel.peakBytes(regmean, layer: c, blockSize: 101)
        let block = try MemoryModel.blockSize(regmean, model: model, layers: nil, budget: budget, requested: 4096)
        XCTAssertEqual(block, 101)
        XCTAssertLessThanOrEqual(MemoryModel.peakBytes(regmean, layer: c, blockSize: block), budget)
        XCTAssertGreaterThan(MemoryModel.peakBytes(regmean, layer: c, blockSize: block + 1), budget)
        // Too little: one error naming the setting and the smallest budget.
        XCTAssertThrowsError(try MemoryModel.blockSize(regmean, model: model, layers: nil, budget: least - 1, requested: 4096)) { e in
            XCTAssertEqual((e as? SMoEError)?.setting, .maxMemory)
            XCTAssertTrue("\(e)".contains(MemoryModel.gib(least)), "\(e)")
        }
        // The stages' needs are ordered: router statistics < merging by frequency < RegMean
        // merging ≤ RegMean merging then factoring; a smaller largest group needs less.
        let frequency = MemoryModel.Work.merge(groups: 4, largestGroup: nil, outputAware: false, lowRank: false)
        let factored = MemoryModel.Work.merge(groups: 4, largestGroup: nil, outputAware: true, lowRank: true)
        let pairs = MemoryModel.Work.merge(groups: 4, largestGroup: 2, outputAware: true, lowRank: false)
        XCTAssertLessThan(MemoryModel.peakBytes(.statistics(readsExperts: false), layer: c, blockSize: 1), MemoryModel.peakBytes(frequency, layer: c, blockSize: 1))
        XCTAssertLessThan(MemoryModel.peakBytes(frequency, layer: c, blockSize: 1), least)
        XCTAssertLessThanOrEqual(least, MemoryModel.peakBytes(factored, layer: c, blockSize: 1))
        XCTAssertLessThan(MemoryModel.peakBytes(pairs, layer: c, blockSize: 1), least)
    }

    /// The alignment term at the Mixtral-8x7B shape, by hand: the reference and, per worker, an
    /// expert and its d_ff² cost matrix; no calibration block; never more workers than experts
    /// to align.
    func testAlignmentPeakKnownAnswer() {
        let c = LayerConfig(name: "mx", index: 0, numExperts: 8, topK: 2, dModel: 4096, dFF: 14336, expertType: .glu,
                            activation: .silu, routerType: .softmax_topk_norm)
        let e = 3 * 4096 * 14336 * 4, cost = 4 * 14336 * 14336
        XCTAssertEqual(MemoryModel.peakBytes(.alignment(workers: 2), layer: c, blockSize: 4096), MemoryModel.base + e + 2 * (e + cost))
        XCTAssertEqual(MemoryModel.peakBytes(.alignment(workers: 1), layer: c, blockSize: 1), MemoryModel.base + 2 * e + cost)
        XCTAssertEqual(MemoryModel.peakBytes(.alignment(workers: 64), layer: c, blockSize: 1), MemoryModel.base + e + 7 * (e + cost))
    }

    /// The merge terms at the Mixtral-8x7B shape, by hand (G = 4, largest group 2): RegMean's
    /// tokens cost a member's up, gate and hidden activations per block token and float64 copies
    /// of at most `float64ChunkRows` of them; merging by frequency costs one block.
    func testMergePeakKnownAnswer() {
        let d = 4096, f = 14336
        let c = LayerConfig(name: "mx", index: 0, numExperts: 8, topK: 2, dModel: d, dFF: f, expertType: .glu,
                            activation: .silu, routerType: .softmax_topk_norm)
        let e = 3 * d * f * 4, experts = 3 * e + 2 * e + e
        func peak(_ outputAware: Bool, _ block: Int) -> Int {
            MemoryModel.peakBytes(.merge(groups: 4, largestGroup: 2, outputAware: outputAware, lowRank: false), layer: c, blockSize: block)
        }
        XCTAssertEqual(peak(true, 4096), MemoryModel.base + experts + 8 * (f * f + 2 * d * f) + 4096 * (d + 3 * f) * 4 + 1024 * (16 * f + 8 * d))
        XCTAssertEqual(peak(true, 100), MemoryModel.base + experts + 8 * (f * f + 2 * d * f) + 100 * (d + 3 * f) * 4 + 100 * (16 * f + 8 * d))
        XCTAssertEqual(peak(false, 4096), MemoryModel.base + experts + 4 * f * f + 4096 * (d + f) * 4)
    }

    /// The merge term at the DeepSeek-V3 shape of issue 24 (64 experts, d_model 7168, d_ff 2048,
    /// G = 32, largest group 8), by hand: 40 float32 experts (31 merged, the group's 8, one
    /// more), RegMean's streamed system and the block's tokens. compress holds no second copy of
    /// the merged layer (it is rounded to the output type in place), so this is its peak too.
    func testDeepSeekV3MergePeakKnownAnswer() {
        let d = 7168, f = 2048
        let c = LayerConfig(name: "ds3", index: 0, numExperts: 64, topK: 8, dModel: d, dFF: f, expertType: .glu,
                            activation: .silu, routerType: .sigmoid_topk_norm)
        let e = 3 * d * f * 4
        XCTAssertEqual(e, 176_160_768)
        let peak = MemoryModel.peakBytes(.merge(groups: 32, largestGroup: 8, outputAware: true, lowRank: false), layer: c, blockSize: 4096)
        let expected = MemoryModel.base + 40 * e + 8 * (f * f + 2 * d * f) + 4096 * (d + 3 * f) * 4 + 1024 * (16 * f + 8 * d)
        XCTAssertEqual(peak, expected)
        XCTAssertEqual(peak, 7_730_102_272)  // 7.20 GiB: the figure in docs/ALGORITHM.md "Scale"
    }

    /// Rounding in place stores the same bits as the copying form, dense and factored.
    func testRoundForStorageInPlaceMatchesCopy() throws {
        var rng = SplitMix64(seed: 24)
        var layer = randomLayer(&rng, type: .glu, router: .sigmoid_topk_norm, E: 4, biases: true)
        layer.experts[1].down = .factored(LowRankSparse.exact(layer.experts[1].down.dense()))
        let copy = layer
        for type in [StorageType.bf16, .f16, .f32] {
            var inPlace = layer
            inPlace.roundForStorage(type)
            XCTAssertEqual(inPlace, layer.roundedForStorage(type))
        }
        XCTAssertEqual(layer, copy)  // the copying form leaves its input as it was
    }

    /// The low-rank term at the Mixtral-8x7B shape, by hand: streaming holds one expert, else the
    /// layer; the factors of rank r (and sparse entries) are counted, at most the layer's size;
    /// with no known rank (an energy rule) they count as the layer.
    func testLowRankPeakKnownAnswer() {
        let d = 4096, f = 14336
        let c = LayerConfig(name: "mx", index: 0, numExperts: 8, topK: 2, dModel: d, dFF: f, expertType: .glu,
                            activation: .silu, routerType: .softmax_topk_norm)
        // GLU: up and gate are factored side by side, so the work counts twice.
        let e = 3 * d * f * 4, layer = 8 * e, work = 2 * (12 * f * f + 12 * d * f), block = 4096 * (d + f) * 4
        let factors = 8 * 3 * (d + f) * 1024 * 4
        func peak(_ w: MemoryModel.Work) -> Int { MemoryModel.peakBytes(w, layer: c, blockSize: 4096) }
        XCTAssertEqual(peak(.lowRank(streams: true, rank: 1024, sparsity: 0)), MemoryModel.base + e + factors + work + block)
        XCTAssertEqual(peak(.lowRank(streams: false, rank: 1024, sparsity: 0)), MemoryModel.base + layer + factors + work + block)
        // An eighth of the entries sparse: 8 bytes each (value, index).
        XCTAssertEqual(peak(.lowRank(streams: true, rank: 1024, sparsity: 0.125)),
                       MemoryModel.base + e + factors + 8 * 3 * d * f + work + block)
        XCTAssertEqual(peak(.lowRank(streams: true, rank: 1024, sparsity: 0.5)), MemoryModel.base + e + layer + work + block)
        XCTAssertEqual(peak(.lowRank(streams: true, rank: nil, sparsity: 0)), MemoryModel.base + e + layer + work + block)
        XCTAssertEqual(peak(.lowRank(streams: true, rank: 4096, sparsity: 0)), MemoryModel.base + e + layer + work + block)
        // The options say which: a fixed rank (or a larger per-matrix override), streaming unless
        // the weight objective has calibration tokens.
        // down takes the output Gram by default, so no d_ff² Gram (`largeGram` false).
        var o = LowRankOptions(rank: .fixed(1024))
        XCTAssertEqual(o.memoryWork(hasTokens: true), .lowRank(streams: true, rank: 1024, sparsity: 0, largeGram: false))
        o.ranks = ["down.3": 2048]
        o.objective = .weight
        XCTAssertEqual(o.memoryWork(hasTokens: true), .lowRank(streams: false, rank: 2048, sparsity: 0, largeGram: false))
        XCTAssertEqual(o.memoryWork(hasTokens: false), .lowRank(streams: true, rank: 2048, sparsity: 0, largeGram: false))
        XCTAssertEqual(LowRankOptions(rank: .energy(0.9)).memoryWork(hasTokens: false),
                       .lowRank(streams: true, rank: nil, sparsity: 0, largeGram: false))
    }

    /// Issue 29: where down takes the output Gram the factoring work has no d_ff² term. By hand
    /// at the Mixtral-8x7B shape (p = min(d, f) = 4096): 32·p² + 16·d·f = 1,476,395,008 B
    /// (1.37 GiB) against 12·f² + 12·d·f = 3,170,893,824 B (2.95 GiB) with the input Gram, so the
    /// lowrank rank-1024 prediction drops by 1,694,498,816 B. The options say which: whitened
    /// with a sparse part or `--svd exact` keeps the large Gram; and a d_ff < d_model layer's
    /// large Gram is d_model² (up/gate's inputs).
    func testLowRankWorkWithoutLargeGram() {
        let d = 4096, f = 14336
        let c = LayerConfig(name: "mx", index: 0, numExperts: 8, topK: 2, dModel: d, dFF: f, expertType: .glu,
                            activation: .silu, routerType: .softmax_topk_norm)
        let e = 3 * d * f * 4, block = 4096 * (d + f) * 4
        let factors = 8 * 3 * (d + f) * 1024 * 4
        XCTAssertEqual(32 * d * d + 16 * d * f, 1_476_395_008)
        func peak(_ w: MemoryModel.Work, _ c: LayerConfig = c) -> Int { MemoryModel.peakBytes(w, layer: c, blockSize: 4096) }
        let small = peak(.lowRank(streams: true, rank: 1024, sparsity: 0, largeGram: false))
        let large = peak(.lowRank(streams: true, rank: 1024, sparsity: 0, largeGram: true))
        // GLU: up and gate are factored side by side, so each work term counts twice.
        XCTAssertEqual(small, MemoryModel.base + e + factors + 2 * 1_476_395_008 + block)
        XCTAssertEqual(large - small, 2 * 1_694_498_816)
        XCTAssertEqual(Double(small) / 1_073_741_824, 5.47, accuracy: 0.005)  // ALGORITHM.md's table: 5.47 GiB
        // compress --rank: the low-rank side of the merge term drops the same, the merge side is unchanged.
        let m = MemoryModel.Work.merge(groups: 4, largestGroup: 2, outputAware: true, lowRank: true, largeGram: false)
        XCTAssertEqual(peak(m), max(peak(.merge(groups: 4, largestGroup: 2, outputAware: true, lowRank: false)),
                                    MemoryModel.base + 4 * e + 2 * 1_476_395_008 + block))
        var o = LowRankOptions(rank: .fixed(1024))
        XCTAssertFalse(o.needsLargeGram(hasTokens: true))
        o.sparsity = 0.01
        XCTAssertTrue(o.needsLargeGram(hasTokens: true))
        XCTAssertFalse(o.needsLargeGram(hasTokens: false))
        XCTAssertTrue(LowRankOptions(rank: .fixed(8), svd: .exact).needsLargeGram(hasTokens: true))
        XCTAssertFalse(LowRankOptions(rank: .fixed(8), svd: .exact, objective: .weight).needsLargeGram(hasTokens: true))
        // d_ff < d_model (DeepSeek-V3's 7168 × 2048): the large Gram is up/gate's 7168².
        let ds = LayerConfig(name: "ds", index: 0, numExperts: 8, topK: 2, dModel: 7168, dFF: 2048, expertType: .glu,
                             activation: .silu, routerType: .softmax_topk_norm)
        let w = peak(.lowRank(streams: true, rank: 256, sparsity: 0, largeGram: true), ds) -
            peak(.lowRank(streams: true, rank: 256, sparsity: 0, largeGram: false), ds)
        XCTAssertEqual(w, 2 * ((12 * 7168 * 7168 + 12 * 7168 * 2048) - (32 * 2048 * 2048 + 16 * 7168 * 2048)))
    }

    /// The merge stage fits the block to its planned groupings: the budget that leaves room for
    /// 100 more tokens than one, with the planned largest group, gives a block of 101.
    func testMergeStageFitsTheBlockToItsPlan() throws {
        let model = try CheckpointReader(fixture("trained-mixtral.h5"))
        let calib = try CalibrationReader(fixture("trained-mixtral.calib.h5"))
        let planned = try MergeStage(model: model, calibration: calib, stats: nil, settings: MergeSettings(groups: 4))
        var largest: [String: Int] = [:]
        for (name, p) in planned.plans { largest[name] = p.grouping.groups.map(\.count).max() }
        let work = model.layers.map { ($0, MemoryModel.Work.merge(groups: 4, largestGroup: largest[$0.name], outputAware: true, lowRank: false)) }
        let least = work.map { MemoryModel.peakBytes($0.1, layer: $0.0, blockSize: 1) }.max()!
        var settings = MergeSettings(groups: 4)
        settings.maxMemory = work.map { MemoryModel.peakBytes($0.1, layer: $0.0, blockSize: 101) }.max()!
        XCTAssertEqual(try MergeStage(model: model, calibration: calib, stats: nil, settings: settings).settings.tokens.blockSize, 101)
        settings.maxMemory = least - 1
        XCTAssertThrowsError(try MergeStage(model: model, calibration: calib, stats: nil, settings: settings)) { e in
            XCTAssertEqual((e as? SMoEError)?.setting, .maxMemory)
        }
    }

    func testCommandLineBudget() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("trained-mixtral.h5"), c = fixture("trained-mixtral.calib.h5")
        let small = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--max-memory", "1MiB", "-o", dir + "/x.h5", "--quiet"])
        XCTAssertEqual(small.status, 1)
        XCTAssertTrue(small.stderr.hasPrefix("error: --max-memory: 0.00 GiB is too little: layer ") && small.stderr.split(separator: "\n").count == 1,
                      small.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/x.h5"))
        let ok = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--max-memory", "8GiB", "-o", dir + "/m.h5", "--json", "--quiet"])
        XCTAssertEqual(ok.status, 0, ok.stderr)
        // lowrank: refused below its predicted peak, naming it; run within it.
        let need = MemoryModel.peakBytes(LowRankOptions(rank: .fixed(8)).memoryWork(hasTokens: true),
                                         layer: try CheckpointReader(m).layers[0], blockSize: 1)
        let tight = try runCLI(["lowrank", m, "--calib", c, "--rank", "8", "--max-memory", "\(need - 1)", "-o", dir + "/l.h5", "--quiet"])
        XCTAssertEqual(tight.status, 1)
        XCTAssertTrue(tight.stderr.contains("needs at least \(MemoryModel.gib(need))"), tight.stderr)
        let fits = try runCLI(["lowrank", m, "--calib", c, "--rank", "8", "--max-memory", "\(need + 64 * 4096)", "-o", dir + "/l.h5", "--quiet"])
        XCTAssertEqual(fits.status, 0, fits.stderr)
        let bad = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--max-memory", "lots", "-o", dir + "/y.h5", "--quiet"])
        XCTAssertTrue(bad.stderr.hasPrefix("error: --max-memory: 'lots' is not a size"), bad.stderr)
    }
}
