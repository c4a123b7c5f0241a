import Foundation

/// The one error type the library throws to its callers. Its description is a single line
/// naming the file, dataset or setting at fault, ready to print after `error: `.
///
/// Besides its text an error carries what it is about as fields, so callers decide by them and
/// never by the text: the setting at fault, the file it names (`file`), the MoE layer it names
/// (`layer`), and its `kind` (a setting, input the run reads, or an output the run writes).
public struct SMoEError: Error, CustomStringConvertible, Equatable, Sendable {
    /// What went wrong, for callers that act on it.
    public enum Kind: Sendable, Equatable {
        /// A setting's value (`setting` says which).
        case setting
        /// Input the run reads: a file, a layer or data it cannot use, or a computation on it.
        case input
        /// An output the run writes (the file, its temporary file, a resume work directory and
        /// its parts) could not be written or read back: a full disk, a lost mount.
        case output
    }

    public let kind: Kind
    /// The setting at fault, when the error is about a setting's value (`SMoEError.setting`).
    public let setting: Setting?
    /// The file the text names (a model, a capture, an output, a file inside a model folder).
    public let file: String?
    /// The MoE layer the text names.
    public let layer: String?
    /// The text after the setting's name; for other errors, the whole line. Other settings it
    /// mentions stand as `{name}` (see `rendered(naming:)`).
    public let detail: String

    /// An error about input, naming (in its text) `file` and `layer` when given.
    public init(_ message: String, file: String? = nil, layer: String? = nil, kind: Kind = .input) {
        self.init(kind: kind, setting: nil, file: file, layer: layer, detail: message)
    }

    private init(kind: Kind, setting: Setting?, file: String?, layer: String?, detail: String) {
        self.kind = kind
        self.setting = setting
        self.file = file
        self.layer = layer
        // Keep it to one line whatever the cause said.
        self.detail = detail.split(whereSeparator: \.isNewline).joined(separator: " ")
    }

    /// The line with settings named by their library names (`groups: must be at least 1`).
    public var message: String { rendered { $0.rawValue } }

    public var description: String { message }

    /// The line with every setting named by `naming` (the command line passes its flag names).
    public func rendered(naming: (Setting) -> String) -> String {
        var text = detail
        for s in Setting.allCases where text.contains("{\(s.rawValue)}") {
            text = text.replacingOccurrences(of: "{\(s.rawValue)}", with: naming(s))
        }
        guard let s = setting else { return text }
        return "\(naming(s)): \(text)"
    }

    /// A problem with a whole file.
    public static func file(_ path: String, _ what: String, kind: Kind = .input) -> SMoEError {
        SMoEError("\(path): \(what)", file: path, kind: kind)
    }

    /// A problem with one object (dataset, group or attribute) inside a file.
    public static func dataset(_ path: String, _ object: String, _ what: String, kind: Kind = .input) -> SMoEError {
        SMoEError("\(path): \(object): \(what)", file: path, kind: kind)
    }

    /// A problem with one object of an output file the run writes (`.output`).
    public static func output(_ path: String, _ object: String, _ what: String) -> SMoEError {
        dataset(path, object, what, kind: .output)
    }

    /// A problem with one MoE layer, not tied to a file (yet): `layer: what`.
    public static func layer(_ name: String, _ what: String) -> SMoEError {
        SMoEError("\(name): \(what)", layer: name)
    }

    /// A setting whose value a stage cannot use; `what` may mention other settings as `{name}`.
    public static func setting(_ s: Setting, _ what: String) -> SMoEError {
        SMoEError(kind: .setting, setting: s, file: nil, layer: nil, detail: what)
    }

    /// The same error, of `kind`.
    public func of(kind: Kind) -> SMoEError {
        SMoEError(kind: kind, setting: setting, file: file, layer: layer, detail: detail)
    }

    /// The same error, known to be about `layer` (its text already says which).
    public func about(layer name: String) -> SMoEError {
        SMoEError(kind: kind, setting: setting, file: file, layer: layer ?? name, detail: detail)
    }

    /// The same error with `subject: ` in front of its text (a setting's error unchanged), about
    /// `file` and `layer` when given.
    public func prefixed(_ subject: String, file newFile: String? = nil, layer newLayer: String? = nil) -> SMoEError {
        guard setting == nil else { return self }
        return SMoEError(kind: kind, setting: nil, file: newFile ?? file, layer: newLayer ?? layer, detail: "\(subject): \(detail)")
    }

    /// The same error with the layer in front, unless it already names a layer or a file (whose
    /// datasets name the layer) or is about a setting.
    public func naming(layer name: String) -> SMoEError {
        if setting != nil || layer != nil || file != nil { return self }
        return prefixed(name, layer: name)
    }

    /// The same error with the file `path` in front, unless it is about a setting or already
    /// names `path`, one of `known`, or a file inside one of them (a model folder's config.json).
    public func naming(file path: String, unlessItNames known: [String] = []) -> SMoEError {
        if setting != nil { return self }
        if let f = file {
            let named = URL(fileURLWithPath: f).standardized.pathComponents
            for p in [path] + known where named.starts(with: URL(fileURLWithPath: p).standardized.pathComponents) { return self }
        }
        return prefixed(path, file: path)
    }
}

/// The settings a stage can reject, by their library names. The command line maps each to its
/// flag (`Sources/smoe-compress/Diagnostics.swift`); other callers print the name.
public enum Setting: String, Sendable, CaseIterable {
    // Which layers and tokens.
    case layers, maxTokens = "max-tokens", blockSize = "block-size", calibration, stats
    // Merging.
    case groups, adaptive, grouping, similarity, mergeMethod = "merge-method", regmeanAlpha = "regmean-alpha"
    case regmeanRidge = "regmean-ridge", refitRidge = "refit-ridge", router, compactRefit = "compact-refit", prune, refitTargets = "refit-targets", regmeanMinTokens = "regmean-min-tokens"
    // Low rank.
    case rank, energy, sparsity, iterations, matrices, svd, activationAware = "activation-aware"
    case lowrankObjective = "lowrank-objective", whiteningRidge = "whitening-ridge", targetSize = "target-size", uniformGroups = "uniform-groups", fp8
    // Alignment.
    case reference
    // Output.
    case storage, gzip, maxShardSize = "max-shard-size", family, keepFP8 = "keep-fp8"
    // Sharded runs: one shard I/N of a run, and the number of shards of a split.
    case shard, shards, allowPartial = "allow-partial"
    // Memory.
    case maxMemory = "max-memory"
    // The planted-model generator.
    case synthLayers = "synth-layers", experts, families, topK = "top-k", dimensions, noise, tokens, synthRouting = "synth-routing"
}
