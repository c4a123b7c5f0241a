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
    @Option(help: "Use at most this many tokens of each layer (default: all).") var maxTokens: Int?
    @Option(help: "Comma-separated MoE layers to evaluate (default: all).") var layers: String?
    @Option(help: "Tokens per block.") var blockSize: Int = 4096
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        if let m = maxTokens, m < 1 { throw ValidationError("--max-tokens must be at least 1") }
        guard blockSize >= 1 else { throw ValidationError("--block-size must be at least 1") }
    }

    func run() throws {
        let a = try CheckpointReader(original), b = try CheckpointReader(compressed)
        let capture = try CalibrationReader(calib)
        let names = layers.map { $0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) } }
        let progress = global.progress
        let result = try namingFile(compressed, inputs: [original, calib]) {
            try Evaluation.run(original: a, compressed: b, calibration: capture, layers: names,
                               blockSize: blockSize, maxTokens: maxTokens, progress: progress.callback)
        }
        progress.finish()
        defer { warnIfCaptureIsForeign(result) }
        if global.json {
            return printJSON(.object([("original", .string(original)), ("compressed", .string(compressed)),
                                      ("calibration", .string(calib)), ("evaluation", result.json)]))
        }
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

/// 1234567 → "1.23M".
func compactCount(_ n: Int) -> String {
    let d = Double(n)
    if n >= 1_000_000_000 { return String(format: "%.2fG", d / 1e9) }
    if n >= 1_000_000 { return String(format: "%.2fM", d / 1e6) }
    if n >= 10_000 { return String(format: "%.1fk", d / 1e3) }
    return "\(n)"
}
