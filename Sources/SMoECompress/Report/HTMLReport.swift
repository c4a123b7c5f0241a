import Foundation

/// The HTML report (issue 30): one self-contained page (inline CSS and SVG, no script, nothing
/// fetched) drawn from the JSON document a command prints with `--json` — the same report
/// values, a third renderer beside the table and the JSON. `stats`, `merge`, `compress` and
/// `eval` documents are recognised by their members; `historyDocument` turns a checkpoint's
/// history into one. Deterministic: the page is a function of the document alone (the per-layer
/// timing members, which vary from run to run, are left out).
///
/// Every number shown carries `data-path` (its place in the document, keys and array indices
/// joined by `.`), `data-value` (the value as the compact JSON serialization writes it) and
/// `data-fmt` (how the text shows it, `format(_:_:)`), so a test can compare the page with the
/// `--json` document.
public enum HTMLReport {
    /// Renders `document` (a command's `--json` document, or `historyDocument`) as one HTML page,
    /// titled by default from the document (`title(for:)`), so `--report` on a run and `report`
    /// on its saved `--json` write the same bytes.
    public static func render(_ document: JSONValue, title: String? = nil) -> String {
        var page = Page(doc: document)
        return page.render(title: title ?? self.title(for: document))
    }

    /// "compress Fixtures/trained-mixtral.h5": the command the document is from and its model.
    public static func title(for document: JSONValue) -> String {
        let page = Page(doc: document)
        let file = ["model", "compressed", "checkpoint", "output"].lazy.compactMap { document[$0]?.stringValue }.first
        return page.kind + (file.map { " " + $0 } ?? "")
    }

    /// A document for a checkpoint's history (`report OUT.h5`): `checkpoint` and `history`.
    public static func historyDocument(checkpoint: String, history: [JSONValue]) -> JSONValue {
        .object([("checkpoint", .string(checkpoint)), ("history", .array(history))])
    }

    /// Writes `html` to `path` atomically (temporary file, renamed on success).
    public static func write(_ html: String, to path: String) throws {
        let out = try AtomicOutput(destination: path)
        guard FileManager.default.createFile(atPath: out.temporaryPath, contents: Data(html.utf8)) else {
            out.discard()
            throw SMoEError.file(path, "cannot write")
        }
        try out.commit()
    }

    /// The text a number is shown as: `bytes` (KiB/MiB/GiB), `int`, `f4` (4 decimals), `g4`
    /// (4 significant digits).
    public static func format(_ v: JSONValue, _ fmt: String) -> String {
        switch fmt {
        case "bytes": return v.intValue.map(formatBytes) ?? v.serialized()
        case "int": return v.intValue.map(String.init) ?? v.serialized()
        case "f4": return v.doubleValue.map { String(format: "%.4f", $0) } ?? v.serialized()
        case "g4": return v.doubleValue.map { String(format: "%.4g", $0) } ?? v.serialized()
        default: return v.serialized()
        }
    }

    /// 1536 → "1.5 KiB" (the tables' format).
    public static func formatBytes(_ b: Int) -> String {
        let d = Double(b)
        if b >= 1 << 30 { return String(format: "%.2f GiB", d / 1_073_741_824) }
        if b >= 1 << 20 { return String(format: "%.2f MiB", d / 1_048_576) }
        if b >= 1 << 10 { return String(format: "%.1f KiB", d / 1024) }
        return "\(b) B"
    }

    /// The format a member is shown in, from its key and value.
    static func formatFor(key: String, _ v: JSONValue) -> String {
        if key.contains("bytes") || key == "budget" { return "bytes" }
        if case .int = v { return "int" }
        if key.contains("flops") { return "g4" }
        return "f4"
    }

