import Foundation

/// How far one compressed MoE layer moved from the original, on a set of tokens
/// (ALGORITHM.md §5).
public struct LayerEvaluation: Sendable {
    public var name: String
    public var index: Int
    public var tokens: Int
    /// ‖y′ − y‖_F / ‖y‖_F over all evaluated tokens (y: original layer output, y′: compressed).
    public var relativeError: Double
    /// Mean over tokens of cos(y_t, y′_t) (a token whose two outputs are both zero counts 1).
    public var meanCosine: Double
    /// Fraction of tokens whose set of k chosen router slots is the same in both layers (against
    /// a compact layer: whose k groups of largest group-summed probability under the original
    /// router are the compact layer's k chosen groups).
    public var routingAgreement: Double
    /// Mean over tokens of |chosen ∩ chosen′| / k.
    public var routingOverlap: Double
    /// ‖y − captured‖ / ‖captured‖ of the ORIGINAL layer against the output stored in the
    /// calibration file, when it has one: a sanity check that the capture belongs to this model.
    public var capturedOutputError: Double?
    public var storedBefore: Int
    public var storedAfter: Int
    public var parametersBefore: Int
    public var parametersAfter: Int
    public var bytesBefore: Int
    public var bytesAfter: Int
    /// Expert FLOPs per token (2 × multiply–adds), before and after.
    public var flopsBefore: Double
    public var flopsAfter: Double

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [
            ("name", .string(name)), ("index", .int(index)), ("tokens", .int(tokens)),
            ("relative_error", .double(relativeError)), ("mean_cosine", .double(meanCosine)),
            ("routing_agreement", .double(routingAgreement)), ("routing_overlap", .double(routingOverlap)),
        ]
        if let c = capturedOutputError { kv.append(("captured_output_error", .double(c))) }
        kv += [
            ("stored_experts_before", .int(storedBefore)), ("stored_experts_after", .int(storedAfter)),
            ("expert_parameters_before", .int(parametersBefore)), ("expert_parameters_after", .int(parametersAfter)),
            ("expert_bytes_before", .int(bytesBefore)), ("expert_bytes_after", .int(bytesAfter)),
            ("expert_flops_per_token_before", .double(flopsBefore)), ("expert_flops_per_token_after", .double(flopsAfter)),
        ]
        return .object(kv)
    }
}

/// Whole-model evaluation: the layers and the totals.
public struct ModelEvaluation: Sendable {
    public var layers: [LayerEvaluation]
    /// Bytes of `/dense` in each file (the same parameters, but possibly stored differently).
    public var denseBytesBefore: Int
    public var denseBytesAfter: Int

    public var expertBytesBefore: Int { layers.reduce(0) { $0 + $1.bytesBefore } }
    public var expertBytesAfter: Int { layers.reduce(0) { $0 + $1.bytesAfter } }
    public var expertParametersBefore: Int { layers.reduce(0) { $0 + $1.parametersBefore } }
    public var expertParametersAfter: Int { layers.reduce(0) { $0 + $1.parametersAfter } }
    /// Expert bytes before / after.
    public var expertRatio: Double { Double(expertBytesBefore) / Double(max(expertBytesAfter, 1)) }
    /// (expert + dense) bytes before / after.
    public var modelRatio: Double {
        Double(expertBytesBefore + denseBytesBefore) / Double(max(expertBytesAfter + denseBytesAfter, 1))
    }
    /// Mean of the per-layer relative errors (each layer counts once).
    public var meanRelativeError: Double {
        layers.isEmpty ? 0 : layers.reduce(0) { $0 + $1.relativeError } / Double(layers.count)
    }
    public var maxRelativeError: Double { layers.map(\.relativeError).max() ?? 0 }

    public init(layers: [LayerEvaluation], denseBytesBefore: Int = 0, denseBytesAfter: Int = 0) {
        self.layers = layers
        self.denseBytesBefore = denseBytesBefore
        self.denseBytesAfter = denseBytesAfter
    }

