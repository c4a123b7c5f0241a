import Foundation

/// The peak memory a stage is predicted to need on one layer (docs/ALGORITHM.md, "Scale: time
/// and memory"), and the calibration block size that fits a budget. The multiples of the layer
/// size were measured with `smoe-bench scale` at d_model 1024 / d_ff 3584 and at the
/// Mixtral-8x7B shape; they describe the current code, which holds a whole layer in float32.
public enum MemoryModel {
    /// What a stage does to a layer, as far as memory goes.
    public enum Work: Sendable {
        /// `stats`: the layer and one block of activations.
        case statistics
        /// `align`, frequency merging: the layer, the aligned members and the merged experts.
        case alignment
        /// RegMean merging (and `compress` with it): as alignment, plus the Gram working set.
        case outputAware
        /// `lowrank`: the layer, its factors and the SVD work space.
        case lowRank
    }

    static let base = 100 << 20

    /// Predicted peak resident bytes for `work` on layer `c` with `blockSize` tokens per block.
    public static func peakBytes(_ work: Work, layer c: LayerConfig, blockSize: Int) -> Int {
        let d = Double(c.dModel), f = Double(c.dFF)
        let layer = Double(c.numExperts) * (c.expertType == .glu ? 3 : 2) * d * f * 4
        let block = Double(blockSize) * (d + f) * 4
        let gram = 8 * (2 * f * f + 2 * d * d + 3 * d * f)
        let fixed: Double
        switch work {
        case .statistics: fixed = 1.3 * layer
        case .alignment: fixed = 1.85 * layer
        case .outputAware: fixed = 1.85 * layer + 2.3 * gram
        case .lowRank: fixed = 4 * layer
        }
        return base + Int(min(fixed + block, 9e18))
    }

    /// The largest block size, at most `requested`, whose predicted peak fits `budget` on every
    /// layer of `names` (nil: all) of `model`; throws, naming the smallest budget that would
    /// work (with one token per block) and the layer that needs it, when none does.
    public static func blockSize(_ work: Work, model: CheckpointReader, layers names: [String]?, budget: Int,
                                 requested: Int) throws -> Int {
        let selected = try model.selectLayers(names)
        var block = requested
        for c in model.layers where selected.contains(c.name) {
            let least = peakBytes(work, layer: c, blockSize: 1)
            guard least <= budget else {
                throw SMoEError.setting(.maxMemory, "\(gib(budget)) is too little: layer \(c.name) needs at least \(gib(least)) (predicted peak of this stage on a \(c.numExperts) × \(c.dModel) × \(c.dFF) layer, docs/ALGORITHM.md \"Scale\")")
            }
            let perToken = Double(c.dModel + c.dFF) * 4
            block = min(block, max(1, Int(Double(budget - least) / perToken) + 1))
        }
        return block
    }

    static func gib(_ b: Int) -> String { String(format: "%.2f GiB", Double(b) / 1_073_741_824) }
}
