import ArgumentParser
import Foundation
import SMoECompress

/// Options shared by `lowrank` and `compress`. `rank` is optional here; `lowrank` requires one
/// of --rank and --energy.
struct LowRankOptionGroup: ParsableArguments {
    @Option(help: "Rank of every factored matrix (U [out, r], V [r, in]).")
    var rank: Int?

    @Option(help: "Per-matrix rank: the smallest keeping this fraction (0, 1] of the squared singular values.")
    var energy: Double?

    @Option(help: "Fraction [0, 1] of each matrix's entries kept in the sparse residual S.")
    var sparsity: Double = 0

    @Option(help: "Sparse residual structure: unstructured (largest entries) or row (whole rows).")
    var sparseStructure: String = "unstructured"

    @Option(help: "Alternating refinements of U·V and S (the best iterate is kept).")
    var iterations: Int = 0

    @Option(help: "Comma-separated matrices to factor: up, gate, down.")
    var matrices: String = "up,gate,down"

    @Option(help: "SVD: auto (randomized when rank + 10 ≤ min(out, in)/4), exact or randomized.")
    var svd: String = "auto"

    @Option(help: "Seed of the randomized SVD.")
    var seed: UInt64 = 0

    var matrixNames: [String] { matrices.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) } }

    func validate() throws {
        if let r = rank, r < 1 { throw ValidationError("--rank must be at least 1 (got \(r))") }
        if let f = energy, !(f > 0 && f <= 1) { throw ValidationError("--energy must be in (0, 1] (got \(f))") }
        if rank != nil && energy != nil { throw ValidationError("--rank and --energy exclude each other") }
        guard sparsity >= 0 && sparsity <= 1 else { throw ValidationError("--sparsity must be in [0, 1] (got \(sparsity))") }
        guard SparseStructure(rawValue: sparseStructure) != nil else {
            throw ValidationError("--sparse-structure must be unstructured or row, not '\(sparseStructure)'")
        }
        guard iterations >= 0 else { throw ValidationError("--iterations must be at least 0") }
        guard !matrixNames.isEmpty, matrixNames.allSatisfy({ ExpertMatrixName(rawValue: $0) != nil }) else {
            throw ValidationError("--matrices must list up, gate and/or down, not '\(matrices)'")
        }
        guard SVDMethod(rawValue: svd) != nil else { throw ValidationError("--svd must be auto, exact or randomized, not '\(svd)'") }
    }

    /// Library options (call after validation); `floatBytes` is the output float width.
    func options(floatBytes: Int) -> LowRankOptions {
        LowRankOptions(rank: rank, energy: energy, sparsity: sparsity, structure: SparseStructure(rawValue: sparseStructure)!,
                       iterations: iterations, matrices: Set(matrixNames.compactMap(ExpertMatrixName.init(rawValue:))),
                       svd: SVDMethod(rawValue: svd)!, seed: seed, floatBytes: floatBytes)
    }
}

struct Lowrank: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lowrank",
        abstract: "Factor every stored expert matrix as low rank plus sparse: W ≈ U·V + S.")

    @Argument(help: "The checkpoint to compress.") var model: String
    @Option(help: "Calibration capture: rank sparse entries by |S_ij|·‖X_j‖ over each expert's routed tokens.") var calib: String?
    @Option(help: "Comma-separated MoE layers to factor (default: all); others are copied unchanged.") var layers: String?
    @Option(help: "Use at most this many calibration tokens per layer.") var maxTokens: Int?
    @Option(help: "Calibration tokens per block (memory does not grow with N).") var blockSize: Int = 4096
    @OptionGroup var lowrank: LowRankOptionGroup
    @OptionGroup var output: OutputOptions
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        if lowrank.rank == nil && lowrank.energy == nil { throw ValidationError("give one of --rank and --energy") }
        if let m = maxTokens, m < 1 { throw ValidationError("--max-tokens must be at least 1") }
        guard blockSize >= 1 else { throw ValidationError("--block-size must be at least 1") }
    }

    func run() throws {
        try ensureOutputDiffers(output.output, from: [model] + [calib].compactMap { $0 })
        let reader = try CheckpointReader(model)
        let calibration = try calib.map { try CalibrationReader($0) }
        let writeOptions = output.writeOptions(for: reader)
        let options = lowrank.options(floatBytes: writeOptions.dtype.byteSize)
        let names = layers.map { $0.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) } }
        let writer = try CheckpointWriter(destination: output.output, derivedFrom: reader, entry: ["stage": "lowrank"],
                                          options: writeOptions)
        let progress = global.progress
        var fileBefore = 0, fileAfter = 0
        let reports = try namingFile(model, inputs: [calib].compactMap { $0 }) {
            try LowRankStage.run(model: reader, calibration: calibration, options: options, layers: names, blockSize: blockSize,
                                 maxTokens: maxTokens, progress: progress.callback) { original, result, _ in
                try writer.write(result)
                fileBefore += try reader.summary(original.name).expertFileBytes
            }
        }
        progress.finish()
        writer.updateEntry(LowRankStage.historyEntry(options, calibration: calib, reports: reports))
        try writer.commit()
        let written = try CheckpointReader(output.output)
        for c in written.layers { fileAfter += try written.summary(c.name).expertFileBytes }
        let before = reports.reduce(0) { $0 + $1.bytesBefore }, after = reports.reduce(0) { $0 + $1.bytesAfter }
        let kept = reports.reduce(0) { $0 + $1.matrices.filter(\.keptDense).count }
        let count = reports.reduce(0) { $0 + $1.matrices.count }
        if global.json {
            return printJSON(.object([
                ("output", .string(output.output)), ("activation_aware", .bool(calib != nil)),
                ("layers", .array(reports.map(\.json))), ("matrix_bytes_before", .int(before)), ("matrix_bytes_after", .int(after)),
                ("kept_dense", .int(kept)), ("expert_bytes_before", .int(fileBefore)), ("expert_bytes_after", .int(fileAfter)),
            ]))
        }
        for r in reports {
            var t = Table(["expert", "matrix", "shape", "rank", "nnz", "rel error", "bytes before", "bytes after", "svd", "note"])
            for m in r.matrices {
                t.add(["\(m.expert)", m.matrix, "\(m.rows)x\(m.cols)", "\(m.rank)", "\(m.nnz)", sci(m.relativeError),
                       formatBytes(m.bytesBefore), formatBytes(m.bytesAfter), m.svd, m.keptDense ? "kept dense" : ""])
            }
            print("\(r.name):")
            print(t.render().split(separator: "\n").map { "  " + $0 }.joined(separator: "\n"))
            print("  layer: \(formatBytes(r.bytesBefore)) → \(formatBytes(r.bytesAfter)) (\(ratio(r.bytesBefore, r.bytesAfter))), relative error mean \(sci(r.meanRelativeError)), max \(sci(r.maxRelativeError))")
        }
        print("matrices: \(count - kept) of \(count) factored\(kept > 0 ? ", \(kept) kept dense (factored form not smaller)" : ""), \(formatBytes(before)) → \(formatBytes(after)) (\(ratio(before, after)))\(calib != nil ? ", activation-aware sparse ranking" : "")")
        print("wrote \(output.output): expert bytes \(formatBytes(fileBefore)) → \(formatBytes(fileAfter)) (\(ratio(fileBefore, fileAfter)))")
    }
}

func ratio(_ a: Int, _ b: Int) -> String { String(format: "%.2f×", Double(a) / Double(max(b, 1))) }
