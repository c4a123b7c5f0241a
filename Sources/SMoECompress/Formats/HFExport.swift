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
    /// The expert count written to config.json when it differs from the source config's (a
    /// compact checkpoint: G router rows and G experts per layer), with the key.
    public var expertCount: (key: String, from: Int?, to: Int)? = nil
    /// Set when config.json was built from the layers and `/dense` (no source config): the keys
    /// whose values were guessed rather than read from the weights.
    public var synthesisedConfigGuesses: [String]? = nil
    /// How the routed experts were written: a float type, `fp8_e4m3_block RxC (T scales)` or `mxfp4`.
    public var expertEncoding: String = ""

    public var json: JSONValue {
        .object([
            ("output", .string(output)), ("family", .string(family.rawValue)), ("layout", .string(layout.rawValue)),
            ("files", .array(files.map { .string($0) })), ("tensors", .int(tensorCount)), ("bytes", .int(tensorBytes)),
            ("merged_layers", .array(mergedLayers.map { .string($0) })),
            ("factored_layers", .array(factoredLayers.map { .string($0) })),
            ("expert_encoding", .string(expertEncoding)),
        ] + (expertCount.map { [("expert_count", .object([("key", .string($0.key)), ("from", $0.from.map { .int($0) } ?? .null),
                                                          ("to", .int($0.to))]))] } ?? [])
          + (synthesisedConfigGuesses.map { [("config_synthesised_guesses", JSONValue($0))] } ?? []))
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
        case routerBias(String)
        case selectionBias(String)
        case expert(layer: String, slot: Int, role: String)
        case fused(layer: String, part: String)
        /// The scale tensor of the quantized expert tensor named (written just before it).
        case scale(String)
    }

    /// Writes `checkpoint` as safetensors shards of at most `maxShardBytes` (plus the index and
    /// config.json) into the new folder `outputDirectory`, built under a temporary name and
    /// renamed into place. Refuses an existing non-empty folder. Steps: the output folder
    /// (`checkOutputFolder`), the family and encodings, config.json (`patchedSourceConfig` or
    /// `synthesiseConfig`, then `quantizationConfig`), the tensor list (`tensorList`), the tensors
    /// (`writeTensors`) and the commit (the temporary folder renamed).
    @discardableResult
    public static func run(checkpoint: String, outputDirectory: String, maxShardBytes: Int = 5_000_000_000,
                           family: ModelFamily? = nil, dtype: ExportEncoding = .auto,
                           progress: ProgressCallback? = nil) throws -> ExportReport {
        let out = URL(fileURLWithPath: outputDirectory).standardizedFileURL
        try ensureOutputDiffers(out.path, from: [checkpoint])
        let fm = FileManager.default
        let parent = try checkOutputFolder(out, named: outputDirectory)
        let reader = try CheckpointReader(checkpoint)
        let (fam, entry) = try exportFamily(reader, given: family)
        let layout = entry?["layout"]?.stringValue.flatMap(ExpertLayout.init(rawValue:)) ?? .perExpert
        let stored: SafetensorsDType = try { switch try reader.expertStorage() { case .f16: .F16; case .bf16: .BF16; default: .F32 } }()
        let expertDT = entry?["expert_dtype"]?.stringValue.flatMap(SafetensorsDType.init(rawValue:)) ?? stored
        let routerDT = entry?["router_dtype"]?.stringValue.flatMap(SafetensorsDType.init(rawValue:)) ?? stored
        if entry != nil && (entry?["layout"]?.stringValue.flatMap(ExpertLayout.init(rawValue:)) == nil
                            || entry?["expert_dtype"]?.stringValue == nil || entry?["router_dtype"]?.stringValue == nil) {
            throw SMoEError.dataset(checkpoint, "/@history", "import entry lacks layout or dtypes")
        }
        var sourceEncoding = try SourceEncoding(json: entry?["source_encoding"], path: checkpoint)
        // A checkpoint whose every layer stores its experts in FP8 (`compress --target-size F
        // --fp8`) is served in FP8 under `auto`: its codes and scales are written as they are.
        if sourceEncoding == nil, dtype == .auto, case .fp8Block(let r, let c)? = try storedFP8(reader),
           !(fam.fusedInputMajorInterleaved && layout == .fused) {
            sourceEncoding = .fp8Block(rows: r, cols: c, scaleType: .F32)
        }
        let encoding = try ExpertWriteEncoding.resolve(dtype, source: sourceEncoding, expertType: expertDT, family: fam, layout: layout)
        let plainDT: SafetensorsDType
        switch encoding {
        case .plain(let t): plainDT = t
        case .mxfp4(let b): plainDT = b
        case .fp8: plainDT = expertDT.isFloat ? expertDT : .BF16
        }
        // config.json: the source's, with the expert count set to the layers' (G after a compact
        // merge); without one, built from the layers and /dense.
        let counts = Set(reader.layers.map(\.numExperts))
        guard counts.count == 1, let count = counts.first else {
            throw SMoEError.file(checkpoint, "has MoE layers with different router slot counts (\(reader.layers.map { "\($0.name): \($0.numExperts)" }.joined(separator: ", "))), but \(fam.displayName) config.json holds one expert count")
        }
        var guesses: [String]? = nil
        var expertCount: (key: String, from: Int?, to: Int)? = nil
        var config: String
        if let source = reader.sourceConfig {
            (config, expertCount) = try patchedSourceConfig(source, reader: reader, family: fam, expertCount: count)
        } else {
            let (text, guessed) = try synthesiseConfig(reader, family: fam, dtype: plainDT)
            config = text
            guesses = guessed
        }
        config = try quantizationConfig(config, reader: reader, family: fam, encoding: encoding)
        let biasDT = entry?["selection_bias_dtype"]?.stringValue.flatMap(SafetensorsDType.init(rawValue:)) ?? .F32
        let suffix = entry?["fused_suffix"]?.stringValue ?? ".weight"
        var metadata: [(String, String)] = []
        if case .object(let kv)? = entry?["metadata"] { metadata = kv.compactMap { k, v in v.stringValue.map { (k, $0) } } }
        if metadata.isEmpty { metadata = [("format", "pt")] }

        // FP8 experts of a fused [E, 2I, H] checkpoint are written per expert (the hub layout):
        // transformers 5.23 dequantizes `X.weight` + `X.weight_scale_inv` pairs on load but not
        // a fused `experts.gate_up_proj` + `_scale_inv` (it reads the FP8 bytes as they are).
        var writeLayout = layout
        if case .fp8 = encoding, layout == .fused, !fam.matrixNames.isEmpty { writeLayout = .perExpert }
        let (items, merged, factored) = try tensorList(reader, family: fam, layout: layout, writeLayout: writeLayout,
                                                       encoding: encoding, fusedSuffix: suffix)

        let temp = parent + "/." + out.lastPathComponent + ".tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        do { try fm.createDirectory(atPath: temp, withIntermediateDirectories: false) } catch {
            throw SMoEError.file(outputDirectory, "cannot create a temporary folder next to it: \(error.localizedDescription)")
        }
        var committed = false
        defer { if !committed { try? fm.removeItem(atPath: temp) } }
        let writer = try ShardedSafetensorsWriter(directory: temp, maxShardBytes: maxShardBytes, metadata: metadata)
        try writeTensors(items, reader: reader, family: fam, encoding: encoding, plain: plainDT, router: routerDT, bias: biasDT,
                         into: writer, outputDirectory: outputDirectory, progress: progress)
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
        return ExportReport(output: outputDirectory, family: fam, layout: writeLayout, files: files.sorted(),
                            tensorCount: writer.tensorCount, tensorBytes: writer.totalBytes,
                            mergedLayers: merged, factoredLayers: factored, expertCount: expertCount,
                            synthesisedConfigGuesses: guesses, expertEncoding: encoding.description)
    }

    /// The experts' stored encoding when every MoE layer stores them in FP8 with the same blocks;
    /// nil when any layer stores floats.
    static func storedFP8(_ reader: CheckpointReader) throws -> ExpertEncoding? {
        let encodings = try reader.layers.map { try reader.summary($0.name).matrices.first?.encoding ?? .float }
        guard let e = encodings.first, e.isFP8, encodings.allSatisfy({ $0 == e }) else { return nil }
        return e
    }

    /// Step 1: the output folder `out` must not exist or be empty, and its parent must exist;
    /// returns the parent (where the temporary folder is built).
    static func checkOutputFolder(_ out: URL, named outputDirectory: String) throws -> String {
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
        return parent
    }

    /// Step 3: the source's config.json with every expert-count key set to `count` (G after a
    /// compact merge) and, for a compact layer that became ungrouped, its group counts; the keys
    /// changed, when any.
    static func patchedSourceConfig(_ source: String, reader: CheckpointReader, family fam: ModelFamily,
                                    expertCount count: Int) throws -> (String, (key: String, from: Int?, to: Int)?) {
        var config = source
        var expertCount: (key: String, from: Int?, to: Int)? = nil
        // Every expert-count key present is updated (transformers 4.x and 5.x names differ,
        // and 5.x refuses a folder whose names disagree); none present: transformers 5's name.
        let root = try? JSONValue.parse(source)
        // A multimodal wrapper's MoE keys are in its text config (the family's section).
        let section = fam.configSection.flatMap { k -> String? in
            if case .object? = root?[k] { return k }
            return nil
        }
        let parsed = section.map { root?[$0] } ?? root
        let present = fam.numExpertsKeys.filter { parsed?[$0] != nil }
        let key = present.first ?? fam.numExpertsKey
        let given = parsed?[key]?.intValue
        // A compact layer whose n_group = topk_group became ungrouped: its group counts too.
        let layer0 = reader.layers[0]
        let groupUpdate = fam.groupKeys.flatMap { k -> [(String, Int)]? in
            let now = [(k.groups, layer0.numGroups), (k.topKGroups, layer0.topKGroups)]
            let differ = now.contains { (parsed?[$0.0.key]?.intValue ?? Int($0.0.value)) != $0.1 }
            return differ ? now.map { ($0.0.key, $0.1) } : nil
        } ?? []
        if present.isEmpty || !groupUpdate.isEmpty || present.contains(where: { parsed?[$0]?.intValue != count }), case .object(var kv)? = parsed {
            if present.isEmpty { kv.append((fam.numExpertsKey, .int(count))) }
            for i in kv.indices where present.contains(kv[i].0) { kv[i].1 = .int(count) }
            for (key, v) in groupUpdate {
                if let i = kv.firstIndex(where: { $0.0 == key }) { kv[i].1 = .int(v) } else { kv.append((key, .int(v))) }
            }
            var updated = JSONValue.object(kv)
            if let sec = section, case .object(var rkv)? = root {
                for i in rkv.indices where rkv[i].0 == sec { rkv[i].1 = updated }
                updated = .object(rkv)
            }
            config = updated.serialized(pretty: true) + "\n"
            let shown = (present.isEmpty ? [key] : present).map { (section.map { $0 + "." } ?? "") + $0 }
            expertCount = (shown.joined(separator: ", "), given, count)
        }
        return (config, expertCount)
    }

    /// Step 4: config.json's quantization_config true for what is written: the routers, the
    /// 2-D float weights of /dense (and lm_head) stay unconverted when export quantizes the
    /// experts of a float model.
    static func quantizationConfig(_ config: String, reader: CheckpointReader, family fam: ModelFamily,
                                   encoding: ExpertWriteEncoding) throws -> String {
        var denseHasFP8 = false
        var notConverted = Set<String>()
        if reader.hasDense {
            let dense = try reader.file.root.openGroup("dense")
            for p in try dense.datasetPaths() {
                let d = try dense.openDataset(p)
                if d.rawElementType == .f8_e4m3 { denseHasFP8 = true } else if p.hasSuffix(".weight"), d.shape.count == 2 {
                    notConverted.insert(String(p.dropLast(".weight".count)))
                }
            }
        }
        for c in reader.layers { notConverted.insert("\(c.name).\(fam.routerSuffix)".replacingOccurrences(of: ".weight", with: "")) }
        return try ExpertWriteEncoding.adjustConfig(config, encoding: encoding, denseHasFP8: denseHasFP8,
                                                      notConverted: (notConverted.union(["lm_head"])).sorted(by: naturalLess))
    }

    /// Step 5: every output tensor, in natural name order, with where it comes from; and the
    /// layers merged and factored. Refuses layers the family cannot hold.
    private static func tensorList(_ reader: CheckpointReader, family fam: ModelFamily, layout: ExpertLayout, writeLayout: ExpertLayout,
                                   encoding: ExpertWriteEncoding, fusedSuffix suffix: String) throws
        -> (items: [(String, Source)], merged: [String], factored: [String]) {
        let checkpoint = reader.path
        var items: [(String, Source)] = []
        var merged: [String] = [], factored: [String] = []
        for c in reader.layers {
            guard c.expertType == fam.expertType else {
                throw SMoEError.dataset(checkpoint, "/moe_layers/\(c.name)", "expert_type \(c.expertType.rawValue) does not fit family \(fam.rawValue)")
            }
            let s = try reader.summary(c.name)
            let expertBiases = fam.fusedInputMajorInterleaved && layout == .fused
            if (s.hasRouterBias && fam.routerBiasSuffix == nil) || ((s.hasUpBias || s.hasDownBias) && !expertBiases) {
                throw SMoEError.dataset(checkpoint, "/moe_layers/\(c.name)", "has biases, which \(fam.rawValue) checkpoints have no place for")
            }
            if c.activation == .swiglu_oai && fam.fixedActivation != .swiglu_oai {
                throw SMoEError.dataset(checkpoint, "/moe_layers/\(c.name)", "activation swiglu_oai, which \(fam.rawValue) does not compute")
            }
            if s.hasExpertMap || s.numStored != c.numExperts { merged.append(c.name) }
            if s.isCompressed { factored.append(c.name) }
            items.append(("\(c.name).\(fam.routerSuffix)", .router(c.name)))
            if let b = fam.selectionBiasSuffix { items.append(("\(c.name).\(b)", .selectionBias(c.name))) }
            if let b = fam.routerBiasSuffix { items.append(("\(c.name).\(b)", .routerBias(c.name))) }
            switch writeLayout {
            case .perExpert:
                for e in 0..<c.numExperts {
                    for role in fam.matrixNames.keys {
                        let n = fam.expertTensorName(layer: c.name, expert: e, matrix: role)
                        items.append((n, .expert(layer: c.name, slot: e, role: role)))
                        if case .fp8 = encoding { items.append((n + "_scale_inv", .scale(n))) }
                    }
                }
            case .fused:
                for part in ["gate_up", "down"] {
                    let n = fam.fusedTensorName(layer: c.name, part: part, suffix: encoding.isMXFP4 ? "_blocks" : suffix)
                    items.append((n, .fused(layer: c.name, part: part)))
                    switch encoding {
                    case .fp8: items.append((n + "_scale_inv", .scale(n)))
                    case .mxfp4: items.append((fam.fusedTensorName(layer: c.name, part: part, suffix: "_scales"), .scale(n)))
                    case .plain: break
                    }
                    if fam.fusedInputMajorInterleaved {
                        items.append((fam.fusedTensorName(layer: c.name, part: part, suffix: "_bias"), .fused(layer: c.name, part: part + "_bias")))
                    }
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
        return (items, merged, factored)
    }

    /// Step 6: every tensor of `items` into `writer`, experts in `encoding` (a layer read once for
    /// its consecutive tensors).
    private static func writeTensors(_ items: [(String, Source)], reader: CheckpointReader, family fam: ModelFamily,
                                     encoding: ExpertWriteEncoding, plain plainDT: SafetensorsDType, router routerDT: SafetensorsDType,
                                     bias biasDT: SafetensorsDType, into writer: ShardedSafetensorsWriter, outputDirectory: String,
                                     progress: ProgressCallback?) throws {
        let checkpoint = reader.path
        var cached: MoELayer? = nil
        func layer(_ name: String) throws -> MoELayer {
            if let l = cached, l.name == name { return l }
            cached = nil
            let l = try reader.readLayer(name)
            cached = l
            return l
        }
        let dense = reader.hasDense ? try reader.file.root.openGroup("dense") : nil
        // Expert tensors in the chosen encoding; a quantized tensor's scales wait for their item.
        var pendingScales: [String: (SafetensorsDType, [Int], [UInt8])] = [:]
        func emit(_ name: String, _ values: [Float], _ shape: [Int]) throws {
            switch encoding {
            case .plain(let t):
                try writer.add(name, dtype: t, shape: shape, bytes: t.encode(values))
            case .fp8(let bo, let bi, let st):
                let rows = shape[shape.count - 2], cols = shape[shape.count - 1]
                let batch = shape.dropLast(2).reduce(1, *)
                let (q, s, _) = FP8Block.quantize(values, batch: batch, rows: rows, cols: cols, block: (bo, bi), scaleType: st)
                try writer.add(name, dtype: .F8_E4M3, shape: shape, bytes: q)
                let (gr, gc) = FP8Block.grid(rows: rows, cols: cols, block: (bo, bi))
                pendingScales[name] = (st, Array(shape.dropLast(2)) + [gr, gc], st.encode(s))
            case .mxfp4:
                // Module layout [E, in, out] → stored out × in [E, out, in/32, 16].
                let E = shape[0], C = shape[1], R = shape[2]
                guard C % MXFP4.groupSize == 0 else {
                    throw SMoEError.setting(.storage, "mxfp4 groups 32 inputs: \(name) has \(C) inputs per row, not a multiple of 32")
                }
                var t = [Float](repeating: 0, count: values.count)
                for e in 0..<E { for c in 0..<C { for r in 0..<R { t[(e * R + r) * C + c] = values[(e * C + c) * R + r] } } }
                let (b, s) = MXFP4.quantize(t, batch: E, rows: R, cols: C)
                try writer.add(name, dtype: .U8, shape: [E, R, C / MXFP4.groupSize, 16], bytes: b)
                pendingScales[name] = (.U8, [E, R, C / MXFP4.groupSize], s)
            }
        }
        for (i, (name, src)) in items.enumerated() {
            if i % 16 == 0 { progress?("export", i, items.count) }
            switch src {
            case .scale(let w):
                guard let (t, shape, bytes) = pendingScales.removeValue(forKey: w) else {
                    throw SMoEError.dataset(outputDirectory, name, "scale tensor ordered before its weight \(w) (internal error)")
                }
                try writer.add(name, dtype: t, shape: shape, bytes: bytes)
            case .dense(let p):
                let d = try dense!.openDataset(p)
                guard let t = d.rawElementType else { throw SMoEError.dataset(checkpoint, d.path, "element type cannot be written to safetensors") }
                try writer.add(name, dtype: SafetensorsDType(t), shape: d.shape, bytes: try d.readRaw())
            case .selectionBias(let l):
                let m = try layer(l)
                // A layer without one routes as with zeros (transformers' initial value).
                let b = m.selectionBias ?? [Float](repeating: 0, count: m.config.numExperts)
                try writer.add(name, dtype: biasDT, shape: fam.selectionBiasRowVector ? [1, m.config.numExperts] : [m.config.numExperts],
                               bytes: biasDT.encode(b))
            case .routerBias(let l):
                let m = try layer(l)
                let b = m.routerBias ?? [Float](repeating: 0, count: m.config.numExperts)
                try writer.add(name, dtype: routerDT, shape: [m.config.numExperts], bytes: routerDT.encode(b))
            case .fused(let l, let part) where fam.fusedInputMajorInterleaved:
                let (values, shape) = interleavedFused(try layer(l), part: part)
                if part.hasSuffix("_bias") {
                    try writer.add(name, dtype: plainDT, shape: shape, bytes: plainDT.encode(values))
                } else {
                    try emit(name, values, shape)
                }
            case .router(let l):
                let m = try layer(l)
                try checkRouterExportable(m, layer: l, family: fam, checkpoint: checkpoint)
                try writer.add(name, dtype: routerDT, shape: [m.config.numExperts, m.config.dModel], bytes: routerDT.encode(m.router.data))
            case .expert(let l, let slot, let role):
                let m = try layer(l)
                let w = m.experts[m.storedIndex(slot: slot)][matrix: role]!.dense()
                try emit(name, w.data, [w.rows, w.cols])
            case .fused(let l, let part):
                let (values, shape) = fusedExperts(try layer(l), part: part, inputMajorHalves: fam.fusedInputMajorHalves)
                try emit(name, values, shape)
            }
        }
    }

    /// GPT-OSS's fused expert tensors of layer m: `gate_up` [E, H, 2I] (gate even, up odd
    /// columns), `down` [E, I, H], `gate_up_bias` [E, 2I] (interleaved as gate_up), `down_bias`
    /// [E, H]; values in slot order, missing biases as zeros.
    static func interleavedFused(_ m: MoELayer, part: String) -> (values: [Float], shape: [Int]) {
        let c = m.config, H = c.dModel, I = c.dFF
        var values: [Float] = []
        for slot in 0..<c.numExperts {
            let x = m.experts[m.storedIndex(slot: slot)]
            switch part {
            case "gate_up":
                let g = x.gate!.dense(), u = x.up.dense()
                var v = [Float](repeating: 0, count: H * 2 * I)
                for h in 0..<H { for i in 0..<I { v[h * 2 * I + 2 * i] = g.data[i * H + h]; v[h * 2 * I + 2 * i + 1] = u.data[i * H + h] } }
                values += v
            case "down":
                values += inputMajorDown(x.down.dense(), H: H, I: I)
            case "gate_up_bias":
                let g = x.gateBias ?? [Float](repeating: 0, count: I), u = x.upBias ?? [Float](repeating: 0, count: I)
                for i in 0..<I { values += [g[i], u[i]] }
            default:
                values += x.downBias ?? [Float](repeating: 0, count: H)
            }
        }
        let shape = ["gate_up": [c.numExperts, H, 2 * I], "down": [c.numExperts, I, H],
                     "gate_up_bias": [c.numExperts, 2 * I], "down_bias": [c.numExperts, H]][part]!
        return (values, shape)
    }

    /// The other fused layouts of layer m, values in slot order: output-major `gate_up`
    /// [E, 2I, H] (gate rows, then up rows) and `down` [E, H, I]; or, `inputMajorHalves`
    /// (Llama-4), `gate_up` [E, H, 2I] (gate columns, then up columns) and `down` [E, I, H].
    static func fusedExperts(_ m: MoELayer, part: String, inputMajorHalves: Bool) -> (values: [Float], shape: [Int]) {
        let c = m.config
        var values: [Float] = []
        values.reserveCapacity(c.numExperts * c.dFF * c.dModel * (part == "gate_up" ? 2 : 1))
        let H = c.dModel, I = c.dFF
        for slot in 0..<c.numExperts {
            let x = m.experts[m.storedIndex(slot: slot)]
            if inputMajorHalves {
                if part == "gate_up" {
                    let g = x.gate!.dense(), u = x.up.dense()
                    var v = [Float](repeating: 0, count: H * 2 * I)
                    for h in 0..<H { for i in 0..<I { v[h * 2 * I + i] = g.data[i * H + h]; v[h * 2 * I + I + i] = u.data[i * H + h] } }
                    values += v
                } else {
                    values += inputMajorDown(x.down.dense(), H: H, I: I)
                }
            } else if part == "gate_up" {
                values += x.gate!.dense().data
                values += x.up.dense().data
            } else {
                values += x.down.dense().data
            }
        }
        let shape = inputMajorHalves ? (part == "gate_up" ? [c.numExperts, H, 2 * I] : [c.numExperts, I, H])
            : part == "gate_up" ? [c.numExperts, 2 * I, H] : [c.numExperts, H, I]
        return (values, shape)
    }

    /// down [H, I] stored input-major, [I, H].
    static func inputMajorDown(_ d: Matrix, H: Int, I: Int) -> [Float] {
        var v = [Float](repeating: 0, count: I * H)
        for i in 0..<I { for h in 0..<H { v[i * H + h] = d.data[h * I + i] } }
        return v
    }

    /// Refuses a layer whose routing the family's stock class does not compute: a selection
    /// bias it has no tensor for, another router type, expert groups or a scaling factor it has
    /// no config key for.
    static func checkRouterExportable(_ m: MoELayer, layer l: String, family fam: ModelFamily, checkpoint: String) throws {
        if m.selectionBias != nil && fam.selectionBiasSuffix == nil {
            throw SMoEError.dataset(checkpoint, "/moe_layers/\(l)/router/selection_bias", "\(fam.rawValue) checkpoints have no place for a selection bias")
        }
        let types: [RouterType]
        switch fam.routerType {
        case .fixed(let t): types = [t]
        case .normalisedIf: types = [.softmax_topk, .softmax_topk_norm]
        case .sigmoidNormalisedIf: types = [.sigmoid_topk, .sigmoid_topk_norm]
        }
        let c = m.config
        if !types.contains(c.routerType) || (c.numGroups > 1 && fam.groupKeys == nil) || (c.routedScalingFactor != 1 && fam.scalingKey == nil) {
            throw SMoEError.dataset(checkpoint, "/moe_layers/\(l)", "routes by \(c.routerType.rawValue) (groups \(c.numGroups), scaling \(c.routedScalingFactor)), which \(fam.rawValue) does not compute")
        }
    }

    /// The family of a checkpoint: its `import` entry's, else `given`, else its root
    /// `architecture`; with the import entry when there is one.
    static func exportFamily(_ reader: CheckpointReader, given: ModelFamily?) throws -> (ModelFamily, JSONValue?) {
        let entry = reader.history.last(where: { $0["stage"]?.stringValue == "import" && $0["family"] != nil })
        if let e = entry {
            guard let f = e["family"]?.stringValue.flatMap(ModelFamily.init(rawValue:)) else {
                throw SMoEError.dataset(reader.path, "/@history", "import entry names no known family")
            }
            if let g = given, g != f {
                throw SMoEError.setting(.family, "\(g.rawValue) disagrees with \(reader.path), imported as \(f.rawValue)")
            }
            return (f, e)
        }
        if let g = given { return (g, nil) }
        guard let f = ModelFamily(rawValue: reader.architecture) else {
            throw SMoEError.setting(.family, "is needed: \(reader.path) was not made by import and its architecture '\(reader.architecture)' is no known family; give one of \(ModelFamily.all.map(\.rawValue).joined(separator: ", "))")
        }
        return (f, nil)
    }

    /// A config.json for a checkpoint without a source config, from its layers and the shapes of
    /// its `/dense` tensors; keys the weights do not determine are left to the transformers
    /// defaults of the family's config class, except those listed as guessed.
    static func synthesiseConfig(_ reader: CheckpointReader, family fam: ModelFamily,
                                 dtype: SafetensorsDType) throws -> (text: String, guessed: [String]) {
        guard let first = reader.layers.first else { throw SMoEError.file(reader.path, "has no MoE layer") }
        var shapes: [String: [Int]] = [:]
        if reader.hasDense {
            let dense = try reader.file.root.openGroup("dense")
            for p in try dense.datasetPaths() { shapes[p] = try dense.openDataset(p).shape }
        }
        func need(_ name: String) throws -> [Int] {
            guard let s = shapes[name], !s.isEmpty else {
                throw SMoEError.setting(.family, "config.json cannot be built: \(reader.path) has no /dense/\(name) (export needs the source config.json for this checkpoint; import the source folder)")
            }
            return s
        }
        guard let act = ["silu": "silu", "relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"][first.activation.rawValue] else {
            throw SMoEError.setting(.family, "config.json cannot be built for activation \(first.activation.rawValue) without the source config.json: import the source folder, then export")
        }
        let torchDType = ["F16": "float16", "BF16": "bfloat16"][dtype.rawValue] ?? "float32"
        var kv: [(String, JSONValue)] = [("architectures", JSONValue([fam.architectures[0]])), ("model_type", .string(fam.modelTypes[0]))]
        var guessed: [String] = []
        func count(_ prefix: String) -> Int {
            Set(shapes.keys.compactMap { k -> Int? in
                guard k.hasPrefix(prefix) else { return nil }
                return Int(k.dropFirst(prefix.count).prefix { $0.isNumber })
            }).count
        }
        switch fam {
        case .mixtral:
            let q = try need("model.layers.0.self_attn.q_proj.weight")[0], k = try need("model.layers.0.self_attn.k_proj.weight")[0]
            let head = [128, 64, 32, 16, 8].first { q % $0 == 0 && k % $0 == 0 } ?? 1
            kv += [("hidden_size", .int(first.dModel)), ("intermediate_size", .int(first.dFF)),
                   ("num_hidden_layers", .int(count("model.layers."))), ("vocab_size", .int(try need("model.embed_tokens.weight")[0])),
                   ("num_attention_heads", .int(q / head)), ("num_key_value_heads", .int(k / head)), ("head_dim", .int(head)),
                   ("tie_word_embeddings", .bool(shapes["lm_head.weight"] == nil)),
                   ("num_local_experts", .int(first.numExperts)), ("num_experts_per_tok", .int(first.topK)), ("hidden_act", .string(act))]
            guessed = ["num_attention_heads", "num_key_value_heads", "head_dim"]
        case .switchTransformers:
            let bias = try need("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
            let q = try need("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
            let enc = count("encoder.block."), dec = count("decoder.block.")
            let sparseEnc = reader.layers.filter { $0.name.hasPrefix("encoder.") }.count
            let sparseDec = reader.layers.filter { $0.name.hasPrefix("decoder.") }.count
            kv += [("d_model", .int(first.dModel)), ("d_ff", .int(first.dFF)), ("num_heads", .int(bias[1])), ("d_kv", .int(q / bias[1])),
                   ("relative_attention_num_buckets", .int(bias[0])), ("num_layers", .int(enc)), ("num_decoder_layers", .int(dec)),
                   ("num_sparse_encoder_layers", .int(sparseEnc)), ("num_sparse_decoder_layers", .int(sparseDec)),
                   ("vocab_size", .int(try need("shared.weight")[0])), ("num_experts", .int(first.numExperts)),
                   ("expert_capacity", .int(1 << 20)), ("router_jitter_noise", .double(0)), ("router_bias", .bool(false)),
                   ("dense_act_fn", .string(act)), ("feed_forward_proj", .string(act)), ("is_gated_act", .bool(false)),
                   ("tie_word_embeddings", .bool(shapes["lm_head.weight"] == nil))]
            guessed = ["expert_capacity"]
        default:
            throw SMoEError.setting(.family, "config.json cannot be built for \(fam.rawValue) without the source config.json: import the source folder, then export")
        }
        kv.append(("torch_dtype", .string(torchDType)))
        return (JSONValue.object(kv).serialized(pretty: true) + "\n", guessed)
    }
}