    static let css = """
        body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0 auto;max-width:1180px;padding:16px 24px;color:#1b1f24;background:#fff}
        h1{font-size:22px;margin:4px 0 2px}h2{font-size:18px;margin:22px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:3px}h3{font-size:15px;margin:12px 0 4px}
        .sub{color:#57606a;margin:0 0 10px}table{border-collapse:collapse;margin:4px 0 10px;font-variant-numeric:tabular-nums}
        td,th{border:1px solid #d0d7de;padding:2px 8px;text-align:right;vertical-align:top}th{background:#f6f8fa;font-weight:600}
        td.l,th.l{text-align:left}td.name{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;text-align:left}
        .cards{display:flex;flex-wrap:wrap;gap:10px;margin:6px 0 12px}.card{border:1px solid #d0d7de;border-radius:6px;padding:6px 12px;min-width:130px}
        .card .k{color:#57606a;font-size:12px}.card .v{font-size:20px;font-weight:600}
        details.layer{border:1px solid #d0d7de;border-radius:6px;margin:8px 0;padding:0 10px}details.layer>summary{cursor:pointer;padding:6px 0;font-weight:600}
        details.layer>summary span{font-weight:400;color:#57606a;margin-left:10px}
        .figs{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}.fig{margin:0}.fig figcaption{font-size:12px;color:#57606a;max-width:520px}
        svg .ax{font-size:10px;fill:#57606a}svg .ax.b{font-weight:700;fill:#1b1f24}svg .axis{stroke:#8c959f}
        svg .bar{fill:#6e9fd1}svg .bar.dom{fill:#0b4f9c}svg .unused{fill:#cf222e;font-size:12px;font-weight:700}
        svg .grp{fill:none;stroke:#d4351c;stroke-width:2}svg .dom{fill:#ffb000;stroke:#1b1f24;stroke-width:.08}
        svg .bb.b0{fill:#c8d1da}svg .bb.b1{fill:#8fb8de}svg .bb.b2{fill:#2f6fb5}svg .bb.b3{fill:#5a3fa0}svg .plan{stroke:#d4351c;stroke-width:2}
        .row{display:flex;flex-wrap:wrap;gap:0 24px;align-items:flex-start}
        .warn{color:#9a6700}.muted{color:#57606a}code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
        """
}

/// One page under construction.
private struct Page {
    let doc: JSONValue
    var out = ""

    init(doc: JSONValue) { self.doc = doc }

    // MARK: values with their paths

    /// A value at a dotted path (keys and array indices).
    func value(_ path: String) -> JSONValue? {
        var v: JSONValue? = doc
        for part in path.split(separator: ".") {
            if let i = Int(part), let a = v?.arrayValue { v = i < a.count ? a[i] : nil } else { v = v?[String(part)] }
        }
        return v
    }

    /// An element showing the number at `path` with its data attributes.
    func num(_ path: String, _ fmt: String? = nil, tag: String = "td") -> String {
        guard let v = value(path) else { return "<\(tag) class=\"muted\">-</\(tag)>" }
        switch v {
        case .int, .double:
            let key = String(path.split(separator: ".").last ?? "")
            let f = fmt ?? HTMLReport.formatFor(key: key, v)
            return "<\(tag) data-path=\"\(SVG.escape(path))\" data-value=\"\(SVG.escape(v.serialized()))\" data-fmt=\"\(f)\">\(SVG.escape(HTMLReport.format(v, f)))</\(tag)>"
        case .string(let s): return "<\(tag) class=\"l\">\(SVG.escape(s))</\(tag)>"
        case .bool(let b): return "<\(tag)>\(b ? "yes" : "no")</\(tag)>"
        case .array(let a): return "<\(tag) class=\"l\">\(SVG.escape(a.map { $0.stringValue ?? $0.serialized() }.joined(separator: " ")))</\(tag)>"
        default: return "<\(tag) class=\"muted\">-</\(tag)>"
        }
    }

    /// The scalar members of the object at `path` (and of its scalar-only sub-objects), as a
    /// two-column table; `skip` keys are left out.
    func scalarTable(_ path: String, skip: Set<String> = [], caption: String? = nil) -> String {
        guard case .object(let kv)? = value(path) else { return "" }
        var rows = ""
        for (k, v) in kv where !skip.contains(k) {
            let p = path.isEmpty ? k : path + "." + k
            switch v {
            case .int, .double, .string, .bool: rows += "<tr><th class=\"l\">\(SVG.escape(k))</th>\(num(p))</tr>"
            case .array(let a) where a.allSatisfy({ $0.stringValue != nil }) && !a.isEmpty:
                rows += "<tr><th class=\"l\">\(SVG.escape(k))</th>\(num(p))</tr>"
            default: break
            }
        }
        guard !rows.isEmpty else { return "" }
        return (caption.map { "<h3>\(SVG.escape($0))</h3>" } ?? "") + "<table>\(rows)</table>"
    }

