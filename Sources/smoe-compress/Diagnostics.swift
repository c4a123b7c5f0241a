import Foundation
import SMoECompress

// What the command line says on stderr: errors, warnings, notes and progress.

/// The flag that sets each library setting; every library error about a setting is printed
/// with it.
func flag(for setting: Setting) -> String {
    switch setting {
    case .layers, .synthLayers: return "--layers"
    case .maxTokens: return "--max-tokens"
    case .blockSize: return "--block-size"
    case .calibration: return "--calib"
    case .stats: return "--stats"
    case .groups: return "--groups"
    case .adaptive: return "--adaptive"
    case .grouping: return "--method"
    case .similarity: return "--similarity"
    case .mergeMethod: return "--merge-method"
    case .regmeanAlpha: return "--regmean-alpha"
    case .regmeanRidge: return "--regmean-ridge"
    case .refitRidge: return "--refit-ridge"
    case .router: return "--router"
    case .compactRefit: return "--compact-refit"
    case .prune: return "--prune"
    case .refitTargets: return "--refit-targets"
    case .regmeanMinTokens: return "--regmean-min-tokens"
    case .family: return "--family"
    case .keepFP8: return "--keep-fp8"
    case .rank: return "--rank"
    case .energy: return "--energy"
    case .sparsity: return "--sparsity"
    case .iterations: return "--iterations"
    case .matrices: return "--matrices"
    case .svd: return "--svd"
    case .activationAware: return "--activation-aware"
    case .lowrankObjective: return "--lowrank-objective"
    case .whiteningRidge: return "--whitening-ridge"
    case .targetSize: return "--target-size"
    case .maxMemory: return "--max-memory"
    case .uniformGroups: return "--uniform-groups"
    case .fp8: return "--fp8"
    case .reference: return "--reference"
    case .storage: return "--dtype"
    case .gzip: return "--gzip"
    case .maxShardSize: return "--max-shard-size"
    case .shard: return "--shard"
    case .shards: return "--shards"
    case .allowPartial: return "--allow-partial"
    case .experts: return "--experts"
    case .families: return "--families"
    case .topK: return "--top-k"
    case .dimensions: return "--d-model/--d-ff"
    case .synthRouting: return "--router-type/--expert-groups/--topk-groups/--routed-scaling-factor"
    case .noise: return "--noise"
    case .tokens: return "--tokens"
    }
}

/// The `error:` line of a library error, settings named by their flags.
func errorLine(_ e: SMoEError) -> String { "error: " + e.rendered(naming: flag(for:)) }

func printWarning(_ text: String) { FileHandle.standardError.write(Data("warning: \(text)\n".utf8)) }

/// Runs `body`; a library error that names none of the input files, nor a file inside one (nor
/// a setting), is prefixed with `primary`, so every error line says which file it is about.
func namingFile<T>(_ primary: String, inputs: [String] = [], _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let e as SMoEError {
        throw e.naming(file: primary, unlessItNames: inputs)
    }
}

/// Says once per process, in interactive runs, which kernels OpenBLAS was asked for.
let openBLASKernelNote: Void = {
    guard let core = ProcessInfo.processInfo.environment[BLAS.coreChosenVariable] else { return }
    FileHandle.standardError.write(Data(("note: this OpenBLAS does not know this CPU; using its \(core) kernels "
        + "(OPENBLAS_CORETYPE=\(core); set OPENBLAS_CORETYPE yourself to choose, Prescott for the generic ones)\n").utf8))
}()

/// Progress on stderr: on a terminal, one line redrawn in place (a bar, and after each layer
/// the time left); elsewhere (batch logs), one line per finished layer with elapsed time and
/// the estimated time left. Nothing with --quiet.
struct Progress {
    /// Redrawn display on a terminal.
    let enabled: Bool
    /// One line per finished layer (stderr is not a terminal).
    var perLayerLines = false

    func update(_ label: String, _ done: Int, _ total: Int) {
        guard enabled else { return }
        let width = 24
        let filled = total > 0 ? width * done / total : width
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        FileHandle.standardError.write(Data("\r\u{1B}[K\(label) [\(bar)] \(done)/\(total)".utf8))
    }

    func finish() {
        guard enabled else { return }
        FileHandle.standardError.write(Data("\r\u{1B}[K".utf8))
    }

    /// The library's progress callback.
    var callback: ProgressCallback? {
        guard enabled else { return nil }
        return { label, done, total in self.update(label, done, total) }
    }

    /// A stage run's progress: steps within a layer, and each finished layer.
    var stage: StageProgress {
        StageProgress(step: callback) { done in
            guard done.computed, !done.reused, enabled || perLayerLines else { return }
            let left = done.estimatedSecondsLeft.map { ", about \(duration($0)) left" } ?? ""
            let line = "\(done.stage): layer \(done.computedSoFar)/\(done.computedTotal) \(done.name) done in \(duration(done.seconds))"
                + " (elapsed \(duration(done.elapsed))\(left), peak memory \(formatBytes(done.peakRSSBytes)))"
            FileHandle.standardError.write(Data((enabled ? "\r\u{1B}[K" + line + "\n" : line + "\n").utf8))
        }
    }
}

/// 75 s → "1 min 15 s"; 3.2 s → "3.2 s".
func duration(_ s: Double) -> String {
    if s < 60 { return String(format: "%.1f s", s) }
    let t = Int(s.rounded())
    return t < 3600 ? "\(t / 60) min \(t % 60) s" : "\(t / 3600) h \(t % 3600 / 60) min"
}
