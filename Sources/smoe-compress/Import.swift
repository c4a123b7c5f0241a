import ArgumentParser
import Foundation
import SMoECompress

struct Import: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import",
        abstract: "Convert a Hugging Face safetensors model folder (Mixtral, SwitchTransformers, Qwen-MoE, OLMoE, DeepSeek-MoE) to an smoe-checkpoint.",
        discussion: """
            The folder needs config.json and model.safetensors (or model.safetensors.index.json with its shards). \
            Routers and routed experts become /moe_layers; every other tensor (attention, norms, embeddings, shared \
            experts, dense FFN layers) is copied byte for byte to /dense under its own name, so `export` can write the \
            model back. --dtype auto keeps float16 experts as float16 and bfloat16 experts as bfloat16 (when the \
            router has the same type; otherwise float32, exact for both); export restores the source dtype.
            """)

    @Argument(help: "The model folder (config.json + *.safetensors).") var modelDir: String
    @Option(name: [.customShort("o"), .long], help: "Output checkpoint (written to a temporary file, renamed on success).")
    var output: String
    @Option(help: "Stored float type of routers and experts: auto, f32, f16 or bf16.") var dtype: String = "auto"
    @Flag(help: "A block-scaled FP8 release (per-expert tensors): store its expert matrices as FP8 with their scale blocks, exactly the release's values at one byte per weight, instead of dequantized floats. Stages that compute new experts write them as floats (compress --fp8 keeps FP8).")
    var keepFP8 = false
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        guard StorageChoice(rawValue: dtype) != nil else { throw ValidationError("--dtype must be auto, f32, f16 or bf16, not '\(dtype)'") }
    }

    /// `--dtype` as the library's type (checked in `validate`).
    var storage: StorageChoice { StorageChoice(rawValue: dtype)! }

    func run() throws {
        let progress = global.progress
        let report = try namingFile(modelDir) {
            try HFImport.run(directory: modelDir, output: output, dtype: storage, keepFP8: keepFP8, progress: progress.callback)
        }
        progress.finish()
        if global.json { return printJSON(report.json) }
        let p = report.plan
        print("\(modelDir): \(p.config.family.rawValue), \(report.layers.count) MoE layers, \(p.layout.rawValue) experts in \(p.expertDType.rawValue)")
        var t = Table(["layer", "E", "k", "d_model", "d_ff", "experts", "act", "router"])
        for c in report.layers {
            t.add([c.name, "\(c.numExperts)", "\(c.topK)", "\(c.dModel)", "\(c.dFF)", c.expertType.rawValue,
                   c.activation.rawValue, c.routerType.rawValue])
        }
        print(t.render())
        let exact = [.F32, .BF16, .F8_E4M3, .U8].contains(p.expertDType) ? report.stored == .f32 : p.expertDType == .F16
        if let e = p.encoding, !report.expertEncoding.isFP8 { print("experts dequantized from \(e.json.serialized())") }
        print("dense: \(report.denseCount) tensors, \(formatBytes(report.denseBytes)) copied verbatim")
        if report.expertEncoding.isFP8 {
            return print("wrote \(output): expert matrices kept as FP8 (\(report.expertEncoding), float32 scales; exact), routers and biases as \(report.stored.rawValue)")
        }
        print("wrote \(output): experts stored as \(report.stored.rawValue) (source \(p.expertDType.rawValue)\(exact ? ", exact" : ", rounded"))")
    }
}