    public var json: JSONValue {
        .object([
            ("layers", .array(layers.map(\.json))),
            ("mean_relative_error", .double(meanRelativeError)), ("max_relative_error", .double(maxRelativeError)),
            ("expert_parameters_before", .int(expertParametersBefore)), ("expert_parameters_after", .int(expertParametersAfter)),
            ("expert_bytes_before", .int(expertBytesBefore)), ("expert_bytes_after", .int(expertBytesAfter)),
            ("dense_bytes_before", .int(denseBytesBefore)), ("dense_bytes_after", .int(denseBytesAfter)),
            ("expert_compression_ratio", .double(expertRatio)), ("model_compression_ratio", .double(modelRatio)),
        ])
    }
}

/// Running sums for one layer pair, fed token block by token block (memory: one block).
public struct EvaluationAccumulator: Sendable {
    /// The original layer: its experts are read one at a time for each block when it is a
    /// checkpoint source.
    public let original: LayerSource
    public let compressed: MoELayer
    private(set) var tokens = 0
    private var errSq = 0.0, refSq = 0.0, cosSum = 0.0
    private var agree = 0, overlap = 0
    private var capErrSq = 0.0, capRefSq = 0.0, capTokens = 0

    /// Original slot → compressed slot, when the compressed layer is compact (fewer router
    /// slots: one per group); nil when both layers have the same slots.
    public let slotGroups: [Int]?

    /// Checks that the two layers are the same layer of the same model (slots, sizes, k). A
    /// compact layer (G < E router slots) is compared through `slotGroups` (original slot →
    /// group): routing agrees when the groups of the original's k chosen slots are the compact
    /// layer's chosen groups.
    public init(original: MoELayer, compressed: MoELayer, slotGroups: [Int]? = nil) throws {
        try self.init(original: LayerSource(original), compressed: compressed, slotGroups: slotGroups)
    }

    public init(original: LayerSource, compressed: MoELayer, slotGroups: [Int]? = nil) throws {
        let a = original.config, b = compressed.config
        // −1: a slot pruned away (no expert of the compressed layer stands for it).
        let groupsFit = slotGroups.map { m in m.count == a.numExperts && m.allSatisfy { $0 == -1 || (0..<b.numExperts).contains($0) } } ?? false
        guard a.numExperts == b.numExperts || groupsFit, a.topK == b.topK, a.dModel == b.dModel else {
            let hint = a.numExperts != b.numExperts && a.topK == b.topK && a.dModel == b.dModel
                ? (slotGroups == nil ? " (a compact layer is compared through the groups its merge history records, and there are none)"
                                     : " (the recorded groups do not map its \(a.numExperts) slots onto \(b.numExperts))")
                : ""
            throw SMoEError("layer \(a.name): the compressed layer has E=\(b.numExperts), k=\(b.topK), d_model=\(b.dModel) "
                            + "but the original has E=\(a.numExperts), k=\(a.topK), d_model=\(a.dModel): not the same model" + hint,
                            layer: a.name)
        }
        self.original = original
        self.compressed = compressed
        self.slotGroups = a.numExperts == b.numExperts ? nil : slotGroups
    }

    /// Adds a block of input tokens x [n, d_model]; `captured` is the original model's output
    /// for the same tokens as stored in the calibration file, when there is one.
    public mutating func add(_ x: Matrix, captured: Matrix? = nil) throws {
        let r0 = original.route(x)
        add(x, original: r0, output: try original.forward(x, routing: r0), captured: captured)
    }

