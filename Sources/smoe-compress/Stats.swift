import ArgumentParser
import Foundation
import SMoECompress

struct Stats: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Routing statistics of every MoE layer over a calibration capture: usage counts and expert similarities.",
        discussion: """
            Streams each layer's calibration tokens in blocks (memory does not grow with the number of tokens), \
            routes them (top-k of the router logits, ties to the lower slot) and writes an smoe-stats file: per \
            layer the counts and frequency of every router slot and the similarity matrices asked for. Bases: \
            router-logits (cosine of logit columns, mapped to [0, 1]; the default), feature (cosine of the mean \
            input of each slot's tokens; 0 for slots never chosen), weight (cosine of the flattened expert \
            matrices), expert-output (HC-SMoE: negative distance between the experts' mean outputs over all \
            tokens; costs one expert forward per expert and token, cap it with --max-tokens).
            """)

    @Argument(help: "The model checkpoint (smoe-checkpoint).")
    var model: String

    @Option(help: "Calibration capture (smoe-calibration) with a capture for every MoE layer of the model.")
    var calib: String

    @Option(name: [.customShort("o"), .long], help: "Statistics file to write (smoe-stats).")
    var output: String

    @Option(help: "Similarity bases: a comma list of router-logits, feature, weight, expert-output, or all.")
    var similarity = "router-logits"

    @OptionGroup var sharding: ShardOptions

    @OptionGroup var layers: LayerOptions
    @OptionGroup var tokens: TokenOptions
    @OptionGroup var global: GlobalOptions
    @OptionGroup var reportOptions: ReportOptions

    func run() throws {
        let bases = try SimilarityBase.parseList(similarity)
        try ensureOutputDiffers(output, from: [model, calib])
        try reportOptions.check(against: [model, calib, output])
        let reader = try CheckpointReader(model)
        let stage = try StatisticsStage(model: reader, calibration: try CalibrationReader(calib), bases: Set(bases),
                                        tokens: try tokens.settings(.statistics(readsExperts: bases.contains(where: \.needsExperts)), model: reader, layers: layers.names), layers: layers.names)
        let source = StatsWriter.source(model: model, calibration: calib, bases: bases, maxTokens: tokens.maxTokens)
        let shard = try sharding.value()
        let writer = shard == nil ? try StatsWriter(destination: output, source: source)
            : try StatsWriter(shardDestination: output, source: source)
        let result = try runStage(stage, model: reader, path: model, inputs: [calib], shard: shard, into: writer, progress: global.progress)
        // The report draws the similarity matrices too (`--json` leaves them out: E² numbers a layer).
        try reportOptions.write(document(result.reports, bases: bases, timing: result.layers, matrices: true))
        render(result.reports, bases: bases, timing: result.layers)
    }

    /// The `--json` document (the report's source).
    func document(_ layers: [LayerStatistics], bases: [SimilarityBase], timing: [FinishedLayer], matrices: Bool = false) -> JSONValue {
        .object([
            ("model", .string(model)), ("calibration", .string(calib)), ("output", .string(output)),
            ("similarity", JSONValue(bases.map(\.rawValue))),
            ("layers", .array(layers.map { Inspection.statsLayer($0, matrices: matrices) })), timingJSON(timing),
        ])
    }

    func render(_ layers: [LayerStatistics], bases: [SimilarityBase], timing: [FinishedLayer]) {
        if global.json { return printJSON(document(layers, bases: bases, timing: timing)) }
        print("wrote \(output): \(layers.count) MoE layers, similarity \(bases.map(\.rawValue).joined(separator: ", "))")
        for s in layers { printUsage(s) }
    }
}

/// The per-slot usage table of one layer.
func printUsage(_ s: LayerStatistics) {
    print("")
    print("\(s.name) (index \(s.index)): \(s.numTokens) tokens, top-\(s.topK), max share \(fixed(s.maxShare, 2))"
          + (s.neverChosen.isEmpty ? "" : ", never chosen: \(s.neverChosen.map(String.init).joined(separator: " "))"))
    var t = Table(["slot", "count", "frequency", "note"])
    for e in 0..<s.numExperts {
        t.add(["\(e)", "\(s.counts[e])", fixed(s.frequency[e], 4), s.counts[e] == 0 ? "never chosen" : ""])
    }
    print(t.render())
}
