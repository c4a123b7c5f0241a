import Foundation
import SMoECompress

// The one run path of every writing command (stats, align, merge, lowrank, compress, expand):
// open the inputs and the output, make the stage, then `runStage`: the stage over the model
// into the output's writer and the output's commit; then the command renders the report.
// Resumable commands (merge, lowrank, compress) run the same path inside their work directory
// (`ResumeWork.run`, Resume.swift).

/// The output of a writing command: a checkpoint (`CheckpointWriter`) or a statistics file
/// (`StatsWriter`), committed once the run is done.
protocol StageWriter {
    /// Records what the run adds to the file (its history entry; with `shard`, the shard
    /// header) and commits the output (its temporary file renamed).
    func commit<S: LayerStage>(_ stage: S, result: StageResult<S.Report>, model: CheckpointReader, shard: Shard?) throws
}

/// A stage's finished layer (`LayerStage.Output`) and the writer that stores it.
protocol StageOutputLayer {
    associatedtype Writer: StageWriter
    func write(to writer: Writer) throws
}

extension CheckpointWriter: StageWriter {
    func commit<S: LayerStage>(_ stage: S, result: StageResult<S.Report>, model: CheckpointReader, shard: Shard?) throws {
        if let shard { return try commit(shard: shard, of: stage, result: result, model: model) }
        updateEntry(result.history)
        try commit()
    }
}

extension StatsWriter: StageWriter {
    /// A statistics file keeps no history: only a shard file records its run (the header).
    func commit<S: LayerStage>(_ stage: S, result: StageResult<S.Report>, model: CheckpointReader, shard: Shard?) throws {
        if let shard { return try commit(shard: shard, of: stage, result: result, model: model) }
        try commit()
    }
}

extension MoELayer: StageOutputLayer {
    func write(to writer: CheckpointWriter) throws { try writer.write(self) }
}

extension LayerSource: StageOutputLayer {
    /// One expert at a time (`align`'s permuted source).
    func write(to writer: CheckpointWriter) throws { try writer.write(self) }
}

extension LayerStatistics: StageOutputLayer {
    func write(to writer: StatsWriter) throws { try writer.write(self) }
}

/// Runs `stage` over `model` (only `shard`'s layers, when given; reusing what `resume` holds)
/// into `writer`, each finished layer also handed to `written`, errors naming `path` unless
/// they name one of `inputs`; then commits the output.
func runStage<S: LayerStage, W: StageWriter>(_ stage: S, model: CheckpointReader, path: String, inputs: [String] = [],
                                             shard: Shard?, into writer: W, progress: Progress,
                                             resume: LayerResume<S.Output>? = nil,
                                             written: (S.Output) -> Void = { _ in }) throws -> StageResult<S.Report>
where S.Output: StageOutputLayer, S.Output.Writer == W {
    let result = try namingFile(path, inputs: inputs) {
        try stage.run(model: model, shard: shard, resume: resume, progress: progress.stage) { layer in
            try layer.write(to: writer)
            written(layer)
        }
    }
    progress.finish()
    try writer.commit(stage, result: result, model: model, shard: shard)
    return result
}
