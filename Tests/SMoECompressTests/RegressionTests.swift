import Foundation
import XCTest
@testable import SMoECompress

/// CI regression on the fixture models: a fixed set of `compress` runs whose stored expert
/// bytes must not change and whose per-layer output errors (held-out tokens for the trained
/// fixtures) must not grow beyond the values recorded in `Fixtures/regression.json`.
///
/// After an intended change, regenerate the file with `make goldens`
/// (`SMOE_REGENERATE_GOLDENS=1 swift test --filter RegressionTests`) and commit it with the change.
final class RegressionTests: XCTestCase {
    /// Allowed growth of a recorded error: relative, plus an absolute floor for errors near zero
    /// (BLAS kernels of another CPU round differently).
    static let relativeTolerance = 0.01
    static let absoluteTolerance = 1e-5

    struct Case {
        var name: String
        var model: String
        var calib: String
        var eval: String
        var args: [String]
    }

    static let cases: [Case] = {
        var c: [Case] = []
        // The planted fixtures, merged to their planted families (frequency: the paper's method).
        c.append(Case(name: "planted-switch merge 3 frequency", model: "planted-switch.h5", calib: "planted-switch.calib.h5",
                      eval: "planted-switch.calib.h5", args: ["--groups", "3", "--merge-method", "frequency"]))
        c.append(Case(name: "planted-mixtral merge 4 + rank 16", model: "planted-mixtral.h5", calib: "planted-mixtral.calib.h5",
                      eval: "planted-mixtral.calib.h5", args: ["--groups", "4", "--rank", "16"]))
        // The trained fixtures: every merge method, then merge + rank, merge + rank + sparsity.
        for fixture in ["trained-switch", "trained-mixtral"] {
            for method in MergeMethod.allCases {
                c.append(Case(name: "\(fixture) merge 4 \(method.rawValue)", model: fixture + ".h5", calib: fixture + ".calib.h5",
                              eval: fixture + ".heldout.h5", args: ["--groups", "4", "--merge-method", method.rawValue]))
            }
            c.append(Case(name: "\(fixture) merge 4 + rank 32", model: fixture + ".h5", calib: fixture + ".calib.h5",
                          eval: fixture + ".heldout.h5", args: ["--groups", "4", "--rank", "32"]))
            c.append(Case(name: "\(fixture) merge 4 + rank 32 weight objective", model: fixture + ".h5", calib: fixture + ".calib.h5",
                          eval: fixture + ".heldout.h5", args: ["--groups", "4", "--rank", "32", "--lowrank-objective", "weight"]))
            c.append(Case(name: "\(fixture) merge 4 + rank 16 + sparsity 0.05 activation-aware", model: fixture + ".h5",
                          calib: fixture + ".calib.h5", eval: fixture + ".heldout.h5",
                          args: ["--groups", "4", "--rank", "16", "--sparsity", "0.05", "--activation-aware"]))
        }
        return c
    }()

    static var goldenPath: String { fixture("regression.json") }

    /// Runs one case through the CLI; returns (stored expert bytes from the written file,
    /// per-layer relative errors from the report).
    func run(_ c: Case, dir: String) throws -> (bytes: Int, errors: [(String, Double)]) {
        let out = dir + "/" + c.name.replacingOccurrences(of: " ", with: "_") + ".h5"
        let res = try runCLI(["compress", fixture(c.model), "--calib", fixture(c.calib), "--eval-calib", fixture(c.eval),
                              "-o", out, "--json", "--quiet"] + c.args)
        guard res.status == 0 else { throw SMoEError("\(c.name): compress failed: \(res.stderr)") }
        let report = try XCTUnwrap(try JSONValue.parse(res.stdout)["report"])
        guard case .array(let layers)? = report["layers"] else { throw SMoEError("\(c.name): no layers in report") }
        let errors = layers.map { ($0["name"]?.stringValue ?? "?", $0["relative_error_final"]?.doubleValue ?? .nan) }
        let written = try CheckpointReader(out)
        let bytes = try written.layers.reduce(0) { $0 + (try written.summary($1.name).expertFileBytes) }
        XCTAssertEqual(bytes, report["expert_bytes_final"]?.intValue, "\(c.name): report and file disagree on bytes")
        return (bytes, errors)
    }

    func testFixturePipelinesMatchRecordedResults() throws {
        let dir = temporaryDirectory(self)
        if ProcessInfo.processInfo.environment["SMOE_REGENERATE_GOLDENS"] == "1" {
            var entries: [JSONValue] = []
            for c in Self.cases {
                let r = try run(c, dir: dir)
                entries.append(.object([
                    ("name", .string(c.name)), ("model", .string(c.model)), ("calibration", .string(c.calib)),
                    ("evaluation", .string(c.eval)), ("args", JSONValue(c.args)),
                    ("expert_bytes", .int(r.bytes)),
                    ("relative_errors", .object(r.errors.map { ($0.0, .double($0.1)) })),
                ]))
            }
            let doc: JSONValue = .object([
                ("about", "Expected results of fixed compress runs on the fixture models; checked by RegressionTests. Regenerate with `make goldens`."),
                ("tool", .string(smoeCompressVersion)), ("cases", .array(entries)),
            ])
            try (doc.serialized(pretty: true) + "\n").write(toFile: Self.goldenPath, atomically: true, encoding: .utf8)
            print("wrote \(Self.goldenPath)")
            return
        }
        let golden = try JSONValue.parse(try String(contentsOfFile: Self.goldenPath, encoding: .utf8))
        guard case .array(let recorded)? = golden["cases"] else { return XCTFail("\(Self.goldenPath): no cases") }
        XCTAssertEqual(recorded.count, Self.cases.count, "cases changed: run `make goldens`")
        for c in Self.cases {
            guard let g = recorded.first(where: { $0["name"]?.stringValue == c.name }) else {
                XCTFail("\(c.name): not in \(Self.goldenPath); run `make goldens`")
                continue
            }
            XCTAssertEqual(g["args"], JSONValue(c.args), "\(c.name): arguments changed; run `make goldens`")
            let r = try run(c, dir: dir)
            XCTAssertEqual(r.bytes, g["expert_bytes"]?.intValue, "\(c.name): stored expert bytes changed")
            for (layer, err) in r.errors {
                guard let want = g["relative_errors"]?[layer]?.doubleValue else {
                    XCTFail("\(c.name): layer \(layer) not recorded")
                    continue
                }
                let limit = want * (1 + Self.relativeTolerance) + Self.absoluteTolerance
                XCTAssertLessThanOrEqual(err, limit, "\(c.name) \(layer): error \(err) grew beyond the recorded \(want)")
            }
        }
    }
}
