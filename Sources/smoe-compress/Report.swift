import ArgumentParser
import Foundation
import SMoECompress

// The HTML report (issue 30): `--report FILE.html` on stats, merge, compress and eval, and the
// `report` command that draws one afterwards. The page is rendered from the same JSON document
// `--json` prints (`HTMLReport`), so the two never disagree.

/// `--report FILE.html`, shared by the commands that draw a report.
struct ReportOptions: ParsableArguments {
    @Option(help: "Also write a self-contained HTML report (inline SVG and CSS, no script; opens offline) of the run's figures to this file.")
    var report: String?

    /// Writes the report of `document` (the command's `--json` document) when asked for.
    func write(_ document: @autoclosure () -> JSONValue) throws {
        guard let path = report else { return }
        // Through its text, as `--json` prints it: the page shows exactly the printed values, and
        // `report` on the saved document draws the same bytes.
        try HTMLReport.write(HTMLReport.render(try JSONValue.parse(document().serialized())), to: path)
    }

    /// Checks, before any work, that the report names none of the inputs or other outputs.
    func check(against files: [String]) throws {
        guard let path = report else { return }
        try ensureOutputDiffers(path, from: files)
    }
}

struct Report: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Draw the HTML report of a run afterwards: from a saved --json document or a checkpoint's history.",
        discussion: """
            RUN.json is what stats, merge, compress or eval printed with --json; OUT.h5 is a checkpoint whose \
            history the report shows (groups, dominant experts, plan, ranks and errors as recorded; the usage \
            bars and similarity heat maps need the --json document or --report on the run itself).
            """)

    @Argument(help: "A saved --json document of stats, merge, compress or eval, or a checkpoint (smoe-h5).")
    var input: String

    @Option(name: [.customShort("o"), .long], help: "The HTML file to write (written to a temporary file, renamed on success).")
    var output: String

    func run() throws {
        try ensureOutputDiffers(output, from: [input])
        try requireRegularFile(input)
        let document: JSONValue
        if isHDF5(input) {
            let reader = try CheckpointReader(input)
            document = HTMLReport.historyDocument(checkpoint: input, history: reader.history)
        } else {
            guard let data = FileManager.default.contents(atPath: input) else { throw SMoEError.file(input, "cannot read") }
            let text = String(decoding: data, as: UTF8.self)
            do { document = try JSONValue.parse(text) } catch let e as SMoEError {
                throw SMoEError.file(input, "is neither an HDF5 checkpoint nor a --json document (\(e.message))")
            }
            guard case .object = document else { throw SMoEError.file(input, "is not a --json document of stats, merge, compress or eval (not a JSON object)") }
        }
        try HTMLReport.write(HTMLReport.render(document), to: output)
        print("wrote \(output)")
    }

    /// Whether the file starts with the HDF5 signature.
    func isHDF5(_ path: String) -> Bool {
        guard let h = FileHandle(forReadingAtPath: path) else { return false }
        defer { try? h.close() }
        let sig = h.readData(ofLength: 8)
        return sig == Data([0x89, 0x48, 0x44, 0x46, 0x0d, 0x0a, 0x1a, 0x0a])
    }
}
