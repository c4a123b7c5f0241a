import ArgumentParser
import Foundation
import SMoECompress

struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "How far a compressed checkpoint moved from the original, layer by layer, on calibration tokens.",
        discussion: """
            Runs every MoE layer of both checkpoints on the tokens of the capture (a held-out capture that \
            merging did not see is the honest choice) and prints per layer: the relative output error \
            ‖y′ − y‖ / ‖y‖, the mean cosine of the outputs, top-k routing agreement, stored experts, expert \
            parameters and bytes before/after and expert FLOPs per token; then the totals and the compression \
            ratio. Works for any two checkpoints of the same model: aligned, merged, low-rank compressed.
            """)

    @Argument(help: "The original checkpoint.") var original: String
    @Argument(help: "The compressed checkpoint (same model).") var compressed: String
    @Option(help: "Calibration capture whose tokens are evaluated (ideally held out).") var calib: String
    @OptionGroup var layers: LayerOptions
    @OptionGroup var tokens: TokenOptions
    @OptionGroup var global: GlobalOptions
    @OptionGroup var reportOptions: ReportOptions

    func run() throws {
        try reportOptions.check(against: [original, compressed, calib])
        let a = try CheckpointReader(original), b = try CheckpointReader(compressed)
        let capture = try CalibrationReader(calib)
        let progress = global.progress
        let result = try namingFile(compressed, inputs: [original, calib]) {
            try Evaluation.run(original: a, compressed: b, calibration: capture, layers: layers.names,
                               tokens: tokens.settings, progress: progress.callback)
        }
        progress.finish()
        defer { warnIfCaptureIsForeign(result) }
        let document = JSONValue.object([("original", .string(original)), ("compressed", .string(compressed)),
                                         ("calibration", .string(calib)), ("evaluation", result.json)])
        try reportOptions.write(document)
        if global.json { return printJSON(document) }
        print("\(compressed) against \(original) on \(calib)")
        print(renderEvaluation(result))
    }
}

/// The eval table and totals (shared with `compress`).
func renderEvaluation(_ r: ModelEvaluation) -> String {
    var t = Table(["layer", "tokens", "rel error", "cosine", "routing", "experts", "params", "bytes", "MFLOP/token"])
    for l in r.layers {
        t.add([l.name, "\(l.tokens)", fixed(l.relativeError, 4), fixed(l.meanCosine, 4), fixed(l.routingAgreement, 3),
               "\(l.storedBefore)→\(l.storedAfter)", "\(compactCount(l.parametersBefore))→\(compactCount(l.parametersAfter))",
               "\(formatBytes(l.bytesBefore))→\(formatBytes(l.bytesAfter))",
               "\(fixed(l.flopsBefore / 1e6, 2))→\(fixed(l.flopsAfter / 1e6, 2))"])
    }
    var lines = [t.render()]
    lines.append("relative error: mean \(fixed(r.meanRelativeError, 4)), max \(fixed(r.maxRelativeError, 4))")
    lines.append("expert bytes: \(formatBytes(r.expertBytesBefore)) → \(formatBytes(r.expertBytesAfter)) "
                 + "(\(fixed(r.expertRatio, 2))× smaller); experts + dense: "
                 + "\(formatBytes(r.expertBytesBefore + r.denseBytesBefore)) → \(formatBytes(r.expertBytesAfter + r.denseBytesAfter)) "
                 + "(\(fixed(r.modelRatio, 2))×)")
    return lines.joined(separator: "\n")
}

/// One `warning:` line on stderr (in every mode) when the original model does not reproduce
/// the layer outputs stored in the capture: the capture is probably from another model.
func warnIfCaptureIsForeign(_ r: ModelEvaluation) {
    let suspicious = r.layers.filter { ($0.capturedOutputError ?? 0) > 0.05 }
    guard !suspicious.isEmpty else { return }
    let text = "warning: the original model does not reproduce the outputs stored in the capture for "
        + suspicious.map { "\($0.name) (\(fixed($0.capturedOutputError!, 3)))" }.joined(separator: ", ")
        + ": is the capture from this model?\n"
    FileHandle.standardError.write(Data(text.utf8))
}
