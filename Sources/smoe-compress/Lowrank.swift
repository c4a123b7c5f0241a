import ArgumentParser
import Foundation
import SMoECompress

/// Options shared by `lowrank` and `compress`: --rank or --energy give the rank rule (compress
/// without either merges only).
struct LowRankOptionGroup: ParsableArguments {
    @Option(help: "Rank of every factored matrix (U [out, r], V [r, in]).")
    var rank: Int?

    @Option(help: "Per-matrix rank: the smallest keeping this fraction (0, 1] of the squared singular values.")
    var energy: Double?

    @Option(help: "Fraction [0, 1] of each matrix's entries kept in the sparse residual S.")
    var sparsity: Double = 0

    @Option(help: "Sparse residual structure: unstructured (largest entries) or row (whole rows).")
    var sparseStructure: SparseStructure = .unstructured

    @Option(help: "Alternating refinements of U·V and S (the best iterate is kept).")
    var iterations: Int = 0

    @Option(help: "Comma-separated matrices to factor: up, gate, down.")
    var matrices: CommaList = CommaList(argument: "up,gate,down")!

    @Option(help: "SVD: auto (randomized when rank + 10 ≤ min(out, in)/4, else the checked Gram eigendecomposition when min(out, in) ≥ 1024, else exact), exact, randomized or gram.")
    var svd: SVDMethod = .auto

    @Option(help: "Seed of the randomized SVD.")
    var seed: UInt64 = 0

    @Option(help: "What U·V minimises: output (‖ΔW·X‖ on the calibration tokens, whitened SVD; the default with tokens) or weight (‖ΔW‖, plain SVD).")
    var lowrankObjective: LowRankObjective?

    @Option(help: "Whitening ridge, relative to the mean diagonal of the input Gram (default 0.01).")
    var whiteningRidge: Double = Whitening.defaultRelativeRidge

    func validate() throws {
        if rank != nil && energy != nil { throw ValidationError("--rank and --energy exclude each other") }
        for m in matrices.items where ExpertMatrixName(rawValue: m) == nil {
            throw ValidationError("--matrices must list up, gate and/or down, not '\(m)'")
        }
    }

    /// The rank rule, when --rank or --energy is given.
    var rule: RankRule? { rank.map(RankRule.fixed) ?? energy.map(RankRule.energy) }

    /// Library options, when a rank rule is given (or `rule` is); `floatBytes` is the output float width.
    func options(floatBytes: Int, rule: RankRule? = nil) -> LowRankOptions? {
        (rule ?? self.rule).map {
            var o = LowRankOptions(rank: $0, sparsity: sparsity, structure: sparseStructure, iterations: iterations,
                                   matrices: Set(matrices.items.compactMap(ExpertMatrixName.init(rawValue:))), svd: svd, seed: seed,
                                   floatBytes: floatBytes, objective: lowrankObjective)
            o.whiteningRidge = whiteningRidge
            return o
        }
    }
}

struct Lowrank: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lowrank",
        abstract: "Factor every stored expert matrix as low rank plus sparse: W ≈ U·V + S.")

    @Argument(help: "The checkpoint to compress.") var model: String
    @Option(help: "Calibration capture: factor for the output error on each expert's routed tokens (whitened SVD; sparse entries ranked by |S_ij|·‖X_j‖).") var calib: String?
    @OptionGroup var layers: LayerOptions
    @OptionGroup var tokens: TokenOptions
    @OptionGroup var lowrank: LowRankOptionGroup
    @OptionGroup var output: OutputOptions
    @OptionGroup var resumeOptions: ResumeOptions
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        try output.requireOutput()
        if lowrank.rule == nil { throw ValidationError("give one of --rank and --energy") }
    }

    func run() throws {
        let inputs = [calib].compactMap { $0 }
        let reader = try CheckpointReader(model)
        let writer = try output.writer(from: reader, stage: "lowrank", inputs: inputs)
        let options = lowrank.options(floatBytes: output.writeOptions(for: reader).dtype.byteSize)!
        let progress = global.progress
        let shard = try output.shardValue()
        let stage = try namingFile(model, inputs: inputs) {
            try LowRankStage(model: reader, calibration: try calib.map(CalibrationReader.init), options: options,
                             tokens: try tokens.settings(options.memoryWork(hasTokens: calib != nil), model: reader, layers: layers.names), layers: layers.names)
        }
        let work = try resumeOptions.open(stage, model: reader, inputs: calib.map { [ResumeInput(role: "--calib", path: $0)] } ?? [],
                                          writer: writer, output: output)
        let result = try work.run(stage, model: reader, path: model, inputs: inputs, shard: shard, writer: writer,
                                  progress: progress)
        if shard != nil {
            // A shard file is no checkpoint: its computed layers' figures only.
            return render(result.reports, fileBefore: result.reports.reduce(0) { $0 + $1.bytesBefore },
                          fileAfter: result.reports.reduce(0) { $0 + $1.bytesAfter }, timing: result.layers,
                          reused: result.reused, work: work)
        }
        let (fileBefore, fileAfter) = try expertFileBytes(of: reader.layers.map(\.name), original: reader, written: output.path)
        render(result.reports, fileBefore: fileBefore, fileAfter: fileAfter, timing: result.layers, reused: result.reused, work: work)
    }

    func render(_ reports: [LayerLowRankReport], fileBefore: Int, fileAfter: Int, timing: [FinishedLayer],
                reused: [String] = [], work: ResumeWork? = nil) {
        let before = reports.reduce(0) { $0 + $1.bytesBefore }, after = reports.reduce(0) { $0 + $1.bytesAfter }
        let kept = reports.reduce(0) { $0 + $1.matrices.filter(\.keptDense).count }
        let count = reports.reduce(0) { $0 + $1.matrices.count }
        if global.json {
            return printJSON(.object([
                ("output", .string(output.path)), ("activation_aware", .bool(calib != nil)),
                ("layers", .array(reports.map(\.json))), ("matrix_bytes_before", .int(before)), ("matrix_bytes_after", .int(after)),
                ("kept_dense", .int(kept)), ("expert_bytes_before", .int(fileBefore)), ("expert_bytes_after", .int(fileAfter)),
                timingJSON(timing),
            ] + reusedJSON(reused, work: work)))
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
        let whitened = reports.contains { $0.matrices.contains(where: \.whitened) }
        let aware = calib != nil ? (whitened ? ", whitened for the output error" : ", activation-aware sparse ranking") : ""
        if let line = reusedLine(reused, work: work) { print(line) }
        print("matrices: \(count - kept) of \(count) factored\(kept > 0 ? ", \(kept) kept dense (factored form not smaller)" : ""), \(formatBytes(before)) → \(formatBytes(after)) (\(ratio(before, after)))\(aware)")
        print("wrote \(output.path): expert bytes \(formatBytes(fileBefore)) → \(formatBytes(fileAfter)) (\(ratio(fileBefore, fileAfter)))")
    }
}

extension LowRankObjective: ExpressibleByArgument {}
