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

    /// The header of a finished shard run of `stage`.
    init<S: LayerStage>(kind: String, stage: S, shard: Shard, result: StageResult<S.Report>, model: CheckpointReader,
                        output: JSONValue) throws {
        self.kind = kind
        self.stage = stage.name
        self.shard = shard
        assigned = try model.shardLayers(shard)
        layers = result.layers.filter(\.computed).map(\.name)
        selection = stage.layers
        self.model = model.path
        modelFingerprint = try model.fingerprint()
        settings = JSONValue.object([("stage", .string(stage.name)), ("settings", stage.settingsRecord),
                                     ("layers", JSONValue(stage.layers)), ("output", output)]).serialized()
    }

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

    /// Records the run's history entry and the shard header, then commits.
    public func commit<S: LayerStage>(shard: Shard, of stage: S, result: StageResult<S.Report>, model: CheckpointReader) throws {
        updateEntry(result.history)
        let output = JSONValue.object([("dtype", .string(options.dtype.rawValue)),
                                       ("gzip", options.gzip.map(JSONValue.int) ?? .null)])
        try ShardHeader(kind: "smoe-checkpoint", stage: stage, shard: shard, result: result, model: model, output: output)
            .write(to: root)
        try commit()
    }
}

extension StatsWriter {
    /// Writer of a statistics shard (the computed layers, as a statistics file holds anyway).
    public convenience init(shardDestination destination: String, source: String) throws {
        try self.init(destination: destination, source: source)
        try file.root.setAttribute("format", "smoe-shard")
        try file.root.setAttribute("shard_of", "smoe-stats")
    }