    // MARK: the document's shape

    /// The path of the layer array: `report.layers` (compress), `evaluation.layers` (eval),
    /// `layers` (stats, merge), or in a history document the last entry's merged/factored layers.
    var layersPath: String? {
        if value("report.layers")?.arrayValue != nil { return "report.layers" }
        if value("evaluation.layers")?.arrayValue != nil { return "evaluation.layers" }
        if value("layers")?.arrayValue != nil { return "layers" }
        if let h = value("history")?.arrayValue {
            for i in h.indices.reversed() {
                if value("history.\(i).merge.layers")?.arrayValue != nil { return "history.\(i).merge.layers" }
                if value("history.\(i).layers")?.arrayValue != nil { return "history.\(i).layers" }
            }
        }
        return nil
    }

    /// The plan's path, if the document has one.
    var planPath: String? {
        if value("plan.layers") != nil { return "plan" }
        if let h = value("history")?.arrayValue {
            for i in h.indices.reversed() where value("history.\(i).plan.layers") != nil { return "history.\(i).plan" }
        }
        return nil
    }

    var kind: String {
        if value("report.layers") != nil { return "compress" }
        if value("evaluation.layers") != nil { return "eval" }
        if value("history") != nil { return "checkpoint history" }
        if let first = value("layers.0"), first["counts"] != nil { return "stats" }
        if value("layers.0.members") != nil || value("merge_method") != nil { return "merge" }
        return "report"
    }

    // MARK: page

    mutating func render(title: String) -> String {
        out = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        out += "<link rel=\"icon\" href=\"data:,\"><title>\(SVG.escape(title))</title><style>\(HTMLReport.css)</style></head>\n<body>\n"
        out += "<h1>\(SVG.escape(title))</h1><p class=\"sub\">smoe-compress \(SVG.escape(kind)) report</p>\n"
        summary()
        layerSections()
        out += "</body></html>\n"
        return out
    }

    /// The number of the layer array, its paths.
    var layerPaths: [String] {
        guard let lp = layersPath, let a = value(lp)?.arrayValue else { return [] }
        return a.indices.map { "\(lp).\($0)" }
    }

    mutating func summary() {
        out += "<section id=\"summary\"><h2>Summary</h2>\n"
        // Headline cards.
        var cards: [(String, String)] = []
        func card(_ label: String, _ path: String) {
            if value(path) != nil { cards.append((label, num(path, tag: "div"))) }
        }
        cards.append(("MoE layers", "<div>\(layerPaths.count)</div>"))
        for (label, p) in [("expert bytes before", "report.expert_bytes_original"), ("expert bytes after", "report.expert_bytes_final"),
                           ("compression ×", "report.compression_ratio"), ("mean error", "report.mean_relative_error_final"),
                           ("max error", "report.max_relative_error_final"),
                           ("expert bytes before", "evaluation.expert_bytes_before"), ("expert bytes after", "evaluation.expert_bytes_after"),
                           ("compression ×", "evaluation.expert_compression_ratio"), ("mean error", "evaluation.mean_relative_error"),
                           ("max error", "evaluation.max_relative_error"),
                           ("expert bytes before", "expert_bytes_before"), ("expert bytes after", "expert_bytes_after")] {
            card(label, p)
        }
        out += "<div class=\"cards\">" + cards.map { "<div class=\"card\"><div class=\"k\">\(SVG.escape($0.0))</div><div class=\"v\">\($0.1)</div></div>" }.joined() + "</div>\n"
        // Inputs and totals side by side, the plan and the layers, then the settings.
        out += "<div class=\"row\"><div>" + scalarTable("", skip: ["timing"], caption: "Inputs") + "</div>"
        if value("report") != nil { out += "<div>" + scalarTable("report", caption: "Totals") + "</div>" }
        if value("evaluation") != nil { out += "<div>" + scalarTable("evaluation", caption: "Totals") + "</div>" }
        out += "</div>\n"
        plan()
        overview()
        if value("settings") != nil && planPath != nil {
            out += "<p class=\"muted\">With a target size the plan chooses each layer's groups and ranks (above); the merge "
                + "<code>groups</code> and low-rank <code>rank</code> among the settings below are not the per-layer values.</p>\n"
        }
        out += "<div class=\"row\">"
        if value("settings") != nil { settingsTables("settings", caption: "Settings") }
        if let h = value("history")?.arrayValue {
            for i in h.indices {
                settingsTables("history.\(i)", caption: "History \(i + 1): \(value("history.\(i).stage")?.stringValue ?? "entry")")
            }
        }
        out += "</div>\n"
        out += "</section>\n"
    }

