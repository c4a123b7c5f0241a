import Foundation

/// The set-up the calibration and statistics readers share: the file opened as `format`, its
/// `source` attribute, and each group under `/moe_layers` read by `layer` (its name and group;
/// it returns the layer given its index), with the `index` attribute (default: the order read)
/// read after it, sorted by index.
func readLayerGroups<Info>(_ path: String, expecting format: String,
                           layer: (_ name: String, _ group: H5Group) throws -> (_ index: Int) -> Info,
                           order: (Info) -> (Int, String)) throws -> (file: H5File, source: String, layers: [Info]) {
    let file = try openSMoEFile(path, expecting: format)
    let root = file.root
    let source = (try? root.stringAttribute("source")) ?? ""
    guard root.isGroup("moe_layers") else { throw SMoEError.dataset(path, "/moe_layers", "missing group") }
    let g = try root.openGroup("moe_layers")
    var infos: [Info] = []
    for name in try g.childNames() {
        let lg = try g.openGroup(name)
        let make = try layer(name, lg)
        infos.append(make(lg.hasAttribute("index") ? try lg.intAttribute("index") : infos.count))
    }
    infos.sort { order($0) < order($1) }
    return (file, source, infos)
}
