import Foundation

/// Which calibration tokens a stage reads: blocks of `blockSize` tokens, at most `maxTokens`
/// per layer.
public struct TokenSettings: Sendable, Equatable {
    public static let defaultBlockSize = 4096
    public var blockSize: Int
    public var maxTokens: Int?

    public init(blockSize: Int = TokenSettings.defaultBlockSize, maxTokens: Int? = nil) {
        self.blockSize = blockSize
        self.maxTokens = maxTokens
    }

    public func validate() throws {
        guard blockSize >= 1 else { throw SMoEError.setting(.blockSize, "must be at least 1, not \(blockSize)") }
        if let m = maxTokens, m < 1 { throw SMoEError.setting(.maxTokens, "must be at least 1, not \(m)") }
    }
}

extension TokenSettings {
    var record: JSONValue {
        .object([("block_size", .int(blockSize)), ("max_tokens", maxTokens.map(JSONValue.int) ?? .null)])
    }
}

/// A source of calibration token blocks: calls its argument once per block [n, d_model].
public typealias TokenBlocks = ((Matrix) throws -> Void) throws -> Void

/// Token blocks paired with the outputs a refit should reproduce for them: calls its argument
/// once per block with x [n, d_model] and y [n, d_model].
public typealias TargetBlocks = ((Matrix, Matrix) throws -> Void) throws -> Void

extension CalibrationReader {
    /// The layer's tokens as a `TokenBlocks` source.
    public func tokenBlocks(_ layer: String, _ tokens: TokenSettings = TokenSettings()) -> TokenBlocks {
        { body in try self.forEachBlock(layer, blockSize: tokens.blockSize, maxTokens: tokens.maxTokens) { _, x in try body(x) } }
    }

    /// The layer's tokens with their captured `output` rows, as `TargetBlocks`.
    public func targetBlocks(_ layer: String, _ tokens: TokenSettings = TokenSettings()) -> TargetBlocks {
        { body in
            try self.forEachBlock(layer, blockSize: tokens.blockSize, maxTokens: tokens.maxTokens) { start, x in
                try body(x, try self.output(layer, rows: start..<(start + x.rows)))
            }
        }
    }
}
