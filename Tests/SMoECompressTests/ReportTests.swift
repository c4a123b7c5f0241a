import Foundation
import XCTest
@testable import SMoECompress

/// The HTML report (issue 30): `--report` on stats, merge, compress and eval and the `report`
/// command. Every page is checked without a browser (self-contained, deterministic, every
/// number equal to the run's `--json`) and, where Debian's `chromium` is installed, in headless
/// Chromium (loads with no console error; every layer section and figure present in the DOM it
/// builds; the numbers it shows equal `--json`).
final class ReportTests: XCTestCase {
    /// One run of the issue's command, shared by the tests: compress of the trained Mixtral-style
    /// fixture to half its expert bytes, with `--json` and `--report`.
    struct Run {
        var dir: String
        var json: JSONValue
        var htmlPath: String
        var html: String
        var output: String
    }

    nonisolated(unsafe) static var shared: Run?

    func compressRun() throws -> Run {
        if let r = Self.shared { return r }
        let dir = NSTemporaryDirectory() + "smoe-report-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let html = dir + "/r.html", out = dir + "/out.h5"
        let r = try runCLI(["compress", fixture("trained-mixtral.h5"), "--calib", fixture("trained-mixtral.calib.h5"),
                            "--target-size", "0.5", "-o", out, "--report", html, "--json", "--quiet"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let run = Run(dir: dir, json: try JSONValue.parse(r.stdout), htmlPath: html,
                      html: try String(contentsOfFile: html, encoding: .utf8), output: out)
        Self.shared = run
        return run
    }

    override class func tearDown() {
        if let d = shared?.dir { try? FileManager.default.removeItem(atPath: d) }
        shared = nil
        super.tearDown()
    }

    // MARK: checks shared by every page

    /// Every `data-path`/`data-value`/`data-fmt` element of `html`: its value is the document's
    /// value at that path, its text that value formatted. Returns how many were checked.
    @discardableResult
    func checkNumbers(_ html: String, against doc: JSONValue, file: StaticString = #filePath, line: UInt = #line) throws -> Int {
        let re = try NSRegularExpression(pattern: #"data-path="([^"]*)" data-value="([^"]*)" data-fmt="([^"]*)">([^<]*)<"#)
        let ns = html as NSString
        var checked = 0
        for m in re.matches(in: html, range: NSRange(location: 0, length: ns.length)) {
            let path = ns.substring(with: m.range(at: 1)), shown = ns.substring(with: m.range(at: 2))
            let fmt = ns.substring(with: m.range(at: 3)), text = unescape(ns.substring(with: m.range(at: 4)))
            guard let v = lookup(doc, path) else { XCTFail("\(path) is not in the --json document", file: file, line: line); continue }
            XCTAssertEqual(shown, v.serialized(), "\(path)", file: file, line: line)
            XCTAssertEqual(text, HTMLReport.format(v, fmt), "\(path)", file: file, line: line)
            checked += 1
        }
        return checked
    }

    func unescape(_ s: String) -> String {
        s.replacingOccurrences(of: "&lt;", with: "<").replacingOccurrences(of: "&gt;", with: ">")
            .replacingOccurrences(of: "&quot;", with: "\"").replacingOccurrences(of: "&#39;", with: "'")
            .replacingOccurrences(of: "&amp;", with: "&")
    }

    func lookup(_ doc: JSONValue, _ path: String) -> JSONValue? {
        var v: JSONValue? = doc
        for part in path.split(separator: ".") {
            if let i = Int(part), let a = v?.arrayValue { v = i < a.count ? a[i] : nil } else { v = v?[String(part)] }
        }
        return v
    }

    /// Nothing is fetched: no script, no external reference (the SVG namespace is a name, not a fetch).
    func checkSelfContained(_ html: String, file: StaticString = #filePath, line: UInt = #line) {
        for bad in ["<script", " src=", "url(", "@import", "https://"] {
            XCTAssertFalse(html.contains(bad), "the page contains \(bad)", file: file, line: line)
        }
        XCTAssertEqual(html.components(separatedBy: "http://").count - 1,
                       html.components(separatedBy: "xmlns=\"http://www.w3.org/2000/svg\"").count - 1,
                       "only the SVG namespace may name a URL", file: file, line: line)
    }

    /// The `<details>` section of every layer, with the figures it must hold.
    func checkLayerSections(_ html: String, names: [String], figures: [String], file: StaticString = #filePath, line: UInt = #line) {
        let sections = html.components(separatedBy: "<details class=\"layer\"").dropFirst()
        XCTAssertEqual(sections.count, names.count, "one section per layer", file: file, line: line)
        for (name, s) in zip(names, sections) {
            let body = s.components(separatedBy: "</details>")[0]
            XCTAssertTrue(body.contains("data-layer=\"\(name)\""), name, file: file, line: line)
            for f in figures { XCTAssertTrue(body.contains("<svg class=\"\(f)\""), "\(name): no \(f) figure", file: file, line: line) }
        }
    }

    // MARK: compress (the issue's command)

    func testCompressReportShowsTheJSONNumbersAndIsSelfContained() throws {
        let run = try compressRun()
        let layers = run.json["report"]?["layers"]?.arrayValue ?? []
        XCTAssertEqual(layers.count, 4)
        checkLayerSections(run.html, names: layers.compactMap { $0["name"]?.stringValue }, figures: ["usage", "heatmap", "bytes"])
        let checked = try checkNumbers(run.html, against: run.json)
        XCTAssertGreaterThan(checked, 100)
        // The figures the issue names are among them.
        for path in ["report.expert_bytes_final", "report.mean_relative_error_final", "plan.budget_bytes", "plan.layers.3.estimated_relative_error",
                     "report.layers.2.evaluation.mean_cosine", "report.layers.1.merge.members.0.aligned_cosine"] {
            XCTAssertTrue(run.html.contains("data-path=\"\(path)\""), path)
        }
        XCTAssertTrue(run.html.contains("Plan against the budget"))
        checkSelfContained(run.html)
        XCTAssertFalse(run.html.contains("peak_rss"), "timing varies from run to run: not in the page")
    }

    /// Same document, same bytes: the report drawn afterwards from the saved --json equals the
    /// one the run wrote; the checkpoint's history draws one too.
    func testReportCommandRedrawsTheSamePage() throws {
        let run = try compressRun()
        let saved = run.dir + "/run.json", again = run.dir + "/again.html"
        try run.json.serialized(pretty: true).write(toFile: saved, atomically: true, encoding: .utf8)
        let r = try runCLI(["report", saved, "-o", again])
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try String(contentsOfFile: again, encoding: .utf8), run.html)
        let fromHistory = run.dir + "/history.html"
        let h = try runCLI(["report", run.output, "-o", fromHistory])
        XCTAssertEqual(h.status, 0, h.stderr)
        let page = try String(contentsOfFile: fromHistory, encoding: .utf8)
        checkLayerSections(page, names: (run.json["report"]?["layers"]?.arrayValue ?? []).compactMap { $0["name"]?.stringValue }, figures: [])
        XCTAssertTrue(page.contains("Plan against the budget"))
        checkSelfContained(page)
    }

    // MARK: stats, merge, eval

    func testStatsMergeAndEvalReports() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("planted-switch.h5"), c = fixture("planted-switch.calib.h5")
        func page(_ args: [String], _ html: String) throws -> (JSONValue, String) {
            let r = try runCLI(args + ["--report", html, "--json", "--quiet"])
            XCTAssertEqual(r.status, 0, r.stderr)
            return (try JSONValue.parse(r.stdout), try String(contentsOfFile: html, encoding: .utf8))
        }
        let (stats, statsPage) = try page(["stats", m, "--calib", c, "-o", dir + "/s.h5", "--similarity", "router-logits,feature"], dir + "/s.html")
        let names = (stats["layers"]?.arrayValue ?? []).compactMap { $0["name"]?.stringValue }
        XCTAssertFalse(names.isEmpty)
        checkLayerSections(statsPage, names: names, figures: ["usage", "heatmap"])
        XCTAssertEqual(statsPage.components(separatedBy: "<svg class=\"heatmap\"").count - 1, 2 * names.count, "one heat map per similarity")
        XCTAssertGreaterThan(try checkNumbers(statsPage, against: stats), 10)

        let (merge, mergePage) = try page(["merge", m, "--calib", c, "--groups", "3", "--merge-method", "frequency", "-o", dir + "/m.h5"], dir + "/m.html")
        checkLayerSections(mergePage, names: names, figures: ["usage", "heatmap"])
        XCTAssertNotNil(merge["layers"]?.arrayValue?.first?["similarity"]?["matrix"], "the grouping similarity is a report value")
        XCTAssertGreaterThan(try checkNumbers(mergePage, against: merge), 10)

        let (eval, evalPage) = try page(["eval", m, dir + "/m.h5", "--calib", c], dir + "/e.html")
        checkLayerSections(evalPage, names: names, figures: ["bytes"])
        XCTAssertTrue(evalPage.contains("data-path=\"evaluation.layers.0.mean_cosine\""))
        XCTAssertGreaterThan(try checkNumbers(evalPage, against: eval), 10)
        for p in [statsPage, mergePage, evalPage] { checkSelfContained(p) }
    }

    /// A pruning's page draws every slot's saliency with the kept experts marked, and lists
    /// kept and dropped slots as the `--json` report has them.
    func testPruneReportDrawsSaliencyAndKeptExperts() throws {
        let dir = temporaryDirectory(self)
        let html = dir + "/p.html"
        let r = try runCLI(["merge", fixture("trained-mixtral.h5"), "--calib", fixture("trained-mixtral.calib.h5"), "--groups", "4",
                            "--prune", "reap", "--no-compact-refit", "-o", dir + "/p.h5", "--report", html, "--json", "--quiet"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let doc = try JSONValue.parse(r.stdout), page = try String(contentsOfFile: html, encoding: .utf8)
        let layers = try XCTUnwrap(doc["layers"]?.arrayValue)
        checkLayerSections(page, names: layers.compactMap { $0["name"]?.stringValue }, figures: ["usage"])
        let sections = page.components(separatedBy: "<details class=\"layer\"").dropFirst()
        for (layer, section) in zip(layers, sections) {
            let kept = try XCTUnwrap(layer["prune"]?["kept"]?.arrayValue?.compactMap(\.intValue))
            let saliency = try XCTUnwrap(layer["prune"]?["saliency"]?.arrayValue?.compactMap(\.doubleValue))
            XCTAssertEqual(kept.count, 4)
            XCTAssertTrue(section.contains("pruned to 4 experts"))
            XCTAssertTrue(section.contains("Pruning saliency (reap"))
            // One bar per slot, the kept ones dark, each bar's tooltip giving its saliency.
            XCTAssertEqual(section.components(separatedBy: "class=\"bar dom\"").count - 1, 4)
            for (e, v) in saliency.enumerated() {
                XCTAssertTrue(section.contains("expert \(e): saliency \(String(format: "%.4f", v))"), "slot \(e)")
            }
            XCTAssertTrue(section.contains(kept.enumerated().map { "\($0) ← \($1)" }.joined(separator: ", ")))
        }
        checkSelfContained(page)
    }

    // MARK: bad input

    func testBadInputIsOneErrorLineNamingTheFile() throws {
        let dir = temporaryDirectory(self)
        let garbage = dir + "/garbage.json", array = dir + "/array.json"
        try "{\"layers\": [1, 2".write(toFile: garbage, atomically: true, encoding: .utf8)
        try "[1, 2, 3]".write(toFile: array, atomically: true, encoding: .utf8)
        for input in [dir + "/missing.json", garbage, array, dir] {
            let out = dir + "/r.html"
            let r = try runCLI(["report", input, "-o", out])
            XCTAssertNotEqual(r.status, 0, input)
            let lines = r.stderr.split(separator: "\n")
            XCTAssertEqual(lines.count, 1, r.stderr)
            XCTAssertTrue(lines.first?.hasPrefix("error: ") == true && lines.first!.contains(input), r.stderr)
            XCTAssertFalse(FileManager.default.fileExists(atPath: out))
        }
        // --report may not overwrite an input; refused before any work.
        let r = try runCLI(["eval", fixture("planted-switch.h5"), fixture("planted-switch.h5"), "--calib", fixture("planted-switch.calib.h5"),
                            "--report", fixture("planted-switch.calib.h5")])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.stderr.hasPrefix("error: ") && r.stderr.contains("planted-switch.calib.h5"), r.stderr)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasPrefix(".") }, [], "no temporary file left")
    }