    /// A settings record (a stage's history entry): its scalars, then each sub-object's (merge,
    /// lowrank, tokens…), leaving out per-layer arrays and the plan (shown on its own).
    mutating func settingsTables(_ path: String, caption: String) {
        out += "<div>" + scalarTable(path, caption: caption) + "</div>"
        guard case .object(let kv)? = value(path) else { return }
        for (k, v) in kv where k != "plan" {
            if case .object = v { out += "<div>" + scalarTable(path + "." + k, caption: "\(caption): \(k)") + "</div>" }
        }
    }

    /// The plan against the budget (compress --target-size).
    mutating func plan() {
        guard let pp = planPath, let layers = value(pp + ".layers")?.arrayValue else { return }
        out += "<h3>Plan against the budget</h3><table><tr><th class=\"l\">budget</th>\(num(pp + ".budget_bytes"))"
            + "<th class=\"l\">planned</th>\(num(pp + ".expert_bytes"))<th class=\"l\">original</th>\(num(pp + ".expert_bytes_original"))"
            + "<th class=\"l\">mean estimated error</th>\(num(pp + ".mean_estimated_relative_error"))</tr></table>\n"
        out += scalarTable(pp + ".target", caption: nil)
        let actual = layerPaths
        var rows: [(name: String, before: Int, after: Int, planned: Int?)] = []
        var t = "<table><tr><th class=\"l\">layer</th><th>groups</th><th class=\"l\">ranks</th><th>original</th><th>planned</th><th>estimated error</th>"
            + (kind == "compress" ? "<th>written</th><th>error</th>" : "") + "</tr>"
        for i in layers.indices {
            let p = "\(pp).layers.\(i)"
            let name = value(p + ".name")?.stringValue ?? ""
            t += "<tr><td class=\"name\">\(SVG.escape(name))</td>\(num(p + ".groups"))<td class=\"l\">\(SVG.escape(ranksText(p + ".ranks")))</td>"
                + num(p + ".expert_bytes_original") + num(p + ".expert_bytes") + num(p + ".estimated_relative_error")
            let a = actual.first { value($0 + ".name")?.stringValue == name }
            if kind == "compress" {
                t += a.map { num($0 + ".expert_bytes_final") + num($0 + ".relative_error_final") } ?? "<td>-</td><td>-</td>"
            }
            t += "</tr>"
            rows.append((name, value(p + ".expert_bytes_original")?.intValue ?? 0,
                         a.flatMap { value($0 + ".expert_bytes_final")?.intValue } ?? value(p + ".expert_bytes")?.intValue ?? 0,
                         value(p + ".expert_bytes")?.intValue))
        }
        out += t + "</table>\n<figure class=\"fig\">" + SVG.layerBars(rows, formatted: HTMLReport.formatBytes)
            + "<figcaption>Expert bytes per layer: original (grey), written (blue), planned (red line).</figcaption></figure>\n"
    }

    func ranksText(_ path: String) -> String {
        guard case .object(let kv)? = value(path) else { return "" }
        if kv.isEmpty { return "dense" }
        return kv.map { "\($0.0) \($0.1.serialized())" }.joined(separator: ", ")
    }

