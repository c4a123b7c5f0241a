import Foundation

// Resume (docs/FORMAT.md §6, docs/ARCHITECTURE.md "Resume"): a checkpoint stage run keeps each
// layer it finishes in a work directory beside its output, `<output>.resume/`, one part file per
// layer written atomically; a run of the same command with `--resume` reuses them when the
// inputs, every setting and the tool version match. The per-layer loop (`LayerStage.run`) is the
// one place that skips, reuses and saves layers, through a `LayerResume`.

/// What the per-layer loop needs to resume a run: which layers are finished, how to hand one to
/// the output instead of computing it, and how to keep a layer it has just finished.
public struct LayerResume<Output> {
    /// Layers finished by an interrupted run of the same command and settings.
    public var finished: Set<String>
    /// Hands the finished layer to the output in the place of computing it; returns its one-layer
    /// history entry (`historyEntry([report])` of the run that computed it).
    public var reuse: (String) throws -> JSONValue
    /// Keeps a layer this run finished, with its one-layer history entry, durably.
    public var save: (String, Output, JSONValue) throws -> Void

    public init(finished: Set<String>, reuse: @escaping (String) throws -> JSONValue,
                save: @escaping (String, Output, JSONValue) throws -> Void) {
        self.finished = finished
        self.reuse = reuse
        self.save = save
    }
}

// MARK: history entries from one-layer entries

/// The history entry of a run from its layers' one-layer entries, following `empty` (the entry
/// of a run that computed no layer): where `empty` holds an empty array (the per-layer results,
/// e.g. `layers`), the entries' arrays are concatenated in order; objects are combined key by
/// key; every other value must be equal in all entries. Throws where they disagree: a stage whose
/// entry aggregates over layers (compress's `mean_relative_error`) combines that part itself.
func combineLayerEntries(_ entries: [JSONValue], empty: JSONValue) throws -> JSONValue {
    guard !entries.isEmpty else { return empty }
    func combine(_ values: [JSONValue], template: JSONValue?, path: String) throws -> JSONValue {
        func fail(_ why: String) -> SMoEError {
            SMoEError("cannot combine the layers' history entries at \(path.isEmpty ? "the top" : path): \(why)")
        }
        if case .array(let t)? = template, t.isEmpty {
            var all: [JSONValue] = []
            for v in values {
                guard let a = v.arrayValue else { throw fail("not all arrays") }
                all += a
            }
            return .array(all)
        }
        if case .object(let kv) = values[0] {
            let keys = kv.map(\.0)
            var out: [(String, JSONValue)] = []
            for k in keys {
                let vs = try values.map { v -> JSONValue in
                    guard case .object(let o) = v, o.map(\.0) == keys, let x = v[k] else { throw fail("their keys differ") }
                    return x
                }
                out.append((k, try combine(vs, template: template?[k], path: path.isEmpty ? k : path + "." + k)))
            }
            return .object(out)
        }
        let text = values[0].serializedExactly()
        guard values.allSatisfy({ $0.serializedExactly() == text }) else { throw fail("the layers' values differ") }
        return values[0]
    }
    return try combine(entries, template: empty, path: "")
}

extension JSONValue {
    /// The object with the value of `key` replaced (other keys and their order unchanged).
    func replacing(_ key: String, with value: JSONValue) -> JSONValue {
        guard case .object(let kv) = self else { return self }
        return .object(kv.map { $0.0 == key ? ($0.0, value) : $0 })
    }
}

// MARK: the work directory

/// An input file as a resumable run records it: which option gave it, its path, size,
/// modification time and a hash of its first and last 64 KiB.
public struct ResumeInput: Sendable {
    /// How the command names it: `model`, `--calib`, …
    public var role: String
    public var path: String

    public init(role: String, path: String) {
        self.role = role
        self.path = path
    }