    /// Records the shard header, then commits.
    public func commit<S: LayerStage>(shard: Shard, of stage: S, result: StageResult<S.Report>, model: CheckpointReader) throws {
        try ShardHeader(kind: "smoe-stats", stage: stage, shard: shard, result: result, model: model, output: .null)
            .write(to: file.root)
        try commit()
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

/// Shards of one run checked against the model and each other, and written as one file.
public struct ShardAssembly {
    public let model: CheckpointReader
    public let shards: [ShardFile]
    /// Selected layers no given shard holds (only with `allowPartial`; copied unchanged into a
    /// checkpoint, absent from statistics).
    public let missing: [String]

    /// Checks every shard: a file that opens as a complete shard, of this model (fingerprint),
    /// made with the same settings as the first good shard, of as many shards, holding the
    /// layers the split gives its index, each index once. Returns every problem found, one per
    /// bad shard (each names the shard), plus one for missing shards unless `allowPartial`.
    public static func check(model: CheckpointReader, shards paths: [String],
                             allowPartial: Bool) -> (assembly: ShardAssembly?, problems: [SMoEError]) {
        var problems: [SMoEError] = []
        let fingerprint: String
        do { fingerprint = try model.fingerprint() } catch let e as SMoEError { return (nil, [e]) } catch {
            return (nil, [SMoEError.file(model.path, "\(error)")])
        }
        guard !paths.isEmpty else { return (nil, [SMoEError("no shard files given")]) }
        var good: [ShardFile] = []
        var byIndex: [Int: ShardFile] = [:]
        for path in paths {
            do {
                let s: ShardFile
                do { s = try ShardFile(path) } catch let e as SMoEError { throw e.naming(path) }
                let h = s.header
                guard h.modelFingerprint == fingerprint else {
                    throw SMoEError.file(path, "is a shard of another model (\(h.model), fingerprint \(h.modelFingerprint)), not of \(model.path) (fingerprint \(fingerprint))")
                }
                if let first = good.first {
                    if h.settings != first.header.settings {
                        throw SMoEError.file(path, "was made with other settings than \(first.path): \(settingsDifference(h.settings, first.header.settings))")
                    }
                    if h.shard.count != first.header.shard.count {
                        throw SMoEError.file(path, "is shard \(h.shard) but \(first.path) is one of \(first.header.shard.count) shards")
                    }
                }
                if let other = byIndex[h.shard.index] {
                    throw SMoEError.file(path, "shard \(h.shard) is given twice (also \(other.path)): its layers would be covered twice")
                }
                let split = try model.shardLayers(h.shard)
                guard h.assigned == split, Set(h.layers).isSubset(of: split) else {
                    throw SMoEError.file(path, "holds layers (\(h.layers.joined(separator: ", "))) that are not shard \(h.shard) of \(model.path) (\(split.joined(separator: ", ")))")
                }
                good.append(s)
                byIndex[h.shard.index] = s
            } catch let e as SMoEError {
                problems.append(e)
            } catch {
                problems.append(SMoEError.file(path, "\(error)"))
            }
        }
        guard let first = good.first else { return (nil, problems) }
        let count = first.header.shard.count
        let absent = (0..<count).filter { byIndex[$0] == nil }
        let held = Set(good.flatMap(\.header.layers))
        let missing = first.header.selection.filter { !held.contains($0) }
        if !absent.isEmpty && !allowPartial {
            let which = absent.map { "\($0)/\(count)" }.joined(separator: ", ")
            problems.append(SMoEError("missing shard\(absent.count == 1 ? "" : "s") \(which) of \(model.path)"
                + (missing.isEmpty ? "" : " (layers \(missing.joined(separator: ", ")))")
                + ": give \(absent.count == 1 ? "it" : "them"), or {allow-partial} to \(first.header.kind == "smoe-stats" ? "leave those layers out" : "copy those layers unchanged")"))
        }
        guard problems.isEmpty else { return (nil, problems) }
        let ordered = good.sorted { $0.header.shard.index < $1.header.shard.index }
        return (ShardAssembly(model: model, shards: ordered, missing: missing), [])
    }

    /// Where two settings records first differ, as `key: a vs b`.
    static func settingsDifference(_ a: String, _ b: String) -> String {
        func diff(_ x: JSONValue, _ y: JSONValue, _ path: String) -> String? {
            if case .object(let kx) = x, case .object(let ky) = y {
                for key in (kx.map(\.0) + ky.map(\.0).filter { k in !kx.contains { $0.0 == k } }) {
                    if let d = diff(x[key] ?? .null, y[key] ?? .null, path.isEmpty ? key : path + "." + key) { return d }
                }
                return nil
            }
            return x == y ? nil : "\(path.isEmpty ? "settings" : path) \(x.serialized()) vs \(y.serialized())"
        }
        guard let x = try? JSONValue.parse(a), let y = try? JSONValue.parse(b) else { return "settings differ" }
        return diff(x, y, "") ?? "settings differ"
    }

    public var kind: String { shards[0].header.kind }
    public var stage: String { shards[0].header.stage }

    /// The one history entry of the assembled checkpoint: the shards, their entries and the
    /// settings they share.
    public var historyEntry: JSONValue {
        let h = shards[0].header
        var kv: [(String, JSONValue)] = [
            ("stage", "assemble"), ("tool", .string("smoe-compress \(smoeCompressVersion)")), ("of", .string(h.stage)),
            ("model_fingerprint", .string(h.modelFingerprint)),
            ("settings", (try? JSONValue.parse(h.settings)) ?? .string(h.settings)),
            ("shards", .array(shards.map { s in
                .object([("file", .string(s.path)), ("shard", .string(s.header.shard.description)),
                         ("layers", JSONValue(s.header.layers)), ("entry", s.entry)])
            })),
        ]
        if !missing.isEmpty { kv.append(("copied_unchanged", JSONValue(missing))) }
        return .object(kv)
    }

    /// Writes the assembled file: a checkpoint gets the model's `/dense`, history and every
    /// layer (a shard's copied verbatim, any other rewritten from the model with the shards'
    /// output options, as a single run writes it); statistics get every shard's layers.
    public func write(to destination: String) throws {
        var owner: [String: ShardFile] = [:]
        for s in shards { for n in s.header.layers { owner[n] = s } }
        if kind == "smoe-stats" {
            let w = try StatsWriter(destination: destination, source: shards[0].source ?? "")
            for c in model.layers { if let s = owner[c.name] { try copyLayer(c.name, from: s, into: w.file) } }
            return try w.commit()
        }
        let w = try CheckpointWriter(destination: destination, derivedFrom: model, entry: historyEntry,
                                     options: try writeOptions())
        for c in model.layers {
            if let s = owner[c.name] { try copyLayer(c.name, from: s, into: w.file) } else { try w.write(try model.readLayer(c.name)) }
        }
        try w.commit()
    }

    private func copyLayer(_ name: String, from s: ShardFile, into file: H5File) throws {
        try file.copyObject(from: s.file, "/moe_layers/\(name)", to: "/moe_layers/\(name)")
    }

    /// The output options the shards were written with.
    func writeOptions() throws -> WriteOptions {
        let s = shards[0]
        guard let out = (try? JSONValue.parse(s.header.settings))?["output"],
              let dtype = out["dtype"]?.stringValue.flatMap(StorageType.init(rawValue:)) else {
            throw SMoEError.dataset(s.path, "/@settings", "has no output options")
        }
        return WriteOptions(dtype: dtype, gzip: out["gzip"]?.intValue)
    }
}