    /// `add` with the original layer's routing `r0` and output `y0` for `x` already computed
    /// (several accumulators against one original read its experts once per block).
    public mutating func add(_ x: Matrix, original r0: Routing, output y0: Matrix, captured: Matrix? = nil) {
        let r1 = compressed.route(x)
        let y1 = compressed.forward(x, routing: r1)
        let n = x.rows, d = y0.cols, k = r0.k
        for t in 0..<n {
            var e = 0.0, a2 = 0.0, b2 = 0.0, ab = 0.0
            for j in 0..<d {
                let a = Double(y0.data[t * d + j]), b = Double(y1.data[t * d + j])
                e += (b - a) * (b - a); a2 += a * a; b2 += b * b; ab += a * b
            }
            errSq += e
            refSq += a2
            cosSum += (a2 == 0 && b2 == 0) ? 1 : (a2 == 0 || b2 == 0 ? 0 : ab / (a2.squareRoot() * b2.squareRoot()))
            if let m = slotGroups {
                // The original's k groups of largest group-summed probability Σ_{s∈g} softmax(z)_s
                // (sigmoid routers: largest member score max_{s∈g} σ(z_s), the fit's target).
                let e = r0.logits.cols
                let z = r0.logits.data[(t * e)..<((t + 1) * e)].map(Double.init)
                let mx = z.max() ?? 0
                var p = [Double](repeating: 0, count: compressed.config.numExperts)
                if compressed.config.routerType.scoring == "sigmoid" {
                    for (s, v) in z.enumerated() where m[s] >= 0 { p[m[s]] = max(p[m[s]], 1 / (1 + Foundation.exp(-v))) }
                } else {
                    for (s, v) in z.enumerated() where m[s] >= 0 { p[m[s]] += Foundation.exp(v - mx) }
                }
                let chosen = Set(CompactRouter.topK(p[...], k)), chosen1 = Set(r1.slots[(t * k)..<((t + 1) * k)])
                overlap += chosen.intersection(chosen1).count
                if chosen == chosen1 { agree += 1 }
                continue
            }
            var common = 0
            for p in 0..<k { for q in 0..<k where r0.slots[t * k + p] == r1.slots[t * k + q] { common += 1; break } }
            overlap += common
            if common == k { agree += 1 }
        }
        if let c = captured {
            for i in 0..<(n * d) {
                let a = Double(y0.data[i]), b = Double(c.data[i])
                capErrSq += (a - b) * (a - b); capRefSq += b * b
            }
            capTokens += n
        }
        tokens += n
    }

    /// The figures, with sizes given in stored bytes (from the files, or computed for in-memory layers).
    public func result(bytesBefore: Int, bytesAfter: Int) -> LayerEvaluation {
        let n = Double(max(tokens, 1))
        return LayerEvaluation(
            name: original.name, index: original.config.index, tokens: tokens,
            relativeError: refSq > 0 ? (errSq / refSq).squareRoot() : (errSq > 0 ? .infinity : 0),
            meanCosine: tokens > 0 ? cosSum / n : 1,
            routingAgreement: tokens > 0 ? Double(agree) / n : 1,
            routingOverlap: tokens > 0 ? Double(overlap) / (n * Double(max(original.config.topK, 1))) : 1,
            capturedOutputError: capTokens > 0 ? (capRefSq > 0 ? (capErrSq / capRefSq).squareRoot() : 0) : nil,
            storedBefore: original.numStored, storedAfter: compressed.numStored,
            parametersBefore: original.expertParameterCount, parametersAfter: compressed.expertParameterCount,
            bytesBefore: bytesBefore, bytesAfter: bytesAfter,
            flopsBefore: original.expertFlopsPerToken, flopsAfter: compressed.expertFlopsPerToken)
    }
}

/// The `eval` stage: compares two checkpoints of the same model layer by layer on calibration
/// tokens, one layer and one token block in memory at a time.
public enum Evaluation {
    /// Compares one pair of in-memory layers on the layer's calibration tokens.
    public static func evaluate(original: MoELayer, compressed: MoELayer, calibration: CalibrationReader,
                                bytesBefore: Int, bytesAfter: Int, tokens: TokenSettings = TokenSettings(),
                                slotGroups: [Int]? = nil, progress: ProgressCallback? = nil) throws -> LayerEvaluation {
        try evaluate(original: LayerSource(original), compressed: compressed, calibration: calibration, bytesBefore: bytesBefore,
                     bytesAfter: bytesAfter, tokens: tokens, slotGroups: slotGroups, progress: progress)
    }