    /// The identity recorded in the manifest.
    func identity() throws -> JSONValue {
        var st = stat()
        guard stat(path, &st) == 0 else { throw SMoEError.file(path, "no such file") }
        let size = Int(st.st_size)
        var h = FNV1a()
        if let f = FileHandle(forReadingAtPath: path) {
            defer { try? f.close() }
            let chunk = 64 << 10
            h.add(bytes: (try? f.read(upToCount: chunk)) ?? Data())
            if size > chunk {
                try? f.seek(toOffset: UInt64(max(chunk, size - chunk)))
                h.add(bytes: (try? f.read(upToCount: chunk)) ?? Data())
            }
        }
        return .object([("role", .string(role)), ("path", .string(path)), ("size", .int(size)),
                         ("mtime", .string("\(st.st_mtim.tv_sec).\(String(format: "%09ld", st.st_mtim.tv_nsec))")),
                         ("sample", .string(h.hex))])
    }
}

/// The work directory of a resumable checkpoint stage run (`<output>.resume/`, docs/FORMAT.md §6):
/// `run.json` (what the run is: tool, stage, settings, inputs), `lock` (held while a process
/// uses the directory) and one part file `layer-NNNN.h5` per finished layer. Opened by a run
/// after its stage is made (settings validated); removed by `finish()` once the output is
/// committed, or by `close()` when the run failed before finishing any layer.
public final class ResumeWork: @unchecked Sendable {
    public static let manifestName = "run.json"
    public static let lockName = "lock"
    static let partFormat = "smoe-resume-part"

    /// How opening went.
    public enum Start: Sendable, Equatable {
        /// No work directory was there.
        case fresh
        /// No `--resume`: the work directory of an interrupted run (no process holds it) was
        /// there, with this many finished layers; it was emptied and the run starts afresh.
        case replacedLeftover(layers: Int)
        /// `--resume`, but no interrupted run of this output (or one that finished no layer).
        case nothingToResume
        /// `--resume`, but the interrupted run differs: what differs. Its layers were removed.
        case startedOver(reason: String)
        /// `--resume`: these finished layers (in index order) are reused.
        case resuming(layers: [String])
    }

    public let directory: String
    public let start: Start
    let manifest: JSONValue
    /// FNV-1a of the manifest text, recorded in every part file.
    let runID: String
    let options: WriteOptions
    let architecture: String
    let layerIndex: [String: Int]
    private var lockFD: Int32
    /// Finished layers' part files (reused and saved by this run), by layer name.
    private var parts: [String: String] = [:]
    /// Opened part files of reusable layers (until copied), by layer name.
    private var reusable: [String: H5File] = [:]

    /// The work directory of `output`: `<output>.resume` beside it (a long name: `.smoe-<hash>.resume`).
    /// The path keeps the output's form (relative or absolute), for messages.
    public static func directory(for output: String) -> String {
        let (folder, base) = splitOutputPath(output)
        var name = base + ".resume"
        if name.utf8.count > 255 { name = ".smoe-" + stableHash(base) + ".resume" }
        return folder + name
    }

