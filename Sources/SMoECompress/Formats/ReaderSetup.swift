import Foundation

/// One layer's record in a per-layer file beside a checkpoint (a calibration capture, statistics),
/// read from its group's datasets and attributes.
public protocol LayerFileRecord: Sendable {
    var name: String { get }
    var index: Int { get }
    /// Checks this record against the model's layer `config`; errors name `file`.
    func check(against config: LayerConfig, file: String) throws
}

/// What the calibration and statistics readers share: the file opened as its format, its
/// `source` attribute, one record per group under `/moe_layers` in `index` order, the lookup by
/// name and the one check that the file fits a model (`checkMatches`).
public class LayerFileReader<Record: LayerFileRecord>: @unchecked Sendable {
    public let path: String
    let file: H5File
    public let source: String
    /// Layers in `index` order.
    public let layers: [Record]
    /// The file in messages ("calibration file"), and what it says of a layer it has no record of.
    let kind: String, missing: String

    /// Opens `path` as `format`; `record` reads each layer group (its name and group) and returns
    /// the record given its index (the `index` attribute, read after it; default: the order read).
    init(_ path: String, expecting format: String, kind: String, missing: String,
         record: (_ name: String, _ group: H5Group) throws -> (_ index: Int) -> Record) throws {
        self.path = path
        self.kind = kind
        self.missing = missing
        file = try openSMoEFile(path, expecting: format)
        let root = file.root
        source = (try? root.stringAttribute("source")) ?? ""
        guard root.isGroup("moe_layers") else { throw SMoEError.dataset(path, "/moe_layers", "missing group") }
        let g = try root.openGroup("moe_layers")
        var records: [Record] = []
        for name in try g.childNames() {
            let lg = try g.openGroup(name)
            let make = try record(name, lg)
            records.append(make(lg.hasAttribute("index") ? try lg.intAttribute("index") : records.count))
        }
        layers = records.sorted { ($0.index, $0.name) < ($1.index, $1.name) }
    }

    /// The record of layer `name`.
    public func info(_ name: String) throws -> Record {
        guard let i = layers.first(where: { $0.name == name }) else {
            throw SMoEError.dataset(path, "/moe_layers/\(name)", missing)
        }
        return i
    }

    /// Checks that this file fits `model`: every MoE layer of the model (or those named) has a
    /// record that fits it (`LayerFileRecord.check`), and, when all layers are wanted, every
    /// record belongs to the model. Errors name the file and the layer.
    public func checkMatches(_ model: CheckpointReader, layers names: [String]? = nil) throws {
        try checkLayersMatch(file: path, held: layers, name: \.name, model: model, layers: names,
                             missing: "missing: the model \(model.path) has this MoE layer but the \(kind) does not",
                             foreign: "is not an MoE layer of the model \(model.path)") { record, c in
            try record.check(against: c, file: path)
        }
    }
}
