import Foundation

/// How much the model's loss moves per unit of each MoE layer's output error: the planner's
/// weights (ALGORITHM.md §4.3). With them `--target-size` minimises Σ_l c_l · e_l², e_l the
/// layer's relative output error on the held-apart tokens, which is the fitted model
/// Δloss ≈ c_l · e_l² summed over the layers.
///
/// The file is small JSON, written once per model by `tools/layer_sensitivity.py` (which
/// compresses one layer at a time and measures the loss with torch):
///
///     {"format": "smoe-compress layer sensitivity", "version": 1,
///      "rule": "delta_loss = c * relative_error^2",
///      "layers": {"model.layers.0.block_sparse_moe": 2.655, ...}}
///
/// It names every MoE layer of the model, each with a finite c ≥ 0; other keys are ignored.
public struct LayerSensitivity: Sendable, Equatable {
    public static let format = "smoe-compress layer sensitivity"

    public var path: String
    /// Layer name → c.
    public var weights: [String: Double]
    /// FNV-1a 64 of the file's bytes (16 hex digits), for the history.
    public var fingerprint: String

    public init(path: String, weights: [String: Double], fingerprint: String = "") {
        self.path = path
        self.weights = weights
        self.fingerprint = fingerprint
    }

    /// Reads and checks the file's own structure; `validate(layers:)` checks it against a model.
    public static func read(_ path: String) throws -> LayerSensitivity {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw SMoEError.file(path, "cannot read the layer sensitivity file")
        }
        guard let text = String(data: data, encoding: .utf8), let doc = try? JSONValue.parse(text) else {
            throw SMoEError.file(path, "is not JSON (a layer sensitivity file written by tools/layer_sensitivity.py)")
        }
        guard doc["format"]?.stringValue == format else {
            throw SMoEError.file(path, "is not a layer sensitivity file (its \"format\" is not \"\(format)\")")
        }
        guard doc["version"]?.intValue == 1 else { throw SMoEError.file(path, "has an unknown version (this tool reads version 1)") }
        guard case .object(let entries)? = doc["layers"], !entries.isEmpty else {
            throw SMoEError.file(path, "has no \"layers\" object of layer name → sensitivity")
        }
        var weights: [String: Double] = [:]
        for (name, value) in entries {
            guard let c = value.doubleValue, c.isFinite, c >= 0 else {
                throw SMoEError.dataset(path, "layers/\(name)", "the sensitivity must be a finite number ≥ 0 (got \(value.serialized()))")
            }
            guard weights[name] == nil else { throw SMoEError.dataset(path, "layers/\(name)", "is given twice") }
            weights[name] = c
        }
        var h = FNV1a()
        h.add(bytes: data)
        return LayerSensitivity(path: path, weights: weights, fingerprint: h.hex)
    }

    /// The file must give one c for every MoE layer of the model (`allLayers`) and no other.
    public func validate(allLayers: [String]) throws {
        if let extra = weights.keys.sorted().first(where: { !allLayers.contains($0) }) {
            throw SMoEError.dataset(path, "layers/\(extra)", "is not an MoE layer of the model (the file is for another model?)")
        }
        if let missing = allLayers.first(where: { weights[$0] == nil }) {
            throw SMoEError.file(path, "gives \(weights.count) layers, the model has \(allLayers.count): no sensitivity for \(missing)")
        }
    }

    /// The planner's cost of an error `e` in `layer`.
    func cost(_ layer: String, error e: Double) -> Double { weights[layer]! * e * e }

    public var json: JSONValue {
        .object([("file", .string(path)), ("fingerprint", .string(fingerprint)), ("rule", .string("delta_loss = c * relative_error^2")),
                 ("layers", .object(weights.sorted { $0.key < $1.key }.map { ($0.key, .double($0.value)) }))])
    }
}
