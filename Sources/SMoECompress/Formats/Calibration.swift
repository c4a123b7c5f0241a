import Foundation

/// One MoE layer's capture in a calibration file.
public struct CalibrationLayerInfo: Sendable {
    public var name: String
    public var index: Int
    public var numTokens: Int
    public var dModel: Int
    public var hasRouterLogits: Bool
    public var hasOutput: Bool
}

extension CalibrationLayerInfo: LayerFileRecord {
    /// The capture has the model layer's d_model and holds tokens.
    public func check(against c: LayerConfig, file: String) throws {
        let problem = dModel != c.dModel ? "d_model \(dModel) does not match the model's \(c.dModel)" : numTokens > 0 ? nil : "holds no tokens"
        if let problem { throw SMoEError.dataset(file, "/moe_layers/\(name)/hidden_states", problem) }
    }
}

/// Reads an smoe-calibration file (FORMAT.md §2) in blocks of tokens.
public final class CalibrationReader: LayerFileReader<CalibrationLayerInfo>, @unchecked Sendable {
    public init(_ path: String) throws {
        try super.init(path, expecting: "smoe-calibration", kind: "calibration file", missing: "no capture for this MoE layer", record: { name, lg in
            let hs = try lg.openDataset("hidden_states")
            guard hs.shape.count == 2 else {
                throw SMoEError.dataset(path, hs.path, "shape \(hs.shape) is not [N, d_model]")
            }
            let n = hs.shape[0], d = hs.shape[1]
            var hasLogits = false, hasOut = false
            if lg.isDataset("router_logits") {
                let rl = try lg.openDataset("router_logits")
                guard rl.shape.count == 2, rl.shape[0] == n else {
                    throw SMoEError.dataset(path, rl.path, "shape \(rl.shape) does not match \(n) tokens")
                }
                hasLogits = true
            }
            if lg.isDataset("output") {
                let o = try lg.openDataset("output")
                guard o.shape == [n, d] else { throw SMoEError.dataset(path, o.path, "shape \(o.shape) is not [\(n), \(d)]") }
                hasOut = true
            }
            return { CalibrationLayerInfo(name: name, index: $0, numTokens: n, dModel: d, hasRouterLogits: hasLogits, hasOutput: hasOut) }
        })
    }

    private func read(_ layer: String, _ dataset: String, _ rows: Range<Int>?) throws -> Matrix {
        let d = try file.root.openDataset("moe_layers/\(layer)/\(dataset)")
        let v = try d.readFloats(rows: rows)
        if let i = v.firstIndex(where: { !$0.isFinite }) {
            throw SMoEError.dataset(path, d.path, "contains NaN or Inf at flat index \(i)")
        }
        let n = rows?.count ?? d.shape[0]
        return Matrix(rows: n, cols: d.shape[1], data: v)
    }

    /// Rows `rows` (all when nil) of the layer's inputs, [n, d_model].
    public func hiddenStates(_ layer: String, rows: Range<Int>? = nil) throws -> Matrix {
        try read(layer, "hidden_states", rows)
    }

    public func routerLogits(_ layer: String, rows: Range<Int>? = nil) throws -> Matrix {
        try read(layer, "router_logits", rows)
    }

    public func output(_ layer: String, rows: Range<Int>? = nil) throws -> Matrix {
        try read(layer, "output", rows)
    }

    /// Visits the layer's hidden states in blocks of at most `blockSize` tokens (memory
    /// bounded by the block, not by N), up to `maxTokens` tokens.
    public func forEachBlock(_ layer: String, blockSize: Int = 4096, maxTokens: Int? = nil,
                             _ body: (_ start: Int, _ x: Matrix) throws -> Void) throws {
        let n = min(try info(layer).numTokens, maxTokens ?? Int.max)
        var s = 0
        while s < n {
            let e = min(s + blockSize, n)
            try body(s, try hiddenStates(layer, rows: s..<e))
            s = e
        }
    }
}

/// Writes an smoe-calibration file (temporary file renamed on `commit()`).
public final class CalibrationWriter: LayerFileWriter, @unchecked Sendable {
    public init(destination: String, source: String) throws {
        try super.init(destination: destination, format: "smoe-calibration", source: source)
    }

    @discardableResult
    public func write(layer name: String, index: Int, hiddenStates: Matrix, routerLogits: Matrix? = nil,
                      output out: Matrix? = nil, dtype: StorageType = .f32) throws -> H5Group {
        let g = try layersGroup.createGroup(name)
        try g.setAttribute("index", index)
        try g.write("hidden_states", floats: hiddenStates.data, shape: [hiddenStates.rows, hiddenStates.cols], as: dtype)
        if let z = routerLogits { try g.write("router_logits", floats: z.data, shape: [z.rows, z.cols]) }
        if let y = out { try g.write("output", floats: y.data, shape: [y.rows, y.cols]) }
        return g
    }
}
