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

    func run() throws {
        try ensureOutputDiffers(output.output, from: [model])
        let reader = try CheckpointReader(model)
        let writeOptions = output.writeOptions(for: reader)
        let writer = try CheckpointWriter(destination: output.output, derivedFrom: reader, entry: ["stage": "expand"],
                                          options: writeOptions)
        let progress = global.progress
        let done = try namingFile(model) { try ExpandStage.run(model: reader, perSlot: perSlot, writer: writer, progress: progress.callback) }
        progress.finish()
        try writer.commit()
        let factored = done.reduce(0) { $0 + $1.factored }
        if global.json {
            return printJSON(.object([
                ("output", .string(output.output)), ("per_slot", .bool(perSlot)),
                ("layers", .array(done.map { .object([("name", .string($0.name)), ("factored_matrices", .int($0.factored)),
                                                      ("stored_before", .int($0.storedBefore)), ("stored_after", .int($0.storedAfter))]) })),
            ]))
        }
        var t = Table(["layer", "factored matrices", "stored experts"])
        for d in done { t.add([d.name, "\(d.factored)", d.storedBefore == d.storedAfter ? "\(d.storedAfter)" : "\(d.storedBefore) → \(d.storedAfter)"]) }
        print(t.render())
        print("wrote \(output.output): \(factored) factored matrices expanded\(perSlot ? ", one expert per router slot" : "")")
    }
}
