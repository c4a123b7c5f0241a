import Foundation

/// One shard of a split: its layers (in index order) and their expert bytes.
public struct ShardAssignment: Sendable {
    public var shard: Int
    public var layers: [String]
    public var expertBytes: Int
}

extension CheckpointReader {
    /// Expert bytes of a layer for balancing shards: stored numbers × their width (what reading
    /// and computing the layer costs; independent of gzip).
    func balanceBytes(_ name: String) throws -> Int {
        let s = try summary(name)
        return s.expertParameters * (s.matrices.first?.storage.byteSize ?? 4)
    }

    /// The model's layers split into `count` shards: largest layers first, each to the shard
    /// with the fewest bytes so far (ties to the lower layer index and the lower shard). Depends
    /// only on the layers' shapes, so every process computes the same split. More shards than
    /// layers leave shards empty.
    public func shardSplit(count: Int) throws -> [ShardAssignment] {
        guard count >= 1 else { throw SMoEError.setting(.shards, "must be at least 1, not \(count)") }
        let sized = try layers.enumerated().map { (i, c) in (i, c.name, try balanceBytes(c.name)) }
        var load = [Int](repeating: 0, count: count)
        var members = [[Int]](repeating: [], count: count)
        for (i, _, bytes) in sized.sorted(by: { ($1.2, $0.0) < ($0.2, $1.0) }) {
            let s = load.indices.min { (load[$0], $0) < (load[$1], $1) }!
            load[s] += bytes
            members[s].append(i)
        }
        return (0..<count).map { s in
            ShardAssignment(shard: s, layers: members[s].sorted().map { layers[$0].name }, expertBytes: load[s])
        }
    }

    /// The layers of one shard, in index order.
    public func shardLayers(_ shard: Shard) throws -> [String] {
        try shardSplit(count: shard.count)[shard.index].layers
    }
}
