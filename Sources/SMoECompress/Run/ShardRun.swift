import Foundation

// What a stage run adds to a shard file (docs/ARCHITECTURE.md, "Shards"): the header made from
// the stage, its settings record and its result. The file format itself is
// `Formats/ShardFile.swift`.

extension ShardHeader {
    /// The header of a finished shard run of `stage`.
    init<S: LayerStage>(kind: String, stage: S, shard: Shard, result: StageResult<S.Report>, model: CheckpointReader,
                        output: JSONValue) throws {
        self.kind = kind
        self.stage = stage.name
        self.shard = shard
        assigned = try model.shardLayers(shard)
        layers = result.layers.filter(\.computed).map(\.name)
        selection = stage.layers
        self.model = model.path
        modelFingerprint = try model.fingerprint()
        settings = JSONValue.object([("stage", .string(stage.name)), ("settings", stage.settingsRecord),
                                     ("layers", JSONValue(stage.layers)), ("output", output)]).serialized()
    }
}

extension CheckpointWriter {
    /// Records the run's history entry and the shard header, then commits.
    public func commit<S: LayerStage>(shard: Shard, of stage: S, result: StageResult<S.Report>, model: CheckpointReader) throws {
        updateEntry(result.history)
        let output = JSONValue.object([("dtype", .string(options.dtype.rawValue)),
                                       ("gzip", options.gzip.map(JSONValue.int) ?? .null)])
        try ShardHeader(kind: "smoe-checkpoint", stage: stage, shard: shard, result: result, model: model, output: output)
            .write(to: root)
        try commit()
    }
}

extension StatsWriter {
    /// Records the shard header, then commits.
    public func commit<S: LayerStage>(shard: Shard, of stage: S, result: StageResult<S.Report>, model: CheckpointReader) throws {
        try ShardHeader(kind: "smoe-stats", stage: stage, shard: shard, result: result, model: model, output: .null)
            .write(to: file.root)
        try commit()
    }
}
