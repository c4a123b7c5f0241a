/// One shard of a run split across processes: shard `index` (0-based) of `count`. The layers
/// of a model are split into `count` shards by `CheckpointReader.shardSplit` (deterministic,
/// balanced by expert bytes); a stage run with a shard computes only the selected layers of
/// its shard and writes a shard file, and `ShardAssembly` puts the shards back together.
public struct Shard: Sendable, Equatable, CustomStringConvertible {
    public let index: Int
    public let count: Int

    public init(index: Int, count: Int) throws {
        guard count >= 1 else { throw SMoEError.setting(.shard, "needs at least 1 shard, not \(count)") }
        guard (0..<count).contains(index) else {
            throw SMoEError.setting(.shard, "index \(index) is outside 0...\(count - 1) (shards are numbered from 0)")
        }
        self.index = index
        self.count = count
    }

    /// `I/N`, as in `--shard 2/4`.
    public init(parsing text: String) throws {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 2, let i = Int(parts[0]), let n = Int(parts[1]) else {
            throw SMoEError.setting(.shard, "must be I/N (shard I of N, numbered from 0, e.g. 0/4), not '\(text)'")
        }
        try self.init(index: i, count: n)
    }

    public var description: String { "\(index)/\(count)" }
}
