import Foundation

/// What the per-layer files beside a checkpoint (calibration captures, statistics) share: a
/// writer of `/moe_layers/<name>` groups behind the common header, to a temporary file renamed on
/// `commit()`, and the check that a file fits the model it is used with.
public class LayerFileWriter: @unchecked Sendable {
    let output: AtomicOutput
    let file: H5File
    let layersGroup: H5Group

    /// - Parameters:
    ///   - format: the root `format` attribute (`smoe-calibration`, `smoe-stats`).
    ///   - source: names what the file was made from (free text or a JSON object as text).
    init(destination: String, format: String, source: String) throws {
        output = try AtomicOutput(destination: destination)
        file = try H5File.create(output.temporaryPath)
        try file.root.setAttribute("format", format)
        try file.root.setAttribute("format_version", smoeFormatVersion)
        try file.root.setAttribute("source", source)
        layersGroup = try file.root.createGroup("moe_layers")
    }

    public func commit() throws {
        try output.commit(closing: file)
    }
}

/// The one check that a file of per-layer parts at `path` (its layers `held`, each named by
/// `name`: a calibration capture, statistics, a compressed checkpoint) fits `model`: every wanted
/// model layer (`names`, default all) is in the file (else the error says `missing`) and passes
/// `check`, and, when all layers are wanted, every layer of the file is an MoE layer of the model
/// (else `foreign`). Errors name the file and the layer.
func checkLayersMatch<Info>(file path: String, held: [Info], name: (Info) -> String, model: CheckpointReader,
                            layers names: [String]?, missing: String, foreign: String,
                            _ check: (_ info: Info, _ config: LayerConfig) throws -> Void = { _, _ in }) throws {
    for wanted in names ?? model.layers.map(\.name) {
        let c = try model.config(wanted)
        guard let info = held.first(where: { name($0) == wanted }) else {
            throw SMoEError.dataset(path, "/moe_layers/\(wanted)", missing)
        }
        try check(info, c)
    }
    if names == nil {
        for name in held.map(name) where !model.layers.contains(where: { $0.name == name }) {
            throw SMoEError.dataset(path, "/moe_layers/\(name)", foreign)
        }
    }
}

extension CheckpointReader {
    /// Checks that `other` (a compressed checkpoint) holds the MoE layers of this model (those
    /// named, or all, and then no other): the same check as a calibration or statistics file's
    /// (`checkLayersMatch`); errors name `other`, as the file at fault.
    public func checkSameModel(_ other: CheckpointReader, layers names: [String]?) throws {
        try checkLayersMatch(file: other.path, held: other.layers, name: \.name, model: self, layers: names,
                             missing: "missing: \(path) has this MoE layer, so the files are not the same model",
                             foreign: "is not an MoE layer of \(path): not the same model")
    }
}
