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

/// Checks that a per-layer file at `path` (its layers `held`, called `kind` in messages) fits
/// `model`: every wanted model layer (`names`, default all) is in the file and passes `check`,
/// and, when all layers are wanted, every layer of the file is an MoE layer of the model.
/// Errors name the file and the layer.
func checkLayersMatch(file path: String, kind: String, held: [String], model: CheckpointReader, layers names: [String]?,
                      _ check: (_ name: String, _ config: LayerConfig) throws -> Void) throws {
    for name in names ?? model.layers.map(\.name) {
        let c = try model.config(name)
        guard held.contains(name) else {
            throw SMoEError.dataset(path, "/moe_layers/\(name)", "missing: the model \(model.path) has this MoE layer but the \(kind) does not")
        }
        try check(name, c)
    }
    if names == nil {
        for name in held where !model.layers.contains(where: { $0.name == name }) {
            throw SMoEError.dataset(path, "/moe_layers/\(name)", "is not an MoE layer of the model \(model.path)")
        }
    }
}
