import ArgumentParser
import Foundation
import SMoECompress

struct Expand: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Materialise every factored matrix (U·V + S) into a dense checkpoint.")

    @Argument(help: "The compact checkpoint.") var model: String
    @Flag(help: "Also store one expert per router slot (G = E, no expert_map) for tools that do not know expert_map.")
    var perSlot = false
    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    func validate() throws { try output.requireOutput() }

    func run() throws {
        let reader = try CheckpointReader(model)
        let writer = try output.writer(from: reader, stage: "expand", inputs: [])
        let progress = global.progress
        let shard = try output.shardValue()
        let stage = try namingFile(model) { try ExpandStage(model: reader, perSlot: perSlot) }
        let result = try runStage(stage, model: reader, path: model, shard: shard, into: writer, progress: progress)
        render(result.reports, timing: result.layers)
    }

    func render(_ done: [LayerExpansion], timing: [FinishedLayer]) {
        let factored = done.reduce(0) { $0 + $1.factored }
        if global.json {
            return printJSON(.object([
                ("output", .string(output.path)), ("per_slot", .bool(perSlot)), ("layers", .array(done.map(\.json))), timingJSON(timing),
            ]))
        }
        var t = Table(["layer", "factored matrices", "stored experts"])
        for d in done { t.add([d.name, "\(d.factored)", d.storedBefore == d.storedAfter ? "\(d.storedAfter)" : "\(d.storedBefore) → \(d.storedAfter)"]) }
        print(t.render())
        print("wrote \(output.path): \(factored) factored matrices expanded\(perSlot ? ", one expert per router slot" : "")")
    }
}
