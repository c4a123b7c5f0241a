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
    case .reference: return "--reference"
    case .storage: return "--dtype"
    case .maxShardSize: return "--max-shard-size"
    case .experts: return "--experts"
    case .families: return "--families"
    case .topK: return "--top-k"
    case .dimensions: return "--d-model/--d-ff"
    case .noise: return "--noise"
    case .tokens: return "--tokens"
    }
}

/// The `error:` line of a library error, settings named by their flags.
func errorLine(_ e: SMoEError) -> String { "error: " + e.rendered(naming: flag(for:)) }

func printWarning(_ text: String) { FileHandle.standardError.write(Data("warning: \(text)\n".utf8)) }

/// Runs `body`; a library error that names none of the input files (nor a setting) is prefixed
/// with `primary`, so every error line says which file it is about.
func namingFile<T>(_ primary: String, inputs: [String] = [], _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let e as SMoEError {
        throw e.naming(primary, unlessItNames: inputs)
    }
}

/// Prints the OpenBLAS kernel hint at most once per process (a global is initialised once).
let openBLASKernelNote: Void = {
    if let hint = openBLASKernelHint() { FileHandle.standardError.write(Data("note: \(hint)\n".utf8)) }
}()

/// A hint when OpenBLAS runs its generic "Prescott" kernels on a CPU with AVX2 (an OpenBLAS
/// older than the CPU does that) and OPENBLAS_CORETYPE is not set: products are then ~3× slower
/// than they need be (README, "Check which kernels OpenBLAS picked").
func openBLASKernelHint() -> String? {
    guard ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"] == nil, BLAS.coreName == "Prescott",
          let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
          let flags = info.split(separator: "\n").first(where: { $0.hasPrefix("flags") })?.split(separator: " ")
    else { return nil }
    let core = flags.contains("avx512f") ? "SkylakeX" : flags.contains("avx2") ? "Haswell" : nil
    return core.map { "OpenBLAS uses its generic Prescott kernels on this \(flags.contains("avx512f") ? "AVX-512" : "AVX2") CPU; "
        + "OPENBLAS_CORETYPE=\($0) makes matrix products several times faster" }
}

/// A one-line progress display on stderr.
struct Progress {
    let enabled: Bool

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

    /// A stage run's progress: steps within a layer.
    var stage: StageProgress { StageProgress(step: callback) }
}
