import ArgumentParser
import Foundation
import SMoECompress

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write a checkpoint of a known model family (merged, compressed or not) as a Hugging Face safetensors folder.",
        discussion: """
            Tensors get the source family's names and layout (per-expert or fused) and dtypes; config.json is the \
            stored source config, with the expert count set to G for a compact checkpoint (`merge --router \
            compact`): G router rows and G experts per layer, G/E of the original's expert bytes. E-slot merged \
            layers are written with one expert per router slot (slots of a group share the merged weights), so that \
            folder has the original's size on disk. Factored matrices are multiplied out. A checkpoint not made by \
            `import` is exported by its root architecture (or --family), with a config.json built from its layers \
            and /dense (mixtral and switch-transformers). Tokenizer files are not part of the checkpoint: copy them \
            from the source folder. Experts imported from a block-scaled FP8 or an MXFP4 folder are written back in that \
            encoding (re-quantized: FP8 scale = amax/448 per block as transformers' quantizer, an unchanged block \
            keeps its bytes) with the folder's quantization_config; --dtype chooses another.
            """)

    @Argument(help: "The checkpoint to export.") var model: String
    @Option(name: [.customShort("o"), .long], help: "Output folder (must not exist or be empty; built under a temporary name).")
    var output: String
    @Option(help: "Largest shard, e.g. 5GB, 500MB, 2GiB (decimal units as Hugging Face).") var maxShardSize: String = "5GB"
    @Option(help: "Model family when the checkpoint was not made by `import` and its architecture attribute names none: \(ModelFamily.all.map(\.rawValue).joined(separator: ", ")).")
    var family: ModelFamilyArgument?
    @Option(help: "Routed experts as: auto (as the source folder: FP8 block-scaled, MXFP4 or its float type), f32, f16, bf16 (quantized sources dequantized), f8-block (block-scaled FP8: the source's blocks, else 128x128 with float32 scales) or mxfp4 (GPT-OSS).")
    var dtype: ExportEncoding = .auto
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        do { _ = try parseByteSize(maxShardSize) } catch { throw ValidationError("--max-shard-size: '\(maxShardSize)' is not a size such as 5GB, 500MB or 2GiB") }
    }

    func run() throws {
        let limit = try parseByteSize(maxShardSize)
        let progress = global.progress
        let r = try namingFile(model, inputs: [output]) {
            try HFExport.run(checkpoint: model, outputDirectory: output, maxShardBytes: limit, family: family?.family,
                               dtype: dtype, progress: progress.callback)
        }
        progress.finish()
        if global.json { return printJSON(r.json) }
        let shards = r.files.filter { $0.hasSuffix(".safetensors") }.count
        print("wrote \(output): \(r.family.rawValue), \(r.layout.rawValue) experts in \(r.expertEncoding), \(r.tensorCount) tensors, \(formatBytes(r.tensorBytes)) in \(shards) shard\(shards == 1 ? "" : "s")")
        for f in r.files { print("  \(f)") }
        if !r.mergedLayers.isEmpty {
            print("merged layers written one expert per router slot: \(r.mergedLayers.joined(separator: ", "))")
        }
        if !r.factoredLayers.isEmpty {
            print("factored matrices multiplied out to dense: \(r.factoredLayers.joined(separator: ", "))")
        }
        if let c = r.expertCount {
            print("config.json: \(c.key) \(c.from.map(String.init) ?? "(absent)") → \(c.to) (compact layers: \(c.to) router rows and \(c.to) experts each)")
        }
        if let g = r.synthesisedConfigGuesses {
            print("config.json built from the layers and /dense (no source config); guessed: \(g.isEmpty ? "nothing" : g.joined(separator: ", ")); other keys take the transformers defaults")
        }
    }
}

/// A model family by its table name (`--family mixtral`).
struct ModelFamilyArgument: ExpressibleByArgument {
    var family: ModelFamily
    init?(argument: String) {
        guard let f = ModelFamily(rawValue: argument) else { return nil }
        family = f
    }
    static var allValueStrings: [String] { ModelFamily.all.map(\.rawValue) }
}