    // MARK: in a real browser

    /// Headless Chromium (`SMOE_CHROMIUM` names the binary; `off` skips): skipped, naming it, where absent.
    func chromium() throws -> String {
        let env = ProcessInfo.processInfo.environment["SMOE_CHROMIUM"]
        if env == "off" { throw XCTSkip("headless Chromium check skipped (SMOE_CHROMIUM=off)") }
        for path in [env, "/usr/bin/chromium", "/usr/bin/chromium-browser"].compactMap({ $0 })
        where FileManager.default.isExecutableFile(atPath: path) { return path }
        throw XCTSkip("chromium is not installed (Debian package chromium: apt-get install -y chromium): the report is not checked in a browser")
    }

    /// Runs headless Chromium on `page` with `args`; returns (stdout, stderr, seconds).
    func runChromium(_ binary: String, _ args: [String], page: String, profile: String) throws -> (String, String, Double) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/timeout")
        p.arguments = ["120", binary, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--user-data-dir=" + profile,
                       "--enable-logging=stderr", "--v=0"] + args + [URL(fileURLWithPath: page).absoluteString]
        // stderr to a file (Chromium logs a lot; a second pipe could fill while stdout is read).
        let logPath = profile + ".log"
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = FileHandle(forWritingAtPath: logPath)!
        defer { try? log.close() }
        let out = Pipe()
        p.standardOutput = out
        p.standardError = log
        let start = Date()
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        let e = FileManager.default.contents(atPath: logPath) ?? Data()
        XCTAssertEqual(p.terminationStatus, 0, "chromium: \(String(decoding: e, as: UTF8.self).suffix(2000))")
        return (String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self), Date().timeIntervalSince(start))
    }

    func testCompressReportInHeadlessChromium() throws {
        let browser = try chromium()
        let run = try compressRun()
        let (dom, log, seconds) = try runChromium(browser, ["--dump-dom"], page: run.htmlPath, profile: run.dir + "/profile")
        print("chromium loaded \(run.htmlPath) (\(run.html.utf8.count) bytes) and dumped its DOM in \(String(format: "%.2f", seconds)) s")
        // No console message at all (the page has no script; a failed load would log one).
        let console = log.split(separator: "\n").filter { $0.contains("CONSOLE") || $0.contains("net::ERR") }
        XCTAssertEqual(console, [], "console messages")
        // The DOM Chromium built holds every layer section and figure, and the same numbers.
        let names = (run.json["report"]?["layers"]?.arrayValue ?? []).compactMap { $0["name"]?.stringValue }
        checkLayerSections(dom, names: names, figures: ["usage", "heatmap", "bytes"])
        XCTAssertEqual(try checkNumbers(dom, against: run.json), try checkNumbers(run.html, against: run.json),
                       "every number of the page survives in the browser's DOM")
        // And it renders: a screenshot of the summary.
        let png = run.dir + "/summary.png"
        _ = try runChromium(browser, ["--screenshot=" + png, "--window-size=1200,900", "--hide-scrollbars"], page: run.htmlPath,
                            profile: run.dir + "/profile")
        let data = try Data(contentsOf: URL(fileURLWithPath: png))
        XCTAssertEqual(Array(data.prefix(4)), [0x89, 0x50, 0x4E, 0x47])
        XCTAssertGreaterThan(data.count, 10_000, "a blank page would compress to almost nothing")
    }
}
