import CHDF5
import Foundation

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
            h.add("\(c.name)|\(c.index)|\(c.numExperts)|\(c.topK)|\(c.dModel)|\(c.dFF)|\(c.expertType.rawValue)|\(c.activation.rawValue)|\(c.routerType.rawValue)")
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

/// FNV-1a, 64 bits: a small, fast, non-cryptographic hash (fingerprints, not security).
struct FNV1a {
    private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325

    mutating func add(bytes: some Sequence<UInt8>) {
        for b in bytes { value = (value ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
    }

    /// Adds a string and a separator, so ("ab", "c") and ("a", "bc") differ.
    mutating func add(_ s: String) {
        add(bytes: s.utf8)
        add(bytes: [0])
    }

    var hex: String {
        let s = String(value, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }

    static func hex(_ s: String) -> String {
        var h = FNV1a()
        h.add(bytes: s.utf8)
        return h.hex
    }
}

extension H5Dataset {
    /// The first up to 64 values of the first row of the first and the last entry along the
    /// first dimension (for a 1-D dataset, its first 64 values), as stored (raw bytes).
    func sampleRaw() throws -> [UInt8] {
        guard let type = rawElementType, elementCount > 0 else { return [] }
        if shape.count <= 1 {
            return try sampleRaw(start: [0], count: [min(shape.first ?? 1, 64)], type: type)
        }
        var out: [UInt8] = []
        for first in Set([0, shape[0] - 1]).sorted() {
            var start = [Int](repeating: 0, count: shape.count)
            start[0] = first
            var count = [Int](repeating: 1, count: shape.count)
            count[shape.count - 1] = min(shape[shape.count - 1], 64)
            out += try sampleRaw(start: start, count: count, type: type)
        }
        return out
    }

    private func sampleRaw(start: [Int], count: [Int], type: RawElementType) throws -> [UInt8] {
        let n = count.reduce(1, *)
        var out = [UInt8](repeating: 0, count: n * type.byteSize)
        let fs = H5Dget_space(id)
        defer { H5Sclose(fs) }
        if shape.isEmpty {
            H5Sselect_all(fs)
        } else {
            H5Sselect_hyperslab(fs, H5S_SELECT_SET, start.map { hsize_t($0) }, nil, count.map { hsize_t($0) }, nil)
        }
        let ms = H5Screate_simple(1, [hsize_t(n)], nil)
        defer { H5Sclose(ms) }
        let t = type.h5Type()
        defer { H5Tclose(t) }
        let status = out.withUnsafeMutableBytes { H5Dread(id, t, ms, fs, hid_t(H5P_DEFAULT), $0.baseAddress) }
        if status < 0 { throw fail("cannot be read (damaged file?)") }
        return out
    }
}

// MARK: settings records of the stages (what shards of one run must agree on)

extension StatisticsStage {
    public var settingsRecord: JSONValue {
        historyEntry([]).adding([("max_tokens", tokens.maxTokens.map(JSONValue.int) ?? .null)])
    }
}

extension LowRankStage {
    public var settingsRecord: JSONValue {
        historyEntry([]).adding([("tokens", tokens.record)])
    }
}

extension MergeStage {
    /// The settings, the tokens and, for adaptive grouping, the global plan (every layer's
    /// groups), so shards that planned differently (other statistics) do not assemble.
    public var settingsRecord: JSONValue {
        var extra: [(String, JSONValue)] = [("tokens", settings.tokens.record)]
        if settings.adaptive {
            extra.append(("plan", .object(layers.compactMap { n in
                plans[n].map { (n, .array($0.grouping.groups.map { JSONValue($0) })) }
            })))
        }
        return historyEntry([]).adding(extra)
    }
}

extension CompressStage {
    public var settingsRecord: JSONValue {
        var kv: [(String, JSONValue)] = [("stage", .string(name)), ("merge", merge.settingsRecord),
                                         ("activation_aware", .bool(settings.activationAware)),
                                         ("evaluation_tokens", .string(evaluation.path)), ("storage", .string(storage.rawValue))]
        if let l = settings.lowRank { kv.append(("lowrank", .object(l.historyJSON))) }
        return .object(kv)
    }
}

extension TokenSettings {
    var record: JSONValue {
        .object([("block_size", .int(blockSize)), ("max_tokens", maxTokens.map(JSONValue.int) ?? .null)])
    }
}

extension JSONValue {
    /// An object with `extra` keys appended (other values unchanged).
    func adding(_ extra: [(String, JSONValue)]) -> JSONValue {
        guard case .object(let kv) = self else { return self }
        return .object(kv + extra)
    }
}

extension MergeStage {
    /// The layers a merge plans: all selected ones, or with a shard and uniform grouping only
    /// the shard's; adaptive grouping with a shard needs a statistics file of every layer.
    static func plannedLayers(_ names: [String], model: CheckpointReader, shard: Shard?, adaptive: Bool,
                              stats: StatsReader?) throws -> [String] {
        guard let shard else { return names }
        if adaptive {
            guard stats != nil else {
                throw SMoEError.setting(.stats, "is needed with {adaptive} and {shard}: the global plan is made from the statistics of every layer (run stats first)")
            }
            return names
        }
        let mine = Set(try model.shardLayers(shard))
        return names.filter(mine.contains)
    }
}
