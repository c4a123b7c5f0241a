/// The tool's version, printed by `smoe-compress --version` and recorded in `history`.
public let smoeCompressVersion = "0.1.0"

/// Progress reports from long stages: a label, units done, units in all.
public typealias ProgressCallback = @Sendable (String, Int, Int) -> Void
