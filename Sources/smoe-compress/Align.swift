import ArgumentParser
import Foundation
import SMoECompress

struct Align: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Permute every expert's hidden neurons to match a reference expert (the model's function is unchanged).")

    @Argument(help: "The checkpoint to align.") var model: String
    @Option(help: "Routing statistics (from `stats`): the reference becomes each layer's most used expert.") var stats: String?
    @Option(help: "most-used (needs --stats) or a stored expert index; default: most-used with --stats, else 0.")
    var reference: ReferenceArgument?
    @Option(help: "pairs (expert pairs in parallel, one BLAS thread each) or blas (one pair at a time, threaded BLAS).")
    var parallel: Alignment.Parallelism = .pairs
    @OptionGroup var layers: LayerOptions
    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    func validate() throws { try output.requireOutput() }

    func run() throws {
        let inputs = [stats].compactMap { $0 }
        let reader = try CheckpointReader(model)
        let writer = try output.writer(from: reader, stage: "align", inputs: inputs)
        let progress = global.progress
        let shard = try output.shardValue()
        let stage = try namingFile(model, inputs: inputs) {
            try AlignStage(model: reader, stats: try stats.map(StatsReader.init), reference: reference?.value,
                           parallelism: parallel, layers: layers.names)
        }
        let result = try runStage(stage, model: reader, path: model, inputs: inputs, shard: shard, into: writer, progress: progress)
        render(result.reports, timing: result.layers)
    }

    func render(_ reports: [LayerAlignment], timing: [FinishedLayer]) {
        if global.json {
            return printJSON(.object([("output", .string(output.path)), ("layers", .array(reports.map(\.json))), timingJSON(timing)]))
        }
        var t = Table(["layer", "reference", "cosine before", "cosine after", "products s", "solver s"])
        for r in reports {
            t.add([r.name, "\(r.reference)", fixed(r.meanCosineBefore), fixed(r.meanCosineAfter),
                   fixed(r.productSeconds), fixed(r.solverSeconds)])
        }
        print(t.render())
        print("wrote \(output.path) (same function, neurons permuted)")
    }
}

/// `--reference most-used` or a stored expert index.
struct ReferenceArgument: ExpressibleByArgument {
    var value: AlignmentReference

    init?(argument: String) {
        if argument == "most-used" { value = .mostUsed } else if let n = Int(argument) { value = .stored(n) } else { return nil }
    }
}
