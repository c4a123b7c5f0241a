import Foundation

/// What a shard file records about itself (root attributes, docs/FORMAT.md §5): which run it is
/// a shard of, which layers it holds, and fingerprints of the model and of every setting.
public struct ShardHeader: Sendable {
    /// The kind of file the shards assemble into: `smoe-checkpoint` or `smoe-stats`.
    public var kind: String
    public var stage: String
    public var shard: Shard
    /// The shard's layers in the model's split (selected or not).
    public var assigned: [String]
    /// The layers the file holds (the selected layers of its shard).
    public var layers: [String]
    /// The layers the run selected (of every shard).
    public var selection: [String]
    /// The model path as the run was given it (for messages only).
    public var model: String
    public var modelFingerprint: String
    /// Canonical JSON of the stage, its settings, the selection and the output options.
    public var settings: String

    public var settingsFingerprint: String { FNV1a.hex(settings) }

    func write(to root: H5Group) throws {
        try root.setAttribute("format", "smoe-shard")
        try root.setAttribute("shard_of", kind)
        try root.setAttribute("stage", stage)
        try root.setAttribute("shard_index", shard.index)
        try root.setAttribute("shard_count", shard.count)
        try root.setAttribute("shard_layers", JSONValue(assigned).serialized())
        try root.setAttribute("layers", JSONValue(layers).serialized())
        try root.setAttribute("selection", JSONValue(selection).serialized())
        try root.setAttribute("model", model)
        try root.setAttribute("model_fingerprint", modelFingerprint)
        try root.setAttribute("settings", settings)
        try root.setAttribute("settings_fingerprint", settingsFingerprint)
    }

    init(reading root: H5Group, path: String) throws {
        func names(_ key: String) throws -> [String] {
            guard let a = try? JSONValue.parse(try root.stringAttribute(key)).arrayValue,
                  case let v = a.compactMap(\.stringValue), v.count == a.count else {
                throw SMoEError.dataset(path, "/@\(key)", "is not a JSON array of layer names")
            }
            return v
        }
        kind = try root.stringAttribute("shard_of")
        guard kind == "smoe-checkpoint" || kind == "smoe-stats" else {
            throw SMoEError.dataset(path, "/@shard_of", "is \"\(kind)\", expected smoe-checkpoint or smoe-stats")
        }
        stage = try root.stringAttribute("stage")
        do {
            shard = try Shard(index: try root.intAttribute("shard_index"), count: try root.intAttribute("shard_count"))
        } catch let e as SMoEError where e.setting != nil {
            throw SMoEError.dataset(path, "/@shard_index", e.detail)
        }
        assigned = try names("shard_layers")
        layers = try names("layers")
        selection = try names("selection")
        model = try root.stringAttribute("model")
        modelFingerprint = try root.stringAttribute("model_fingerprint")
        settings = try root.stringAttribute("settings")
        guard try root.stringAttribute("settings_fingerprint") == settingsFingerprint else {
            throw SMoEError.dataset(path, "/@settings", "does not match its settings_fingerprint (damaged file?)")
        }
    }
}

extension CheckpointWriter {
    /// Writer of a checkpoint shard of a run on `source` (`Shard`): its layers and history
    /// only, no `/dense`; `commit(shard:…)` records the shard.
    public convenience init(destination: String, shardOf source: CheckpointReader, entry: JSONValue,
                            options: WriteOptions = WriteOptions()) throws {
        try self.init(destination: destination, architecture: source.architecture, history: source.history,
                      entry: entry, sourceConfig: source.sourceConfig, options: options)
        try root.setAttribute("format", "smoe-shard")
        try root.setAttribute("shard_of", "smoe-checkpoint")
    }
}

extension StatsWriter {
    /// Writer of a statistics shard (the computed layers, as a statistics file holds anyway).
    public convenience init(shardDestination destination: String, source: String) throws {
        try self.init(destination: destination, source: source)
        try file.root.setAttribute("format", "smoe-shard")
        try file.root.setAttribute("shard_of", "smoe-stats")
    }
}

/// An opened shard file; its header read and its layers checked against the header.
public final class ShardFile: @unchecked Sendable {
    public let path: String
    let file: H5File
    public let header: ShardHeader
    /// The last history entry (checkpoint shards), or the `source` attribute (statistics shards).
    let entry: JSONValue
    let source: String?

    public init(_ path: String) throws {
        self.path = path
        file = try openSMoEFile(path, expecting: "smoe-shard")
        let root = file.root
        header = try ShardHeader(reading: root, path: path)
        guard root.isGroup("moe_layers") else { throw SMoEError.dataset(path, "/moe_layers", "missing group") }
        let stored = Set(try root.openGroup("moe_layers").childNames())
        if stored != Set(header.layers) {
            let lacking = header.layers.filter { !stored.contains($0) }
            throw SMoEError.dataset(path, "/moe_layers", lacking.isEmpty
                ? "holds layers its header does not list (\(stored.subtracting(header.layers).sorted().joined(separator: ", ")))"
                : "lacks layers its header lists (\(lacking.joined(separator: ", "))): incomplete file")
        }
        if header.kind == "smoe-stats" {
            source = try root.stringAttribute("source")
            entry = .null
        } else {
            source = nil
            let h = root.hasAttribute("history") ? try? JSONValue.parse(try root.stringAttribute("history")) : nil
            entry = h?.arrayValue?.last ?? .null
        }
    }
}
