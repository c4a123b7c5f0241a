import Foundation

extension CheckpointReader {
    /// A fingerprint of the model (16 hex digits, FNV-1a 64) over what identifies it cheaply:
    /// architecture, source_config and history; every MoE layer's attributes; the path, shape
    /// and element type of every dataset under `/moe_layers` and `/dense`; the router weights
    /// and biases in full; and, of every other `/moe_layers` dataset, the first 64 values of
    /// the first row of its first and last entry (e.g. experts 0 and G−1). Equal for the same
    /// file wherever it is copied; it tells apart models of other shapes, other routers, or other
    /// sampled weights (an aligned or merged copy), but not a change confined to unsampled weights.
    public func fingerprint() throws -> String {
        var h = FNV1a()
        h.add(architecture)
        h.add(sourceConfig ?? "")
        h.add(JSONValue.array(history).serialized())
        let root = file.root
        for c in layers {
            h.add("\(c.name)|\(c.index)|\(c.numExperts)|\(c.topK)|\(c.dModel)|\(c.dFF)|\(c.expertType.rawValue)|\(c.activation.rawValue)|\(c.routerType.rawValue)"
                  + (c.isPlainSoftmaxRouting ? "" : "|\(c.numGroups)|\(c.topKGroups)|\(c.routedScalingFactor)"))
            let g = try layerGroup(c.name)
            for p in try g.datasetPaths() {
                let d = try g.openDataset(p)
                h.add("\(p)|\(d.shape)|\(d.rawElementType?.rawValue ?? "?")")
                if p.hasPrefix("router/") {
                    h.add(bytes: try d.readRaw())
                } else {
                    h.add(bytes: try d.sampleRaw())
                }
            }
        }
        if hasDense {
            let g = try root.openGroup("dense")
            for p in try g.datasetPaths() {
                let d = try g.openDataset(p)
                h.add("dense/\(p)|\(d.shape)|\(d.rawElementType?.rawValue ?? "?")")
            }
        }
        return h.hex
    }
}
