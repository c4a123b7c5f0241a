/// The one error type the library throws to its callers. Its description is a single line
/// naming the file, dataset or setting at fault, ready to print after `error: `.
public struct SMoEError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The setting at fault, when the error is about a setting's value (`SMoEError.setting`).
    public let setting: Setting?
    /// The text after the setting's name; for other errors, the whole line. Other settings it
    /// mentions stand as `{name}` (see `rendered(naming:)`).
    public let detail: String

    public init(_ message: String) { self.init(setting: nil, detail: message) }

    private init(setting: Setting?, detail: String) {
        self.setting = setting
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
    public static func file(_ path: String, _ what: String) -> SMoEError {
        SMoEError("\(path): \(what)")
    }

    /// A problem with one object (dataset, group or attribute) inside a file.
    public static func dataset(_ path: String, _ object: String, _ what: String) -> SMoEError {
        SMoEError("\(path): \(object): \(what)")
    }

    /// A setting whose value a stage cannot use; `what` may mention other settings as `{name}`.
    public static func setting(_ s: Setting, _ what: String) -> SMoEError {
        SMoEError(setting: s, detail: what)
    }

    /// The same error with `subject` (a file or a layer) in front, unless it already names it
    /// or one of `known`, or is about a setting.
    public func naming(_ subject: String, unlessItNames known: [String] = []) -> SMoEError {
        if setting != nil || ([subject] + known).contains(where: { detail.contains($0) }) { return self }
        return SMoEError("\(subject): \(detail)")
    }
}

/// The settings a stage can reject, by their library names. The command line maps each to its
/// flag (`Sources/smoe-compress/Diagnostics.swift`); other callers print the name.
public enum Setting: String, Sendable, CaseIterable {
    // Which layers and tokens.
    case layers, maxTokens = "max-tokens", blockSize = "block-size", calibration, stats
    // Merging.
    case groups, adaptive, grouping, similarity, mergeMethod = "merge-method", regmeanAlpha = "regmean-alpha"
    case regmeanRidge = "regmean-ridge", refitRidge = "refit-ridge", router, compactRefit = "compact-refit", prune
    // Low rank.
    case rank, energy, sparsity, iterations, matrices, svd, activationAware = "activation-aware"
    case lowrankObjective = "lowrank-objective", whiteningRidge = "whitening-ridge", targetSize = "target-size", uniformGroups = "uniform-groups"
    // Alignment.
    case reference
    // Output.
    case storage, maxShardSize = "max-shard-size", family
    // Sharded runs: one shard I/N of a run, and the number of shards of a split.
    case shard, shards, allowPartial = "allow-partial"
    // Memory.
    case maxMemory = "max-memory"
    // The planted-model generator.
    case synthLayers = "synth-layers", experts, families, topK = "top-k", dimensions, noise, tokens
}
