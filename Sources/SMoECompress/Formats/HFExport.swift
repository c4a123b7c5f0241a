import Foundation

/// What `export` wrote.
public struct ExportReport: Sendable {
    public var output: String
    public var family: ModelFamily
    public var layout: ExpertLayout
    /// Files written (shards, index, config.json).
    public var files: [String]
    public var tensorCount: Int
    public var tensorBytes: Int
    /// Layers whose G < E stored experts were written one expert per router slot.
    public var mergedLayers: [String]
    /// Layers whose factored matrices were materialised to dense.
    public var factoredLayers: [String]

    public var json: JSONValue {
        .object([
            ("output", .string(output)), ("family", .string(family.rawValue)), ("layout", .string(layout.rawValue)),
            ("files", .array(files.map { .string($0) })), ("tensors", .int(tensorCount)), ("bytes", .int(tensorBytes)),
            ("merged_layers", .array(mergedLayers.map { .string($0) })),
            ("factored_layers", .array(factoredLayers.map { .string($0) })),
        ])
    }
}

/// `smoe-compress export`: an smoe-checkpoint made by `import` (and any later stages) → a
/// Hugging Face safetensors folder under the source family's tensor names.
public enum HFExport {
    /// The `import` entry of a checkpoint's history.
    public static func importEntry(_ reader: CheckpointReader) throws -> JSONValue {
        guard let e = reader.history.last(where: { $0["stage"]?.stringValue == "import" }) else {
            throw SMoEError.dataset(reader.path, "/@history", "has no import entry: export needs a checkpoint made by `smoe-compress import` (it names the source family and dtypes)")
        }
        return e
    }

    private enum Source {
        case dense(String)  // path below /dense
        case router(String)
        case expert(layer: String, slot: Int, role: String)
        case fused(layer: String, part: String)
    }