    /// Compares a compressed layer with the original read from its source (`LayerSource`, as the
    /// stages read it: each routed expert read in turn, one token block at a time) on the layer's
    /// calibration tokens.
    public static func evaluate(original: LayerSource, compressed: MoELayer, calibration: CalibrationReader,
                                bytesBefore: Int, bytesAfter: Int, tokens: TokenSettings = TokenSettings(),
                                slotGroups: [Int]? = nil, progress: ProgressCallback? = nil) throws -> LayerEvaluation {
        var acc = try EvaluationAccumulator(original: original, compressed: compressed, slotGroups: slotGroups)
        let info = try calibration.info(original.name)
        let total = min(info.numTokens, tokens.maxTokens ?? Int.max)
        try calibration.forEachBlock(original.name, blockSize: tokens.blockSize, maxTokens: tokens.maxTokens) { start, x in
            let captured = info.hasOutput ? try calibration.output(original.name, rows: start..<(start + x.rows)) : nil
            try acc.add(x, captured: captured)
            progress?("eval \(original.name)", start + x.rows, total)
        }
        return acc.result(bytesBefore: bytesBefore, bytesAfter: bytesAfter)
    }

    /// Compares every MoE layer (or those named) of two checkpoints of the same model.
    public static func run(original: CheckpointReader, compressed: CheckpointReader, calibration: CalibrationReader,
                           layers names: [String]? = nil, tokens: TokenSettings = TokenSettings(),
                           progress: ProgressCallback? = nil) throws -> ModelEvaluation {
        try tokens.validate()
        let wanted = try original.selectLayers(names)
        try original.checkSameModel(compressed, layers: names == nil ? nil : wanted)
        try calibration.checkMatches(original, layers: wanted)
        var out: [LayerEvaluation] = []
        for n in wanted {
            // The original as the stages read it (its reader refuses NaN and Inf in each part it
            // reads); the compressed layer (usually small) whole.
            let a = try original.layerSource(n), b = try compressed.readLayer(n)
            if let what = b.firstNonFinite { throw SMoEError.dataset(compressed.path, n, "\(what) holds NaN or Inf") }
            let e: LayerEvaluation
            do {
                e = try evaluate(original: a, compressed: b, calibration: calibration,
                                 bytesBefore: try original.summary(n).expertFileBytes,
                                 bytesAfter: try compressed.summary(n).expertFileBytes,
                                 tokens: tokens, slotGroups: compressed.compactGroups(n), progress: progress)
            } catch let err as SMoEError where err.file == nil && err.layer != nil {
                // The layers do not match (`EvaluationAccumulator`): the compressed file is at fault.
                throw err.prefixed(compressed.path, file: compressed.path)
            }
            guard e.relativeError.isFinite, e.meanCosine.isFinite else {
                throw SMoEError.dataset(compressed.path, n, "the output error is not finite: the layer's outputs overflow float32 or hold NaN")
            }
            out.append(e)
        }
        return ModelEvaluation(layers: out, denseBytesBefore: try original.denseSummary().bytes,
                               denseBytesAfter: try compressed.denseSummary().bytes)
    }
}

extension CheckpointReader {
    /// Slot → group of a layer made compact (`--router compact`, or pruned: a record with
    /// `pruned`, also in a size plan that merges other layers to their E slots), from the last
    /// merge in the history (a `merge` entry, or the `merge` part of a `compress` entry); nil otherwise.
    public func compactGroups(_ layer: String) -> [Int]? {
        for entry in history.reversed() {
            guard let merge = entry["stage"]?.stringValue == "compress" ? entry["merge"] : entry,
                  merge["stage"]?.stringValue == "merge",
                  let layers = merge["layers"]?.arrayValue,
                  let record = layers.first(where: { $0["name"]?.stringValue == layer }) else { continue }
            // A pruned layer records its kept slots as single groups and its dropped slots (−1); it
            // is compact whatever the entry's router layout (a size plan prunes some layers and
            // merges the others to their E router slots, FORMAT.md "history").
            let prunedRecord = record["pruned"]?.arrayValue?.compactMap(\.intValue)
            guard merge["router"]?.stringValue == RouterLayout.compact.rawValue || prunedRecord != nil,
                  let groups = record["groups"]?.arrayValue?.map({ $0.arrayValue?.compactMap(\.intValue) ?? [] }) else { return nil }
            let pruned = prunedRecord ?? []
            var map = [Int](repeating: -1, count: groups.reduce(0) { $0 + $1.count } + pruned.count)
            for (g, slots) in groups.enumerated() { for s in slots where map.indices.contains(s) { map[s] = g } }
            return map.indices.allSatisfy({ map[$0] >= 0 || pruned.contains($0) }) ? map : nil
        }
        return nil
    }
}
