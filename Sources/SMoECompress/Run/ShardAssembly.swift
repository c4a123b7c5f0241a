import Foundation

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
                do { s = try ShardFile(path) } catch let e as SMoEError { throw e.naming(file: path) }
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
                + ": give \(absent.count == 1 ? "it" : "them"), or {allow-partial} to \(first.header.kind == "smoe-stats" ? "leave those layers out" : "copy those layers unchanged")",
                file: model.path))
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