    /// One row per layer with its headline figures, linking to its section.
    mutating func overview() {
        let paths = layerPaths
        guard !paths.isEmpty else { return }
        let columns: [(String, String)] = {
            switch kind {
            case "compress": return [("groups", "merge.groups"), ("original", "expert_bytes_original"), ("merged", "expert_bytes_merged"),
                                     ("final", "expert_bytes_final"), ("error merged", "relative_error_merged"),
                                     ("error final", "relative_error_final"), ("cosine", "evaluation.mean_cosine")]
            case "eval": return [("tokens", "tokens"), ("error", "relative_error"), ("cosine", "mean_cosine"), ("routing", "routing_agreement"),
                                 ("experts before", "stored_experts_before"), ("after", "stored_experts_after"),
                                 ("bytes before", "expert_bytes_before"), ("after", "expert_bytes_after")]
            case "stats": return [("tokens", "tokens"), ("experts", "num_experts"), ("top-k", "top_k"), ("max share", "max_share")]
            case "merge": return [("groups", "groups")]
            default: return []
            }
        }()
        out += "<h3>Layers</h3><table><tr><th class=\"l\">layer</th>" + columns.map { "<th>\(SVG.escape($0.0))</th>" }.joined()
            + (kind == "stats" ? "<th class=\"l\">never chosen</th>" : "") + "</tr>"
        for (i, p) in paths.enumerated() {
            let name = value(p + ".name")?.stringValue ?? "layer \(i)"
            out += "<tr><td class=\"name\"><a href=\"#layer-\(i)\">\(SVG.escape(name))</a></td>" + columns.map { num(p + "." + $0.1) }.joined()
            if kind == "stats" { out += num(p + ".never_chosen") }
            out += "</tr>"
        }
        out += "</table>\n"
    }

    // MARK: layers

    mutating func layerSections() {
        let paths = layerPaths
        guard !paths.isEmpty else { return }
        out += "<section id=\"layers\"><h2>Layers</h2>\n"
        let open = paths.count <= 8
        for (i, p) in paths.enumerated() { layer(i, p, open: open) }
        out += "</section>\n"
    }

    /// Group structure of a layer: (dominant, members) per group, from a merge report or a
    /// history record.
    func groups(_ m: String) -> (dominant: [Int], members: [[Int]])? {
        if let gs = value(m + ".members")?.arrayValue {
            return (gs.map { $0["dominant"]?.intValue ?? -1 }, gs.map { ($0["members"]?.arrayValue ?? []).compactMap(\.intValue) })
        }
        if let gs = value(m + ".groups")?.arrayValue, let d = value(m + ".dominant")?.arrayValue {
            return (d.compactMap(\.intValue), gs.map { ($0.arrayValue ?? []).compactMap(\.intValue) })
        }
        return nil
    }

