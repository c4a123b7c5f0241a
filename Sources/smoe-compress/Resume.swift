import ArgumentParser
import Foundation
import SMoECompress

/// `--resume` of `merge`, `lowrank` and `compress`: every run keeps each layer it finishes in
/// `<output>.resume/` (removed once the output is written); after an interruption the same
/// command with `--resume` reuses those layers when the inputs, every setting and the tool
/// version match, and otherwise says what differs and starts over (docs/FORMAT.md §6).
struct ResumeOptions: ParsableArguments {
    @Flag(help: "Continue an interrupted run of this same command: reuse the layers it finished (kept in OUTPUT.resume/) when the inputs, every setting and the tool version match; otherwise say what differs and start over.")
    var resume = false

    /// Opens the work directory of a run of `stage` writing `output` (after the stage was made,
    /// so bad settings leave nothing behind) and says on stderr what it found.
    func open<S: LayerStage>(_ stage: S, model: CheckpointReader, inputs: [ResumeInput], writer: CheckpointWriter,
                             output: OutputOptions) throws -> ResumeWork {
        let work = try ResumeWork(output: output.path, stage: stage, model: model,
                                  inputs: [ResumeInput(role: "model", path: model.path)] + inputs,
                                  options: writer.options, shard: try output.shardValue(), resume: resume)
        let dir = work.directory
        switch work.start {
        case .fresh: break
        case .replacedLeftover(let n):
            printNote("removed \(dir): \(n) finished layer\(n == 1 ? "" : "s") of an interrupted run (the same command with --resume would have reused \(n == 1 ? "it" : "them"))")
        case .nothingToResume:
            printNote("--resume: no finished layers of an interrupted run in \(dir); running from the start")
        case .startedOver(let reason):
            printNote("--resume: starting over, the interrupted run in \(dir) differs: \(reason)")
        case .resuming(let layers):
            printNote("--resume: reusing \(layers.count) finished layer\(layers.count == 1 ? "" : "s") from \(dir)")
        }
        return work
    }
}

extension ResumeWork {
    /// The per-layer loop's hook for a run writing into `writer` (`hook(into:)`). For tests,
    /// `SMOE_KILL_AFTER_SAVED_LAYERS=N` makes the process kill itself (SIGKILL, as the
    /// out-of-memory killer would) right after saving its N-th finished layer: an interruption at
    /// a known point.
    func stageHook(into writer: CheckpointWriter) -> LayerResume<MoELayer> {
        var hook = hook(into: writer)
        guard let n = ProcessInfo.processInfo.environment["SMOE_KILL_AFTER_SAVED_LAYERS"].flatMap(Int.init), n > 0 else { return hook }
        let save = hook.save
        var saved = 0
        hook.save = { name, layer, entry in
            try save(name, layer, entry)
            saved += 1
            if saved == n { kill(getpid(), SIGKILL) }
        }
        return hook
    }

    /// The run path of every resumable command (`runStage`): `stage` over `model` into `writer`
    /// (each finished layer also handed to `written`), resuming what this work directory holds,
    /// errors naming `path` or one of `inputs`; then the output's commit (`running`).
    func run<S: LayerStage>(_ stage: S, model: CheckpointReader, path: String, inputs: [String], shard: Shard?,
                            writer: CheckpointWriter, progress: Progress,
                            written: (MoELayer) -> Void = { _ in }) throws -> StageResult<S.Report> where S.Output == MoELayer {
        try running(writer) {
            try runStage(stage, model: model, path: path, inputs: inputs, shard: shard, into: writer, progress: progress,
                         resume: stageHook(into: writer), written: written)
        }
    }

    /// Runs `body` (the stage run and the output's commit); then removes the work directory. When
    /// `body` fails writing (an `.output` error: about the output, its temporary file or the work
    /// directory: a full disk, a lost mount), the finished layers are kept, as after a kill, and it says so;
    /// any other failure (bad data, a layer that overflows) would recur on a resume, so nothing
    /// is left behind.
    func running<T>(_ writer: CheckpointWriter, _ body: () throws -> T) throws -> T {
        let value: T
        do {
            value = try body()
        } catch {
            let kept = close(keeping: (error as? SMoEError)?.kind == .output)
            if kept > 0 {
                printNote("kept \(kept) finished layer\(kept == 1 ? "" : "s") in \(directory): the same command with --resume continues from them")
            }
            throw error
        }
        finish()
        return value
    }
}

/// Reports (and removes, when their process is gone) temporary files an earlier run left for
/// `output`: a run killed by SIGKILL, power loss or the out-of-memory killer cannot remove its own.
func reportLeftoverTemporaryFiles(_ output: String) {
    for f in AtomicOutput.leftovers(of: output) {
        if f.running {
            printNote("\(f.path) is being written by a running smoe-compress (pid \(f.pid)); left alone")
        } else {
            printNote("removed \(f.path), left by an interrupted run (pid \(f.pid), no longer running)")
        }
    }
}

/// The expert bytes of `layers` as stored, in the model and in the committed output `written`
/// (the figures of layers this run did not compute, such as those reused from an interrupted run).
func expertFileBytes(of layers: [String], original: CheckpointReader, written path: String) throws -> (before: Int, after: Int) {
    let written = try CheckpointReader(path)
    return try layers.reduce((0, 0)) { t, name in
        (t.0 + (try original.summary(name).expertFileBytes), t.1 + (try written.summary(name).expertFileBytes))
    }
}

func printNote(_ text: String) { FileHandle.standardError.write(Data("note: \(text)\n".utf8)) }

/// The line (table mode) or JSON key (`--json`) a command adds for layers reused from an
/// interrupted run: their figures were printed by that run, not this one.
func reusedLine(_ reused: [String], work: ResumeWork?) -> String? {
    guard !reused.isEmpty else { return nil }
    return "reused \(reused.count) finished layer\(reused.count == 1 ? "" : "s") from \(work?.directory ?? "the work directory") (computed by the interrupted run; not in the figures above): \(reused.joined(separator: ", "))"
}

func reusedJSON(_ reused: [String], work: ResumeWork?) -> [(String, JSONValue)] {
    guard !reused.isEmpty else { return [] }
    return [("reused", .object([("work_dir", .string(work?.directory ?? "")), ("layers", JSONValue(reused))]))]
}
