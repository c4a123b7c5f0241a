import Foundation

// Inline SVG figures of the HTML report (`HTMLReport`): usage bars, similarity heat maps and
// byte bars. Plain text, no script; sizes grow with the number of experts, not of tokens.

enum SVG {
    /// Text safe inside HTML/SVG elements and attribute values.
    static func escape(_ s: String) -> String {
        var out = ""
        out.reserveCapacity(s.utf8.count)
        for c in s {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.append(c)
            }
        }
        return out
    }

    /// A number for SVG coordinates: integers plain, else two decimals.
    static func n(_ x: Double) -> String {
        x == x.rounded() && abs(x) < 1e12 ? String(Int(x)) : String(format: "%.2f", x)
    }

    /// The sequential palette of the heat maps, low to high (9 levels).
    static let palette = ["#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"]

    /// Usage bars: one bar per router slot (its share of the routing hits), unused slots marked
    /// with a red cross under the axis, `dominant` slots dark. `quantity` and `marked` name the
    /// bar's value and the dark slots in the tooltips (a pruning's saliency and kept experts).
    static func usageBars(_ frequency: [Double], counts: [Int]?, dominant: Set<Int>, quantity: String = "share",
                          marked: String = "dominant") -> String {
        let e = frequency.count
        guard e > 0 else { return "" }
        let barW = max(2.0, min(28.0, (640.0 / Double(e)).rounded(.down)))
        let gap = barW >= 6 ? 2.0 : 0.0
        let plotH = 90.0, top = 14.0, axisY = top + plotH
        let width = 40 + Double(e) * barW + 10, height = axisY + (e <= 64 ? 30 : 18)
        let peak = max(frequency.max() ?? 0, 1e-12)
        var s = "<svg class=\"usage\" xmlns=\"http://www.w3.org/2000/svg\" width=\"\(n(width))\" height=\"\(n(height))\" viewBox=\"0 0 \(n(width)) \(n(height))\" role=\"img\" aria-label=\"expert usage\">"
        s += "<text x=\"0\" y=\"10\" class=\"ax\">\(String(format: "%.3f", peak))</text>"
        s += "<line x1=\"38\" y1=\"\(n(axisY))\" x2=\"\(n(width - 6))\" y2=\"\(n(axisY))\" class=\"axis\"/>"
        for (i, f) in frequency.enumerated() {
            let h = plotH * f / peak
            let x = 40 + Double(i) * barW
            let tip = "expert \(i): \(quantity) \(String(format: "%.4f", f))" + (counts.map { ", \($0[i]) hits" } ?? "")
                + (dominant.contains(i) ? ", \(marked)" : "") + (f == 0 ? ", never chosen" : "")
            s += "<rect x=\"\(n(x))\" y=\"\(n(axisY - h))\" width=\"\(n(barW - gap))\" height=\"\(n(h))\" class=\"\(dominant.contains(i) ? "bar dom" : "bar")\"><title>\(escape(tip))</title></rect>"
            if f == 0 {
                s += "<text x=\"\(n(x + (barW - gap) / 2))\" y=\"\(n(axisY + 11))\" class=\"unused\" text-anchor=\"middle\">×<title>expert \(i) never chosen</title></text>"
            }
            if e <= 64 && (e <= 16 || i % 4 == 0) {
                s += "<text x=\"\(n(x + (barW - gap) / 2))\" y=\"\(n(height - 3))\" class=\"ax\" text-anchor=\"middle\">\(i)</text>"
            }
        }
        return s + "</svg>"
    }

    /// A similarity heat map, experts in `order` (members of a group next to each other), each
    /// group's block outlined and its dominant expert marked. Cells are drawn as one path per
    /// colour level of horizontal runs, so the figure stays small for 256 experts.
    static func heatMap(_ m: [[Double]], order: [Int], groups: [[Int]], dominant: [Int], maxCells: Int = 128) -> String {
        let e = m.count
        guard e > 0, order.count == e else { return "" }
        var lo = Double.infinity, hi = -Double.infinity
        for i in 0..<e { for j in 0..<e where i != j && m[i][j].isFinite { lo = min(lo, m[i][j]); hi = max(hi, m[i][j]) } }
        if !lo.isFinite { lo = 0; hi = 1 }
        if hi <= lo { hi = lo + 1 }
        // Above maxCells experts a cell is the mean of a b×b block (in group order), so the
        // figure's size is bounded whatever the expert count.
        let b = (e + maxCells - 1) / maxCells, k = (e + b - 1) / b
        var grid = [[Double]](repeating: [Double](repeating: 0, count: k), count: k)
        for r in 0..<k {
            for c in 0..<k {
                var sum = 0.0, count = 0.0
                for i in (r * b)..<min(e, r * b + b) {
                    for j in (c * b)..<min(e, c * b + b) where m[order[i]][order[j]].isFinite { sum += m[order[i]][order[j]]; count += 1 }
                }
                grid[r][c] = count > 0 ? sum / count : .nan
            }
        }
        let levels = palette.count
        func level(_ v: Double) -> Int { v.isFinite ? max(0, min(levels - 1, Int((v - lo) / (hi - lo) * Double(levels)))) : 0 }
        let cell = max(1.0, min(28.0, (448.0 / Double(k)).rounded(.down)))
        let margin = e <= 32 ? 22.0 : 4.0
        let size = Double(k) * cell
        var paths = [String](repeating: "", count: levels)
        for r in 0..<k {
            var c = 0
            while c < k {
                let l = level(grid[r][c])
                var end = c + 1
                while end < k && level(grid[r][end]) == l { end += 1 }
                paths[l] += "M\(c) \(r)h\(end - c)v1h-\(end - c)z"
                c = end
            }
        }
        let total = margin + size + 4 + 54
        var s = "<svg class=\"heatmap\" xmlns=\"http://www.w3.org/2000/svg\" width=\"\(n(total))\" height=\"\(n(margin + size + 4))\" viewBox=\"0 0 \(n(total)) \(n(margin + size + 4))\" role=\"img\" aria-label=\"similarity heat map\" shape-rendering=\"crispEdges\">"
        s += "<g transform=\"translate(\(n(margin)) \(n(margin))) scale(\(n(cell)))\">"
        for (l, d) in paths.enumerated() where !d.isEmpty { s += "<path fill=\"\(palette[l])\" d=\"\(d)\"/>" }
        // Group outlines and dominant markers, in cell units.
        let position = Dictionary(uniqueKeysWithValues: order.enumerated().map { ($1, $0) })
        for (g, members) in groups.enumerated() {
            let ps = members.compactMap { position[$0] }
            guard let first = ps.min(), let last = ps.max() else { continue }
            let a = first / b, z = last / b
            let tip = "group \(g): dominant \(g < dominant.count ? "\(dominant[g])" : "?"), members \(members.map(String.init).joined(separator: " "))"
            s += "<rect x=\"\(a)\" y=\"\(a)\" width=\"\(z - a + 1)\" height=\"\(z - a + 1)\" class=\"grp\" vector-effect=\"non-scaling-stroke\"><title>\(escape(tip))</title></rect>"
        }
        for d in dominant { if let p = position[d].map({ $0 / b }) {
            s += "<circle cx=\"\(p).5\" cy=\"\(p).5\" r=\"\(cell >= 6 ? "0.28" : "0.6")\" class=\"dom\"><title>dominant expert \(d)</title></circle>"
        } }
        s += "</g>"
        if e <= 32 {
            let dom = Set(dominant)
            for (p, i) in order.enumerated() {
                let c = margin + (Double(p) + 0.5) * cell
                let cls = dom.contains(i) ? "ax b" : "ax"
                s += "<text x=\"\(n(c))\" y=\"\(n(margin - 6))\" class=\"\(cls)\" text-anchor=\"middle\">\(i)</text>"
                s += "<text x=\"\(n(margin - 4))\" y=\"\(n(c + 3))\" class=\"\(cls)\" text-anchor=\"end\">\(i)</text>"
            }
        }
        // Colour scale.
        let sx = margin + size + 10, step = size / Double(levels)
        for l in 0..<levels {
            s += "<rect x=\"\(n(sx))\" y=\"\(n(margin + size - Double(l + 1) * step))\" width=\"10\" height=\"\(n(step))\" fill=\"\(palette[l])\"/>"
        }
        s += "<text x=\"\(n(sx + 13))\" y=\"\(n(margin + 8))\" class=\"ax\">\(String(format: "%.3g", hi))</text>"
        s += "<text x=\"\(n(sx + 13))\" y=\"\(n(margin + size))\" class=\"ax\">\(String(format: "%.3g", lo))</text>"
        return s + "</svg>"
    }

    /// Horizontal bars comparing byte counts (e.g. original, merged, final), longest = full width.
    static func byteBars(_ rows: [(label: String, bytes: Int)], formatted: (Int) -> String) -> String {
        let peak = Double(max(rows.map(\.bytes).max() ?? 1, 1))
        let rowH = 18.0, width = 460.0, labelW = 120.0
        var s = "<svg class=\"bytes\" xmlns=\"http://www.w3.org/2000/svg\" width=\"\(n(width + labelW + 90))\" height=\"\(n(Double(rows.count) * rowH + 4))\" role=\"img\" aria-label=\"expert bytes\">"
        for (i, r) in rows.enumerated() {
            let y = Double(i) * rowH + 2
            let w = max(1, width * Double(r.bytes) / peak)
            s += "<text x=\"\(n(labelW - 6))\" y=\"\(n(y + 12))\" class=\"ax\" text-anchor=\"end\">\(escape(r.label))</text>"
            s += "<rect x=\"\(n(labelW))\" y=\"\(n(y))\" width=\"\(n(w))\" height=\"\(n(rowH - 4))\" class=\"bb b\(i % 4)\"/>"
            s += "<text x=\"\(n(labelW + w + 4))\" y=\"\(n(y + 12))\" class=\"ax\">\(escape(formatted(r.bytes)))</text>"
        }
        return s + "</svg>"
    }

    /// Per layer bars of two series (before and after) with a marker for a budget line, for the
    /// summary: one row per layer.
    static func layerBars(_ rows: [(name: String, before: Int, after: Int, planned: Int?)], formatted: (Int) -> String) -> String {
        let peak = Double(max(rows.map(\.before).max() ?? 1, 1))
        let rowH = rows.count > 40 ? 8.0 : 16.0, width = 420.0, labelW = 60.0
        var s = "<svg class=\"layerbytes\" xmlns=\"http://www.w3.org/2000/svg\" width=\"\(n(width + labelW + 10))\" height=\"\(n(Double(rows.count) * rowH + 4))\" role=\"img\" aria-label=\"bytes per layer\">"
        for (i, r) in rows.enumerated() {
            let y = Double(i) * rowH + 2
            let tip = "\(r.name): \(formatted(r.before)) → \(formatted(r.after))" + (r.planned.map { " (planned \(formatted($0)))" } ?? "")
            s += "<g><title>\(escape(tip))</title>"
            if rows.count <= 40 { s += "<text x=\"\(n(labelW - 4))\" y=\"\(n(y + rowH - 5))\" class=\"ax\" text-anchor=\"end\">\(i)</text>" }
            s += "<rect x=\"\(n(labelW))\" y=\"\(n(y))\" width=\"\(n(max(1, width * Double(r.before) / peak)))\" height=\"\(n(rowH - 3))\" class=\"bb b0\"/>"
            s += "<rect x=\"\(n(labelW))\" y=\"\(n(y))\" width=\"\(n(max(1, width * Double(r.after) / peak)))\" height=\"\(n(rowH - 3))\" class=\"bb b2\"/>"
            if let p = r.planned {
                let x = labelW + width * Double(p) / peak
                s += "<line x1=\"\(n(x))\" y1=\"\(n(y - 1))\" x2=\"\(n(x))\" y2=\"\(n(y + rowH - 2))\" class=\"plan\"/>"
            }
            s += "</g>"
        }
        return s + "</svg>"
    }
}