    /// Opens (or makes) the work directory of a run of `stage` on `model` writing `output` with
    /// `options` (and `shard`); `inputs` are every input file, the model first. With `resume`,
    /// the finished layers of an interrupted run are kept for reuse when its manifest is this
    /// run's; otherwise (or without `resume`) any such layers are removed. Throws when another
    /// process holds the directory, or the path is taken by something that is not one.
    public init<S: LayerStage>(output: String, stage: S, model: CheckpointReader, inputs: [ResumeInput],
                               options: WriteOptions, shard: Shard?, resume: Bool) throws {
        directory = ResumeWork.directory(for: output)
        self.options = options
        architecture = model.architecture
        let layerIndex = Dictionary(uniqueKeysWithValues: model.layers.enumerated().map { ($1.name, $0) })
        self.layerIndex = layerIndex
        let settings = JSONValue.object([
            ("stage", .string(stage.name)), ("settings", stage.settingsRecord), ("entry", stage.historyEntry([])),
            ("layers", JSONValue(stage.layers)), ("shard", shard.map { .string($0.description) } ?? .null),
            ("output", .object([("dtype", .string(options.dtype.rawValue)), ("gzip", options.gzip.map(JSONValue.int) ?? .null)])),
        ])
        manifest = .object([
            ("format", "smoe-resume"), ("format_version", .int(1)), ("tool", .string("smoe-compress \(smoeCompressVersion)")),
            ("stage", .string(stage.name)), ("output", .string(output)),
            // LAPACK/BLAS results can depend on the kernels and the thread count.
            ("blas", .object([("core", .string(BLAS.coreName)), ("threads", .int(BLAS.threads))])),
            ("inputs", .array(try inputs.map { try $0.identity() })), ("model_fingerprint", .string(try model.fingerprint())),
            ("settings", settings),
        ])
        let manifestText = manifest.serializedExactly(pretty: true) + "\n"

        let fm = FileManager.default
        var isDir: ObjCBool = false
        let existed = fm.fileExists(atPath: directory, isDirectory: &isDir)
        if existed && !isDir.boolValue {
            throw SMoEError.file(directory, "exists and is not a work directory of smoe-compress (it would hold the finished layers of \(output)): move it away", kind: .output)
        }
        if !existed {
            guard mkdir(directory, 0o755) == 0 else {
                throw SMoEError.file(directory, "cannot make the work directory: \(String(cString: strerror(errno)))", kind: .output)
            }
        }
        // Only a directory this tool made is ever emptied.
        let names = (try? fm.contentsOfDirectory(atPath: directory)) ?? []
        if let foreign = names.first(where: { !ResumeWork.isOurs($0) }) {
            throw SMoEError.file(directory, "holds \(foreign), which smoe-compress did not write: move it away (the directory keeps the finished layers of \(output))", kind: .output)
        }
        do { lockFD = try ResumeWork.lock(directory) } catch {
            if !existed { rmdir(directory) }
            throw error
        }
        // Temporary files here belong to a dead process: the lock is ours.
        for n in names where n.hasPrefix(".") && n.contains(".tmp-") { unlink(directory + "/" + n) }
        let (old, oldText) = ResumeWork.readManifest(directory)
        var runID = FNV1a.hex(manifestText)
        let oldParts = names.filter { ResumeWork.partLayerIndex($0) != nil }.sorted()
        var start: Start = existed && old != nil && !oldParts.isEmpty ? .replacedLeftover(layers: oldParts.count) : .fresh
        if resume {
            if let old, !oldParts.isEmpty {
                if let why = ResumeWork.difference(old: old, new: manifest) {
                    start = .startedOver(reason: why)
                } else {
                    // The same run: its parts carry the fingerprint of the manifest on disk.
                    runID = FNV1a.hex(oldText)
                    start = .nothingToResume
                    var kept: [String] = []
                    for n in oldParts {
                        let path = directory + "/" + n
                        if let (layer, file) = try? ResumeWork.openPart(path, runID: runID),
                           layerIndex[layer].map({ ResumeWork.partName($0) }) == n, stage.layers.contains(layer) {
                            reusable[layer] = file
                            parts[layer] = path
                            kept.append(layer)
                        } else {
                            unlink(path)  // not of this run, or unreadable: computed again
                        }
                    }
                    if !kept.isEmpty { start = .resuming(layers: kept.sorted { layerIndex[$0]! < layerIndex[$1]! }) }
                }
            } else {
                start = .nothingToResume
            }
        }
        self.start = start
        if case .resuming = start {} else {
            for n in oldParts { unlink(directory + "/" + n) }
            runID = FNV1a.hex(manifestText)
        }
        self.runID = runID
        if case .resuming = start {} else {
            do { try ResumeWork.writeAtomically(directory + "/" + ResumeWork.manifestName, manifestText) } catch {
                finish()
                throw error
            }
        }
    }

    deinit { if lockFD >= 0 { Foundation.close(lockFD) } }

    /// The loop's hook for a run writing into `writer`: reused layers are copied verbatim from
    /// their part files (HDF5 object copy), finished layers saved as part files.
    public func hook(into writer: CheckpointWriter) -> LayerResume<MoELayer> {
        LayerResume(finished: Set(reusable.keys), reuse: { [self] name in
            // Every failure here is about the work directory (its part files) or the output.
            do {
                guard let file = reusable.removeValue(forKey: name) else { throw SMoEError.file(directory, "holds no finished layer \(name)", kind: .output) }
                try writer.file.copyObject(from: file, "/moe_layers/\(name)", to: "/moe_layers/\(name)")
                let text = try file.root.stringAttribute("entry")
                do { return try JSONValue.parse(text) } catch { throw SMoEError.dataset(parts[name] ?? directory, "/@entry", "is not JSON") }
            } catch let e as SMoEError {
                throw e.of(kind: .output)
            }
        }, save: { [self] name, layer, entry in
            try save(name, layer: layer, entry: entry)
        })
    }

