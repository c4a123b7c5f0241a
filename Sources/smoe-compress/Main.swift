import ArgumentParser
import Foundation
import SMoECompress

@main
struct SMoECompressCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "smoe-compress",
        abstract: "Compress sparse Mixture-of-Experts checkpoints offline (MC-SMoE: merge, then compress).",
        version: smoeCompressVersion,
        subcommands: [
            Inspect.self, Synth.self, Import.self, Stats.self, Align.self, Merge.self, Lowrank.self,
            Compress.self, Expand.self, Eval.self, Export.self, Plan.self, Assemble.self, Report.self,
        ])

    /// Runs the command line; library errors become one `error:` line and exit status 1.
    static func main() {
        BLAS.chooseCore()
        let args = CommandLine.arguments
        if args.count == 3, args[1] == checkInputCommand { runInputCheckChild(args[2]) }
        installSignalHandlers()
        if ProcessInfo.processInfo.environment["SMOE_INPUT_CHECK"] != "off" { HDF5InputCheck.isolatedRunner = runInputCheckIsolated }
        do {
            var command = try parseAsRoot(joiningNegativeValues(Array(args.dropFirst())))
            try command.run()
        } catch let e as SMoEError {
            FileHandle.standardError.write(Data((errorLine(e) + "\n").utf8))
            Foundation.exit(1)
        } catch {
            // Help and --version exit normally; usage errors become one `error:` line too.
            if exitCode(for: error) == .success { exit(withError: error) }
            // ArgumentParser lists a long choice of values one per line ("- auto"): one line, comma-separated.
            let lines = message(for: error).split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }
            let choices = lines.dropFirst().filter { $0.hasPrefix("- ") }.map { String($0.dropFirst(2)) }
            let text = lines.first.map { choices.isEmpty ? $0 : $0 + " " + choices.joined(separator: ", ") } ?? "\(error)"
            FileHandle.standardError.write(Data("error: \(text)\n".utf8))
            Foundation.exit(exitCode(for: error).rawValue == 0 ? 1 : exitCode(for: error).rawValue)
        }
    }
}

/// `--rank -1` → `--rank=-1`: ArgumentParser reads a value that starts with `-` as another
/// option ("Missing value for '--rank'"), which hides the real mistake; joined, the option's own
/// validation names it ("--rank must be ≥ 1"). Only a number right after a long option is joined.
func joiningNegativeValues(_ args: [String]) -> [String] {
    var out: [String] = []
    var i = 0
    while i < args.count {
        let a = args[i]
        if a == "--" { out += args[i...]; break }
        if a.hasPrefix("--"), !a.contains("="), i + 1 < args.count,
           args[i + 1].hasPrefix("-"), Double(args[i + 1]) != nil {
            out.append(a + "=" + args[i + 1])
            i += 2
            continue
        }
        out.append(a)
        i += 1
    }
    return out
}