    mutating func layer(_ i: Int, _ p: String, open: Bool) {
        let name = value(p + ".name")?.stringValue ?? "layer \(i)"
        // The merge report: compress keeps it under `merge`, merge and history are the layer itself.
        let m = value(p + ".merge") != nil ? p + ".merge" : p
        let grouping = groups(m)
        var headline: [String] = []
        if let g = grouping { headline.append("\(g.members.count) groups") }
        let kept = (value(m + ".prune.kept")?.arrayValue ?? []).compactMap(\.intValue)
        if !kept.isEmpty { headline.append("pruned to \(kept.count) experts") }
        for (label, key) in [("error", "relative_error_final"), ("error", "relative_error"), ("max share", "max_share")] {
            if let v = value(p + "." + key)?.doubleValue { headline.append("\(label) \(String(format: "%.4f", v))"); break }
        }
        if let a = value(p + ".expert_bytes_original")?.intValue, let b = value(p + ".expert_bytes_final")?.intValue {
            headline.append("\(HTMLReport.formatBytes(a)) → \(HTMLReport.formatBytes(b))")
        }
        out += "<details class=\"layer\" id=\"layer-\(i)\" data-layer=\"\(SVG.escape(name))\"\(open ? " open" : "")><summary>\(SVG.escape(name))<span>\(SVG.escape(headline.joined(separator: " · ")))</span></summary>\n"
        out += "<div class=\"figs\">"
        // Usage: statistics' counts, else the merge report's member shares.
        let dominantSet = Set(grouping?.dominant ?? [])
        if let f = value(p + ".frequency")?.arrayValue?.compactMap(\.doubleValue) {
            let counts = value(p + ".counts")?.arrayValue?.compactMap(\.intValue)
            figure(SVG.usageBars(f, counts: counts, dominant: dominantSet),
                   "Expert usage: share of routing hits per router slot over \(value(p + ".tokens")?.intValue.map(String.init) ?? "?") tokens; × never chosen.")
        } else if let gs = value(m + ".members")?.arrayValue {
            var f = [Double](repeating: 0, count: value(m + ".expert_map")?.arrayValue?.count ?? 0)
            for g in gs {
                for (s, share) in zip(g["members"]?.arrayValue ?? [], g["frequency"]?.arrayValue ?? []) {
                    if let s = s.intValue, s < f.count { f[s] = share.doubleValue ?? 0 }
                }
            }
            figure(SVG.usageBars(f, counts: nil, dominant: dominantSet),
                   "Expert usage: share of routing hits per router slot (calibration tokens); dark: dominant experts; × never chosen.")
        }
        // Pruning: every slot's saliency, the kept experts dark.
        if let saliency = value(m + ".prune.saliency")?.arrayValue?.compactMap(\.doubleValue) {
            let method = value(m + ".prune.method")?.stringValue ?? ""
            let rule = method == "reap" ? "mean routing weight × expert output norm over its routed tokens" : "summed routing weight"
            figure(SVG.usageBars(saliency, counts: value(m + ".prune.routed_tokens")?.arrayValue?.compactMap(\.intValue),
                                 dominant: Set(kept), quantity: "saliency", marked: "kept"),
                   "Pruning saliency (\(method): \(rule)) per router slot; dark: the \(kept.count) kept experts; × never routed.")
        }
        // Similarity heat maps.
        if case .object(let bases)? = value(p + ".matrices") {
            for (base, rows) in bases {
                let mat = (rows.arrayValue ?? []).map { ($0.arrayValue ?? []).compactMap(\.doubleValue) }
                figure(SVG.heatMap(mat, order: Array(mat.indices), groups: [], dominant: []),
                       "\(base) similarity between experts (row and column: expert index)." + blockNote(mat.count))
            }
        }
        if let rows = value(m + ".similarity.matrix")?.arrayValue {
            let mat = rows.map { ($0.arrayValue ?? []).compactMap(\.doubleValue) }
            var order: [Int] = []
            if let g = grouping {
                for (d, members) in zip(g.dominant, g.members) { order += [d] + members.filter { $0 != d } }
            }
            if Set(order) != Set(mat.indices) || order.count != mat.count { order = Array(mat.indices) }
            figure(SVG.heatMap(mat, order: order, groups: grouping?.members ?? [], dominant: grouping?.dominant ?? []),
                   "\(value(m + ".similarity.base")?.stringValue ?? "") similarity used for grouping; experts ordered by group, each group outlined, dominant experts marked ●." + blockNote(mat.count))
        }
        // Bytes.
        var bars: [(label: String, bytes: Int)] = []
        for (label, key) in [("original", "expert_bytes_original"), ("merged", "expert_bytes_merged"), ("final", "expert_bytes_final"),
                             ("before", "expert_bytes_before"), ("after", "expert_bytes_after")] {
            if let b = value(p + "." + key)?.intValue { bars.append((label, b)) }
        }
        if !bars.isEmpty { figure(SVG.byteBars(bars, formatted: HTMLReport.formatBytes), "Expert bytes as stored.") }
        out += "</div>\n"
        // Groups and alignment.
        if let gs = value(m + ".members")?.arrayValue {
            out += "<h3>Groups and alignment</h3><table><tr><th>group</th><th>dominant</th><th class=\"l\">members (share)</th><th class=\"l\">merge</th><th>aligned cosine</th></tr>"
            for g in gs.indices {
                let gp = "\(m).members.\(g)"
                let members = (value(gp + ".members")?.arrayValue ?? []).compactMap(\.intValue)
                let shares = (value(gp + ".frequency")?.arrayValue ?? []).compactMap(\.doubleValue)
                let text = zip(members, shares).map { "\($0) (\(String(format: "%.1f%%", 100 * $1)))" }.joined(separator: " ")
                let warn = value(gp + ".warning")?.stringValue.map { " <span class=\"warn\">⚠ \(SVG.escape($0))</span>" } ?? ""
                out += "<tr><td>\(g)</td>\(num(gp + ".dominant"))<td class=\"l\">\(SVG.escape(text))\(warn)</td>\(num(gp + ".merge"))\(num(gp + ".aligned_cosine"))</tr>"
            }
            out += "</table>\n"
        } else if let g = grouping {
            out += "<h3>Groups</h3><table><tr><th>group</th><th>dominant</th><th class=\"l\">members</th></tr>"
            for (j, (d, ms)) in zip(g.dominant, g.members).enumerated() {
                out += "<tr><td>\(j)</td><td>\(d)</td><td class=\"l\">\(ms.map(String.init).joined(separator: " "))</td></tr>"
            }
            out += "</table>\n"
        }
        if !kept.isEmpty {
            let dropped = (value(m + ".prune.dropped")?.arrayValue ?? []).compactMap(\.intValue)
            out += "<h3>Pruning</h3><table><tr><th class=\"l\">method</th><th class=\"l\">kept (expert of the pruned layer ← slot)</th><th class=\"l\">dropped</th></tr>"
            out += "<tr><td class=\"l\">\(SVG.escape(value(m + ".prune.method")?.stringValue ?? ""))</td><td class=\"l\">"
                + kept.enumerated().map { "\($0) ← \($1)" }.joined(separator: ", ") + "</td><td class=\"l\">"
                + dropped.map(String.init).joined(separator: " ") + "</td></tr></table>\n"
            if value(m + ".prune.expert_refit") != nil { out += scalarTable(m + ".prune.expert_refit", caption: "Refit of the kept experts") }
        }
        if let c = value(m + ".compact_router"), c["fitted"] != nil || c["iterations"] != nil {
            out += scalarTable(m + ".compact_router", caption: "Compact router")
        }
        // Ranks and bytes per matrix.
        if let mats = value(p + ".lowrank.matrices")?.arrayValue {
            out += "<h3>Bytes and ranks per matrix</h3><table><tr><th class=\"l\">matrix</th><th>expert</th><th>shape</th><th>rank</th><th>nnz</th><th>bytes before</th><th>bytes after</th><th>weight error</th><th>output error</th><th class=\"l\">note</th></tr>"
            for j in mats.indices {
                let q = "\(p).lowrank.matrices.\(j)"
                let shape = (value(q + ".shape")?.arrayValue ?? []).compactMap(\.intValue).map(String.init).joined(separator: "×")
                let dense = value(q + ".kept_dense") == .bool(true)
                out += "<tr>\(num(q + ".matrix"))\(num(q + ".expert"))<td>\(shape)</td>\(num(q + ".rank"))\(num(q + ".nnz"))\(num(q + ".bytes_before"))\(num(q + ".bytes_after"))\(num(q + ".relative_error"))\(num(q + ".output_error"))<td class=\"l\">\(dense ? "kept dense" : "")\(SVG.escape(value(q + ".reason")?.stringValue.map { " " + $0 } ?? ""))</td></tr>"
            }
            out += "</table>\n"
        } else if kind == "compress" {
            out += "<p class=\"muted\">No low rank in this layer: the merged experts are stored dense.</p>\n"
        }
        if let pp = planPath, let pl = value(pp + ".layers")?.arrayValue,
           let j = pl.firstIndex(where: { $0["name"]?.stringValue == name }) {
            out += scalarTable("\(pp).layers.\(j)", skip: ["name"], caption: "Plan (ranks: \(ranksText("\(pp).layers.\(j).ranks")))")
        }
        // Output error and cosine on the evaluation tokens.
        if value(p + ".evaluation") != nil {
            let source = value("report.evaluation_tokens")?.stringValue ?? "evaluation tokens"
            out += scalarTable(p + ".evaluation", skip: ["name"], caption: "Output error and cosine on \(source)")
        } else {
            out += scalarTable(p, skip: ["name"], caption: kind == "eval" ? "Output error and cosine on \(value("calibration")?.stringValue ?? "the capture")" : "Figures")
        }
        out += "</details>\n"
    }

    /// The heat map caption's note when cells average blocks of experts (`SVG.heatMap`).
    func blockNote(_ e: Int) -> String {
        let b = (e + 127) / 128
        return b > 1 ? " Each cell is the mean over \(b)×\(b) experts (\(e) experts)." : ""
    }

    mutating func figure(_ svg: String, _ caption: String) {
        guard !svg.isEmpty else { return }
        out += "<figure class=\"fig\">\(svg)<figcaption>\(SVG.escape(caption))</figcaption></figure>"
    }
}