    /// Writes `checkpoint` as safetensors shards of at most `maxShardBytes` (plus the index and
    /// config.json) into the new folder `outputDirectory`, built under a temporary name and
    /// renamed into place. Refuses an existing non-empty folder.
    @discardableResult
    public static func run(checkpoint: String, outputDirectory: String, maxShardBytes: Int = 5_000_000_000,
                           progress: ProgressCallback? = nil) throws -> ExportReport {
        let out = URL(fileURLWithPath: outputDirectory).standardizedFileURL
        try ensureOutputDiffers(out.path, from: [checkpoint])
        let fm = FileManager.default
        var isDir: ObjCBool = false
        if fm.fileExists(atPath: out.path, isDirectory: &isDir) {
            guard isDir.boolValue, (try? fm.contentsOfDirectory(atPath: out.path))?.isEmpty == true else {
                throw SMoEError.file(outputDirectory, "already exists and is not an empty folder (export never overwrites)")
            }
        }
        let parent = out.deletingLastPathComponent().path
        guard fm.fileExists(atPath: parent, isDirectory: &isDir), isDir.boolValue else {
            throw SMoEError.file(outputDirectory, "output's parent folder \(parent) does not exist")
        }
        let reader = try CheckpointReader(checkpoint)
        let entry = try importEntry(reader)
        guard let fam = entry["family"]?.stringValue.flatMap(ModelFamily.init(rawValue:)) else {
            throw SMoEError.dataset(checkpoint, "/@history", "import entry names no known family")
        }
        guard let layout = entry["layout"]?.stringValue.flatMap(ExpertLayout.init(rawValue:)),
              let expertDT = entry["expert_dtype"]?.stringValue.flatMap(SafetensorsDType.init(rawValue:)),
              let routerDT = entry["router_dtype"]?.stringValue.flatMap(SafetensorsDType.init(rawValue:)) else {
            throw SMoEError.dataset(checkpoint, "/@history", "import entry lacks layout or dtypes")
        }
        guard let config = reader.sourceConfig else {
            throw SMoEError.dataset(checkpoint, "/@source_config", "missing: export needs the source config.json")
        }
        let suffix = entry["fused_suffix"]?.stringValue ?? ".weight"
        var metadata: [(String, String)] = []
        if case .object(let kv)? = entry["metadata"] { metadata = kv.compactMap { k, v in v.stringValue.map { (k, $0) } } }
        if metadata.isEmpty { metadata = [("format", "pt")] }

        // Every output tensor, in natural name order, with where it comes from.
        var items: [(String, Source)] = []
        var merged: [String] = [], factored: [String] = []
        for c in reader.layers {
            guard c.expertType == fam.expertType else {
                throw SMoEError.dataset(checkpoint, "/moe_layers/\(c.name)", "expert_type \(c.expertType.rawValue) does not fit family \(fam.rawValue)")
            }
            let s = try reader.summary(c.name)
            if s.hasRouterBias || s.hasUpBias || s.hasDownBias {
                throw SMoEError.dataset(checkpoint, "/moe_layers/\(c.name)", "has biases, which \(fam.rawValue) checkpoints have no place for")
            }
            if s.hasExpertMap || s.numStored != c.numExperts { merged.append(c.name) }
            if s.isCompressed { factored.append(c.name) }
            items.append(("\(c.name).\(fam.routerSuffix)", .router(c.name)))
            switch layout {
            case .perExpert:
                for e in 0..<c.numExperts {
                    for role in fam.matrixNames.keys {
                        items.append((fam.expertTensorName(layer: c.name, expert: e, matrix: role), .expert(layer: c.name, slot: e, role: role)))
                    }
                }
            case .fused:
                for part in ["gate_up", "down"] {
                    items.append((fam.fusedTensorName(layer: c.name, part: part, suffix: suffix), .fused(layer: c.name, part: part)))
                }
            }
        }
        if reader.hasDense {
            for p in try reader.file.root.openGroup("dense").datasetPaths() { items.append((p, .dense(p))) }
        }
        var seen = Set<String>()
        for (n, _) in items where !seen.insert(n).inserted {
            throw SMoEError.dataset(checkpoint, "/dense/\(n)", "has the name of an MoE tensor")
        }
        items.sort { naturalLess($0.0, $1.0) }

        let temp = parent + "/." + out.lastPathComponent + ".tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        do { try fm.createDirectory(atPath: temp, withIntermediateDirectories: false) } catch {
            throw SMoEError.file(outputDirectory, "cannot create a temporary folder next to it: \(error.localizedDescription)")
        }
        var committed = false
        defer { if !committed { try? fm.removeItem(atPath: temp) } }
        let writer = try ShardedSafetensorsWriter(directory: temp, maxShardBytes: maxShardBytes, metadata: metadata)
        var cached: MoELayer? = nil
        func layer(_ name: String) throws -> MoELayer {
            if let l = cached, l.name == name { return l }
            cached = nil
            let l = try reader.readLayer(name)
            cached = l
            return l
        }
        let dense = reader.hasDense ? try reader.file.root.openGroup("dense") : nil
        for (i, (name, src)) in items.enumerated() {
            if i % 16 == 0 { progress?("export", i, items.count) }
            switch src {
            case .dense(let p):
                let d = try dense!.openDataset(p)
                guard let t = d.rawElementType else { throw SMoEError.dataset(checkpoint, d.path, "element type cannot be written to safetensors") }
                try writer.add(name, dtype: SafetensorsDType(t), shape: d.shape, bytes: try d.readRaw())
            case .router(let l):
                let m = try layer(l)
                try writer.add(name, dtype: routerDT, shape: [m.config.numExperts, m.config.dModel], bytes: routerDT.encode(m.router.data))
            case .expert(let l, let slot, let role):
                let m = try layer(l)
                let w = m.experts[m.storedIndex(slot: slot)][matrix: role]!.dense()
                try writer.add(name, dtype: expertDT, shape: [w.rows, w.cols], bytes: expertDT.encode(w.data))
            case .fused(let l, let part):
                let m = try layer(l)
                let c = m.config
                var values: [Float] = []
                values.reserveCapacity(c.numExperts * c.dFF * c.dModel * (part == "gate_up" ? 2 : 1))
                for slot in 0..<c.numExperts {
                    let x = m.experts[m.storedIndex(slot: slot)]
                    if part == "gate_up" {
                        values += x.gate!.dense().data
                        values += x.up.dense().data
                    } else {
                        values += x.down.dense().data
                    }
                }
                let shape = part == "gate_up" ? [c.numExperts, 2 * c.dFF, c.dModel] : [c.numExperts, c.dModel, c.dFF]
                try writer.add(name, dtype: expertDT, shape: shape, bytes: expertDT.encode(values))
            }
        }
        progress?("export", items.count, items.count)
        var files = try writer.finish()
        guard fm.createFile(atPath: temp + "/config.json", contents: Data(config.utf8)) else {
            throw SMoEError.file(outputDirectory + "/config.json", "cannot be written")
        }
        files.append("config.json")
        if fm.fileExists(atPath: out.path) { rmdir(out.path) }  // an empty folder (rmdir never removes contents)
        if rename(temp, out.path) != 0 {
            throw SMoEError.file(outputDirectory, "cannot be written: \(String(cString: strerror(errno)))")
        }
        committed = true
        return ExportReport(output: outputDirectory, family: fam, layout: layout, files: files.sorted(),
                            tensorCount: writer.tensorCount, tensorBytes: writer.totalBytes,
                            mergedLayers: merged, factoredLayers: factored)
    }
}
