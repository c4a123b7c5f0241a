import Foundation
import SMoECompress

// What the command line prints on stdout: JSON documents, tables and number formats.

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
func ratio(_ a: Int, _ b: Int) -> String { String(format: "%.2f×", Double(a) / Double(max(b, 1))) }

/// 1234567 → "1.23M".
func compactCount(_ n: Int) -> String {
    let d = Double(n)
    if n >= 1_000_000_000 { return String(format: "%.2fG", d / 1e9) }
    if n >= 1_000_000 { return String(format: "%.2fM", d / 1e6) }
    if n >= 10_000 { return String(format: "%.1fk", d / 1e3) }
    return "\(n)"
}

/// The `timing` member of a stage command's JSON: per layer, wall seconds and the process's
/// peak resident memory so far.
func timingJSON(_ layers: [FinishedLayer]) -> (String, JSONValue) { ("timing", .array(layers.map(\.json))) }
