import ArgumentParser
import Foundation
import SMoECompress

struct Export: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write a checkpoint made by `import` (merged, compressed or not) back as a Hugging Face safetensors folder.",
        discussion: """
            Tensors get the source family's names and layout (per-expert or fused) and dtypes; config.json is the \
            stored source config, unchanged. Merged layers are written with one expert per router slot (slots of a \
            group share the merged weights) and factored matrices are materialised, so the folder loads in \
            transformers as the original model class but has the original's size on disk. Tokenizer files are not \
            part of the checkpoint: copy them from the source folder.
            """)

    @Argument(help: "The checkpoint to export.") var model: String
    @Option(name: [.customShort("o"), .long], help: "Output folder (must not exist or be empty; built under a temporary name).")
    var output: String
    @Option(help: "Largest shard, e.g. 5GB, 500MB, 2GiB (decimal units as Hugging Face).") var maxShardSize: String = "5GB"
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        do { _ = try parseByteSize(maxShardSize) } catch { throw ValidationError("--max-shard-size: '\(maxShardSize)' is not a size such as 5GB, 500MB or 2GiB") }
    }

    func run() throws {
        let limit = try parseByteSize(maxShardSize)
        let progress = global.progress
        let r = try namingFile(model, inputs: [output]) {
            try HFExport.run(checkpoint: model, outputDirectory: output, maxShardBytes: limit, progress: progress.callback)
        }
        progress.finish()
        if global.json { return printJSON(r.json) }
        let shards = r.files.filter { $0.hasSuffix(".safetensors") }.count
        print("wrote \(output): \(r.family.rawValue), \(r.layout.rawValue) experts, \(r.tensorCount) tensors, \(formatBytes(r.tensorBytes)) in \(shards) shard\(shards == 1 ? "" : "s")")
        for f in r.files { print("  \(f)") }
        if !r.mergedLayers.isEmpty {
            print("merged layers written one expert per router slot: \(r.mergedLayers.joined(separator: ", "))")
        }
        if !r.factoredLayers.isEmpty {
            print("factored matrices materialised to dense: \(r.factoredLayers.joined(separator: ", "))")
        }
    }
}
