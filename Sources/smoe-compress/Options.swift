import ArgumentParser
import Foundation
import SMoECompress

/// Options every command shares.
struct GlobalOptions: ParsableArguments {
    @Flag(help: "Print the result as one JSON document on stdout.")
    var json = false

    @Flag(help: "No progress display on stderr.")
    var quiet = false

    /// Progress on stderr, only when it is a terminal and not --quiet. Interactive runs also
    /// get the OpenBLAS kernel hint below, once.
    var progress: Progress {
        let enabled = !quiet && isatty(2) != 0
        if enabled { _ = openBLASKernelNote }
        return Progress(enabled: enabled)
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

/// Options of commands that write a checkpoint.
struct OutputOptions: ParsableArguments {
    @Option(name: [.customShort("o"), .long], help: "Output file (written to a temporary file, renamed on success).")
    var output: String

    @Option(help: "Stored float type of weights: f32, f16, bf16, or auto (the input's experts' type when it is float16 or bfloat16, else f32).")
    var dtype: String = "auto"

    @Option(help: "gzip level (0-9, with the shuffle filter) for dense expert weight matrices (not factors or biases); off by default.")
    var gzip: Int?

    func validate() throws {
        guard ["f32", "f16", "bf16", "auto"].contains(dtype) else { throw ValidationError("--dtype must be f32, f16, bf16 or auto, not '\(dtype)'") }
        if let g = gzip, !(0...9).contains(g) { throw ValidationError("--gzip must be in 0...9") }
    }

    /// Write options for an output derived from `source` (auto keeps float16 as float16).
    func writeOptions(for source: CheckpointReader?) -> WriteOptions {
        let t: StorageType
        switch dtype {
        case "f16": t = .f16
        case "bf16": t = .bf16
        case "f32": t = .f32
        default:
            let s = try? source?.expertStorage()
            t = s == .f16 || s == .bf16 ? s! : .f32
        }
        return WriteOptions(dtype: t, gzip: gzip)
    }
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
}

/// Prints a JSON report.
func printJSON(_ v: JSONValue) { print(v.serialized(pretty: true)) }

/// A plain text table with right-aligned numeric columns.
struct Table {
    var header: [String]
    var rows: [[String]] = []

    init(_ header: [String]) { self.header = header }

    mutating func add(_ row: [String]) { rows.append(row) }

    func render() -> String {
        var widths = header.map(\.count)
        for r in rows { for (i, c) in r.enumerated() where i < widths.count { widths[i] = max(widths[i], c.count) } }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, c in
                let pad = String(repeating: " ", count: max(widths[i] - c.count, 0))
                return i == 0 ? c + pad : pad + c
            }.joined(separator: "  ")
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n")
    }
}

func formatBytes(_ b: Int) -> String {
    let d = Double(b)
    if b >= 1 << 30 { return String(format: "%.2f GiB", d / 1_073_741_824) }
    if b >= 1 << 20 { return String(format: "%.2f MiB", d / 1_048_576) }
    if b >= 1 << 10 { return String(format: "%.1f KiB", d / 1024) }
    return "\(b) B"
}

func sci(_ x: Double) -> String { String(format: "%.3e", x) }
func fixed(_ x: Double, _ digits: Int = 3) -> String { String(format: "%.\(digits)f", x) }

/// Runs `body`; a library error that names none of the input files is prefixed with `primary`,
/// so every error line says which file it is about.
func namingFile<T>(_ primary: String, inputs: [String] = [], _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let e as SMoEError {
        if ([primary] + inputs).contains(where: { e.message.contains($0) }) || e.message.hasPrefix("-") { throw e }
        throw SMoEError.file(primary, e.message)
    }
}