    /// Finished layers the directory holds (reused and saved by this run).
    public var finishedLayers: Int { parts.count }

    /// Writes a finished layer's part file: temporary file, fsync, rename, fsync of the directory.
    func save(_ name: String, layer: MoELayer, entry: JSONValue) throws {
        guard let i = layerIndex[name] else { throw SMoEError.layer(name, "not a layer of the model") }
        let path = directory + "/" + ResumeWork.partName(i)
        let w = try CheckpointWriter(destination: path, architecture: architecture, history: [], entry: entry, options: options)
        try w.root.setAttribute("format", ResumeWork.partFormat)
        try w.root.setAttribute("run", runID)
        try w.root.setAttribute("layer", name)
        try w.root.setAttribute("entry", entry.serializedExactly())
        try w.write(layer)
        try w.commit()
        parts[name] = path
    }

    /// Removes the work directory (after the output was committed).
    public func finish() {
        reusable.removeAll()
        for n in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] where ResumeWork.isOurs(n) {
            unlink(directory + "/" + n)
        }
        rmdir(directory)
        if lockFD >= 0 { Foundation.close(lockFD); lockFD = -1 }
        ResumeWork.syncDirectory(URL(fileURLWithPath: directory).deletingLastPathComponent().path)
    }

    /// After a failed run: with `keeping`, keeps the directory when it holds finished layers (a
    /// later `--resume` reuses them) and returns their number; otherwise removes it and returns 0.
    @discardableResult
    public func close(keeping: Bool = true) -> Int {
        let n = keeping ? parts.count : 0
        reusable.removeAll()
        if n == 0 { finish() } else if lockFD >= 0 { Foundation.close(lockFD); lockFD = -1 }
        return n
    }

    // MARK: helpers

    static func partName(_ index: Int) -> String { "layer-" + String(format: "%04d", index) + ".h5" }

    static func partLayerIndex(_ name: String) -> Int? {
        guard name.hasPrefix("layer-"), name.hasSuffix(".h5") else { return nil }
        return Int(name.dropFirst(6).dropLast(3))
    }

    /// The names this tool writes in a work directory (and their temporary files).
    static func isOurs(_ name: String) -> Bool {
        if name == manifestName || name == lockName || partLayerIndex(name) != nil { return true }
        guard name.hasPrefix("."), let r = name.range(of: ".tmp-") else { return false }
        let base = String(name[name.index(after: name.startIndex)..<r.lowerBound])
        return base == manifestName || partLayerIndex(base) != nil
    }

    static func lock(_ directory: String) throws -> Int32 {
        let path = directory + "/" + lockName
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SMoEError.file(directory, "cannot lock the work directory: \(String(cString: strerror(errno)))", kind: .output) }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            var buf = [UInt8](repeating: 0, count: 32)
            let n = pread(fd, &buf, 32, 0)
            Foundation.close(fd)
            let pid = n > 0 ? String(decoding: buf.prefix(n), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) : "?"
            throw SMoEError.file(directory, "is in use by another smoe-compress run (pid \(pid)) writing the same output: wait for it or stop it", kind: .output)
        }
        let text = Array("\(getpid())\n".utf8)
        _ = ftruncate(fd, 0)
        _ = pwrite(fd, text, text.count, 0)
        return fd
    }

    /// The manifest on disk and its text (nil, "" when there is none or it is not one).
    static func readManifest(_ directory: String) -> (JSONValue?, String) {
        guard let data = FileManager.default.contents(atPath: directory + "/" + manifestName) else { return (nil, "") }
        let text = String(decoding: data, as: UTF8.self)
        guard let v = try? JSONValue.parse(text), v["format"]?.stringValue == "smoe-resume" else { return (nil, "") }
        return (v, text)
    }

    /// Opens a part file of run `runID`; returns its layer name.
    static func openPart(_ path: String, runID: String) throws -> (String, H5File) {
        let f = try openSMoEFile(path, expecting: partFormat)
        guard try f.root.stringAttribute("run") == runID else { throw SMoEError.file(path, "is a part of another run") }
        let layer = try f.root.stringAttribute("layer")
        guard f.root.isGroup("moe_layers"), try f.root.openGroup("moe_layers").childNames() == [layer] else {
            throw SMoEError.file(path, "does not hold its layer")
        }
        _ = try JSONValue.parse(try f.root.stringAttribute("entry"))
        return (layer, f)
    }

    /// What differs between the interrupted run's manifest and this run's, in one phrase (nil: the same run).
    static func difference(old: JSONValue, new: JSONValue) -> String? {
        if old["format_version"] != new["format_version"] { return "its work directory has another format version" }
        if old["tool"] != new["tool"] {
            return "it was made by \(old["tool"]?.stringValue ?? "another tool"), this is \(new["tool"]?.stringValue ?? "?")"
        }
        if old["stage"] != new["stage"] {
            return "it was a \(old["stage"]?.stringValue ?? "?") run, this is \(new["stage"]?.stringValue ?? "?")"
        }
        let a = old["inputs"]?.arrayValue ?? [], b = new["inputs"]?.arrayValue ?? []
        for x in b {
            let role = x["role"]?.stringValue ?? "?"
            guard let y = a.first(where: { $0["role"] == x["role"] }) else { return "it had no \(role) input" }
            let path = x["path"]?.stringValue ?? "?"
            if y["path"] != x["path"] { return "\(role) was \(y["path"]?.stringValue ?? "?"), now \(path)" }
            if y["size"] != x["size"] {
                return "\(role) \(path) changed since (\(y["size"]?.intValue ?? 0) bytes then, \(x["size"]?.intValue ?? 0) now)"
            }
            if y["mtime"] != x["mtime"] || y["sample"] != x["sample"] { return "\(role) \(path) was modified since" }
        }
        for y in a where !b.contains(where: { $0["role"] == y["role"] }) {
            return "it had \(y["role"]?.stringValue ?? "?") \(y["path"]?.stringValue ?? "")"
        }
        if old["model_fingerprint"] != new["model_fingerprint"] { return "the model's fingerprint differs" }
        if let d = firstDifference(old["settings"] ?? .null, new["settings"] ?? .null, path: "") {
            return "the settings differ: \(d.path.isEmpty ? "settings" : d.path) was \(d.then), now \(d.now)"
        }
        if old["blas"]?.serializedExactly() != new["blas"]?.serializedExactly() {
            func text(_ v: JSONValue?) -> String { "\(v?["core"]?.stringValue ?? "?") kernels, \(v?["threads"]?.intValue ?? 0) threads" }
            return "OpenBLAS ran \(text(old["blas"])) then, \(text(new["blas"])) now (results could differ in the last bits)"
        }
        return nil
    }

    /// The first place two settings records differ (dotted path, the record's `settings.` level
    /// left out), with both values as JSON text.
    static func firstDifference(_ x: JSONValue, _ y: JSONValue, path: String) -> (path: String, then: String, now: String)? {
        if case .object(let kx) = x, case .object(let ky) = y {
            for key in kx.map(\.0) + ky.map(\.0).filter({ k in !kx.contains { $0.0 == k } }) {
                let sub = path.isEmpty && key == "settings" ? "" : (path.isEmpty ? key : path + "." + key)
                if let d = firstDifference(x[key] ?? .null, y[key] ?? .null, path: sub) { return d }
            }
            return nil
        }
        let a = x.serializedExactly(), b = y.serializedExactly()
        return a == b ? nil : (path, a, b)
    }

    static func writeAtomically(_ path: String, _ text: String) throws {
        let tmp = URL(fileURLWithPath: path).deletingLastPathComponent().path + "/."
            + URL(fileURLWithPath: path).lastPathComponent + ".tmp-\(getpid())"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SMoEError.file(path, "cannot write: \(String(cString: strerror(errno)))", kind: .output) }
        let bytes = Array(text.utf8)
        let ok = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } == bytes.count && fsync(fd) == 0
        let err = String(cString: strerror(errno))
        Foundation.close(fd)
        guard ok, rename(tmp, path) == 0 else {
            unlink(tmp)
            throw SMoEError.file(path, "cannot write: \(err)", kind: .output)
        }
        syncDirectory(URL(fileURLWithPath: path).deletingLastPathComponent().path)
    }

    static func syncDirectory(_ path: String) {
        let fd = open(path, O_RDONLY | O_DIRECTORY)
        if fd >= 0 { _ = fsync(fd); Foundation.close(fd) }
    }
}
