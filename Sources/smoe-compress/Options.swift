import ArgumentParser
import Foundation
import SMoECompress

// Option groups several commands share. Each maps flags to the library's typed settings;
// the library validates the values (once, when a stage is made) and names a setting at fault,
// which `flag(for:)` turns back into the flag.

/// Options every command shares.
struct GlobalOptions: ParsableArguments {
    @Flag(help: "Print the result as one JSON document on stdout.")
    var json = false

    @Flag(help: "No progress display on stderr.")
    var quiet = false

    /// Progress on stderr, only when it is a terminal and not --quiet. Interactive runs also
    /// get the OpenBLAS kernel hint, once.
    var progress: Progress {
        let terminal = isatty(2) != 0
        let enabled = !quiet && terminal
        if enabled { _ = openBLASKernelNote }
        return Progress(enabled: enabled, perLayerLines: !quiet && !terminal)
    }
}

/// `--layers`: which MoE layers a command works on (default: all); the others are copied
/// unchanged by commands that write a checkpoint.
struct LayerOptions: ParsableArguments {
    @Option(help: "Comma-separated MoE layers to work on (default: all); a checkpoint output keeps the others unchanged.")
    var layers: CommaList?

    var names: [String]? { layers?.items }
}

/// `--max-tokens` and `--block-size`: how calibration tokens are read.
struct TokenOptions: ParsableArguments {
    @Option(help: "Use at most this many calibration tokens per layer (default: all).")
    var maxTokens: Int?

    @Option(help: "Calibration tokens per block (memory does not grow with the number of tokens).")
    var blockSize: Int = TokenSettings.defaultBlockSize

    @Option(help: "Memory budget (e.g. 8GiB): lowers --block-size to fit the predicted peak, or stops up front naming the smallest budget that would work (docs/ALGORITHM.md, \"Scale\").")
    var maxMemory: String?

    var settings: TokenSettings { TokenSettings(blockSize: blockSize, maxTokens: maxTokens) }

    /// The token settings, with the block size lowered to fit --max-memory when it is given.
    func settings(_ work: MemoryModel.Work, model: CheckpointReader, layers: [String]?) throws -> TokenSettings {
        guard let text = maxMemory else { return settings }
        let budget = try parseByteSize(text, for: .maxMemory)
        let block = try MemoryModel.blockSize(work, model: model, layers: layers, budget: budget, requested: blockSize)
        return TokenSettings(blockSize: block, maxTokens: maxTokens)
    }
}

/// `--shard I/N` of every writing stage, declared once: parsed once, when the command line is
/// read, into a `Shard`; a malformed value is the library's `--shard` error, thrown where the run
/// first asks for the shard (after the inputs are opened, as before).
struct ShardOptions: ParsableArguments {
    @Option(help: "Compute only shard I of N (0-based, as `plan --shards N` splits the layers) and write a shard file holding only those layers, for `assemble`.")
    var shard: ShardArgument?

    /// The `--shard` of the run, if any.
    func value() throws -> Shard? { try shard?.parsed.get() }
}

/// A `--shard` value as parsed: the shard, or why the text is not one.
struct ShardArgument: ExpressibleByArgument {
    let parsed: Result<Shard, SMoEError>

    init(argument: String) {
        do { parsed = .success(try Shard(parsing: argument)) } catch let e as SMoEError { parsed = .failure(e) } catch {
            parsed = .failure(SMoEError.setting(.shard, "\(error)"))
        }
    }
}

/// A comma-separated list (`a,b,c`); blanks around items are ignored, an empty text is an
/// empty list (which the library rejects, naming the setting).
struct CommaList: ExpressibleByArgument {
    var items: [String]

    init?(argument: String) {
        items = argument.split(separator: ",", omittingEmptySubsequences: false)
            .map { $0.trimmingCharacters(in: .whitespaces) }
        if items == [""] { items = [] }
    }
}


/// Options of commands that write a checkpoint.
struct OutputOptions: ParsableArguments {
    /// Optional here only so that `compress --plan-only` can do without it: every command that
    /// writes calls `requireOutput()` in its `validate()`, so `path` is never read without one.
    @Option(name: [.customShort("o"), .long], help: "Output file (written to a temporary file, renamed on success). Required, except by compress --plan-only.")
    var output: String?

    /// The output file (checked present by the command's `validate()`).
    var path: String {
        guard let output else { preconditionFailure("the command's validate() did not call requireOutput()") }
        return output
    }

    /// The usage error ArgumentParser gives for a missing required option, when -o is absent.
    func requireOutput() throws {
        if output == nil { throw ValidationError("Missing expected argument '--output <output>'") }
    }

    @Option(help: "Stored float type of weights: f32, f16, bf16, or auto (the input's experts' type when it is float16 or bfloat16, else f32).")
    var dtype: StorageChoice = .auto

    @Option(help: "gzip level (0-9, with the shuffle filter) for dense expert weight matrices (not factors or biases); off by default.")
    var gzip: Int?

    @OptionGroup var sharding: ShardOptions

    /// The library checks the gzip level (`WriteOptions.validate`); checked here too, before any
    /// file is opened, as a usage error (`--gzip must be in 0...9`).
    func validate() throws {
        do { try WriteOptions(gzip: gzip).validate() } catch let e as SMoEError where e.setting == .gzip {
            throw ValidationError("\(flag(for: .gzip)) \(e.detail)")
        }
    }

    /// The `--shard` of the run, if any.
    func shardValue() throws -> Shard? { try sharding.value() }

    /// Write options for an output derived from `source` (auto keeps float16 and bfloat16).
    func writeOptions(for source: CheckpointReader?) -> WriteOptions {
        WriteOptions(dtype: dtype.resolved(keeping: try? source?.expertStorage()), gzip: gzip)
    }

    /// A checkpoint writer for `source`'s stage output, after checking the output names none of
    /// the inputs.
    func writer(from source: CheckpointReader, stage: String, inputs: [String]) throws -> CheckpointWriter {
        try ensureOutputDiffers(path, from: [source.path] + inputs)
        reportLeftoverTemporaryFiles(path)
        let entry = JSONValue.object([("stage", .string(stage))])
        if try shardValue() != nil {
            return try CheckpointWriter(destination: path, shardOf: source, entry: entry, options: writeOptions(for: source))
        }
        return try CheckpointWriter(destination: path, derivedFrom: source, entry: entry, options: writeOptions(for: source))
    }
}

// Library enums are read from the command line by their raw values.
extension GroupingMethod: ExpressibleByArgument {}
extension MergeMethod: ExpressibleByArgument {}
extension SimilarityBase: ExpressibleByArgument {}
extension SparseStructure: ExpressibleByArgument {}
extension SVDMethod: ExpressibleByArgument {}
extension PruneMethod: ExpressibleByArgument {}
extension RefitTargets: ExpressibleByArgument {}
extension Alignment.Parallelism: ExpressibleByArgument {}
extension ExpertType: ExpressibleByArgument {}
extension Activation: ExpressibleByArgument {}
extension RouterType: ExpressibleByArgument {}
extension RouterLayout: ExpressibleByArgument {}
extension StorageChoice: ExpressibleByArgument {}
extension ExportEncoding: ExpressibleByArgument {}
