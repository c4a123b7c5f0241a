import ArgumentParser
import Foundation
import SMoECompress

struct Align: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Permute every expert's hidden neurons to match a reference expert (the model's function is unchanged).")

    @Argument(help: "The checkpoint to align.") var model: String
    @Option(help: "Routing statistics (from `stats`): the reference becomes each layer's most used expert.") var stats: String?
    @Option(help: "most-used (needs --stats) or a stored expert index; default: most-used with --stats, else 0.")
    var reference: String?
    @Option(help: "pairs (expert pairs in parallel, one BLAS thread each) or blas (one pair at a time, threaded BLAS).")
    var parallel: String = "pairs"
    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        guard Alignment.Parallelism(rawValue: parallel) != nil else { throw ValidationError("--parallel must be pairs or blas") }
        if let r = reference, r != "most-used", Int(r) == nil { throw ValidationError("--reference must be most-used or an expert index") }
        if reference == "most-used" && stats == nil { throw ValidationError("--reference most-used needs --stats") }
    }

    func run() throws {
        try ensureOutputDiffers(output.output, from: [model] + [stats].compactMap { $0 })
        let reader = try CheckpointReader(model)
        let statsReader = try stats.map { try StatsReader($0) }
        try statsReader?.checkMatches(reader)
        let writer = try CheckpointWriter(destination: output.output, derivedFrom: reader, entry: ["stage": "align"],
                                          options: output.writeOptions(for: reader))
        let progress = global.progress
        var reports: [LayerAlignment] = []
        for c in reader.layers {
            let layer = try reader.readLayer(c.name)
            let ref: Int
            if let r = reference, let n = Int(r) {
                ref = n
            } else if let s = statsReader {
                // The most used slot's stored expert.
                ref = layer.storedIndex(slot: Grouping.byUsage(try s.frequency(c.name))[0])
            } else {
                ref = 0
            }
            let (aligned, report) = try namingFile(model) {
                try Alignment.alignLayer(layer, reference: ref, parallelism: Alignment.Parallelism(rawValue: parallel)!,
                                         progress: progress.callback)
            }
            try writer.write(aligned)
            reports.append(report)
        }
        progress.finish()
        writer.updateEntry(.object([
            ("stage", "align"), ("tool", .string("smoe-compress \(smoeCompressVersion)")),
            ("reference", .string(reference ?? (stats == nil ? "0" : "most-used"))),
            ("layers", .array(reports.map { .object([("name", .string($0.name)), ("reference", .int($0.reference))]) })),
        ]))
        try writer.commit()
        if global.json {
            return printJSON(.object([("output", .string(output.output)), ("layers", .array(reports.map(\.json)))]))
        }
        var t = Table(["layer", "reference", "cosine before", "cosine after", "products s", "solver s"])
        for r in reports {
            t.add([r.name, "\(r.reference)", fixed(r.meanCosineBefore), fixed(r.meanCosineAfter),
                   fixed(r.productSeconds), fixed(r.solverSeconds)])
        }
        print(t.render())
        print("wrote \(output.output) (same function, neurons permuted)")
    }
}
