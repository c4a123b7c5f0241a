import Foundation
import XCTest
@testable import SMoECompress

/// Every value `import` reads from config.json is checked for type and range; each problem is
/// one error line naming the file and the key, and nothing is written.
final class ConfigValidationTests: XCTestCase {
    /// A fake model of `kind` whose config.json has `key` set to the raw JSON text `value`
    /// (added when absent), or `key` given twice when `duplicate` is set.
    func makeModel(_ dir: String, _ kind: FakeFamily, key: String, value: String, duplicate: Bool = false) throws -> String {
        let (tensors, source) = fakeModel(kind, dtype: .F32)
        let marker = "@@value@@"
        var config = source.filter { duplicate || $0.0 != key }
        config.append((key, .string(marker)))
        let src = dir + "/model"
        try writeFakeModel(src, tensors, config: config)
        let text = try String(contentsOfFile: src + "/config.json", encoding: .utf8)
        try text.replacingOccurrences(of: "\"\(marker)\"", with: value).write(toFile: src + "/config.json", atomically: true, encoding: .utf8)
        return src
    }

    func expectError(_ kind: FakeFamily = .mixtral, key: String, value: String, duplicate: Bool = false,
                     mentions: [String] = [], line: UInt = #line) throws {
        let dir = temporaryDirectory(self)
        let src = try makeModel(dir, kind, key: key, value: value, duplicate: duplicate)
        let out = dir + "/out.h5"
        XCTAssertThrowsError(try HFImport.run(directory: src, output: out), "\(key) = \(value)", line: line) { e in
            guard let s = e as? SMoEError else { return XCTFail("not an SMoEError: \(e)", line: line) }
            XCTAssertFalse(s.message.contains("\n"), line: line)
            XCTAssertTrue(s.message.hasPrefix(src + "/config.json: \(key): "), "\(s.message) names the file and the key", line: line)
            for m in mentions { XCTAssertTrue(s.message.contains(m), "\(s.message) should mention \(m)", line: line) }
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [URL(fileURLWithPath: src).lastPathComponent], "nothing written", line: line)
    }

    func testCountsMustBePositiveIntegersWithinTheLimit() throws {
        for value in ["8.5", "\"8\"", "8.0", "0", "-4", "9223372036854775808", "1e300", "-1e300", "null", "true", "[8]", "1048577"] {
            try expectError(key: "num_local_experts", value: value, mentions: ["must be an integer from 1 to 1048576, not"])
            try expectError(key: "num_experts_per_tok", value: value, mentions: ["must be an integer from 1 to 1048576, not"])
        }
        try expectError(.olmoe, key: "num_experts", value: "4.5", mentions: ["not 4.5"])
        try expectError(.deepseek, key: "n_routed_experts", value: "1e300", mentions: ["not 1e+300"])
        try expectError(.deepseek, key: "n_routed_experts", value: "-1e999", mentions: ["not -inf"])
        try expectError(.switchT, key: "num_experts", value: "\"4\"", mentions: ["not \"4\""])
    }

    func testTopKIsRequiredWhereTheFamilyReadsIt() throws {
        let dir = temporaryDirectory(self)
        let (tensors, source) = fakeModel(.qwen2, dtype: .F32)
        var config = source
        config.removeAll { $0.0 == "num_experts_per_tok" }
        try writeFakeModel(dir + "/m", tensors, config: config)
        XCTAssertThrowsError(try HFImport.run(directory: dir + "/m", output: dir + "/o.h5")) { e in
            XCTAssertTrue("\(e)".hasPrefix(dir + "/m/config.json: num_experts_per_tok: missing"), "\(e)")
        }
        // SwitchTransformers routes to one expert and has no such key: the fake config lacks it.
        XCTAssertNil(JSONValue.object(fakeModel(.switchT, dtype: .F32).config)["num_experts_per_tok"])
    }

    func testActivationMustBeANamedString() throws {
        for value in ["7", "null", "[\"silu\"]", "{}"] {
            try expectError(key: "hidden_act", value: value, mentions: ["must be a string, not \(value)"])
        }
        try expectError(.switchT, key: "dense_act_fn", value: "null", mentions: ["must be a string, not null"])
        try expectError(key: "hidden_act", value: "\"tanh\"", mentions: ["activation \"tanh\" is not supported"])
    }

    func testOtherReadValuesAreTypeChecked() throws {
        try expectError(key: "model_type", value: "7", mentions: ["must be a string, not 7"])
        try expectError(.qwen2, key: "norm_topk_prob", value: "\"yes\"", mentions: ["must be true or false"])
        try expectError(.deepseek, key: "routed_scaling_factor", value: "\"1\"", mentions: ["must be a finite number, not \"1\""])
        try expectError(.deepseek, key: "routed_scaling_factor", value: "1e999", mentions: ["must be a finite number, not inf"])
        try expectError(.deepseek, key: "routed_scaling_factor", value: "2.5", mentions: ["2.5 is not supported (1.0 only)"])
        try expectError(.deepseek, key: "scoring_func", value: "null", mentions: ["must be a string, not null"])
        try expectError(.deepseek, key: "topk_method", value: "\"noaux_tc\"", mentions: ["\"noaux_tc\" routing is not supported (greedy only)"])
    }

    /// transformers takes the last of duplicate keys; the tool refuses them rather than guess.
    func testDuplicateKeysAreRefused() throws {
        try expectError(key: "num_local_experts", value: "4", duplicate: true, mentions: ["appears twice"])
        try expectError(key: "hidden_act", value: "\"relu\"", duplicate: true, mentions: ["appears twice"])
        // A key read by no one is refused too, nested keys named by their path.
        let dir = temporaryDirectory(self)
        let src = try makeModel(dir, .mixtral, key: "rope_scaling", value: #"{"type": "linear", "factor": 2, "factor": 4}"#)
        XCTAssertThrowsError(try HFImport.run(directory: src, output: dir + "/o.h5")) { e in
            XCTAssertEqual("\(e)", src + "/config.json: rope_scaling.factor: appears twice (a duplicate key is ambiguous: transformers takes the last)")
        }
        XCTAssertEqual(JSONValue.object([("a", [["b": 1], .object([("c", 1), ("c", 2)])])]).firstDuplicateKey(), "a[1].c")
        XCTAssertNil(JSONValue.object([("a", ["c": 1]), ("b", ["c": 1])]).firstDuplicateKey())
    }

    /// Valid values still import: the largest count accepted, and `null` for norm_topk_prob
    /// (false, as transformers reads it).
    func testValidEdgeValuesImport() throws {
        let dir = temporaryDirectory(self)
        let src = try makeModel(dir, .qwen2, key: "norm_topk_prob", value: "null")
        XCTAssertEqual(try HFImport.run(directory: src, output: dir + "/o.h5").layers.first?.routerType, .softmax_topk)
        XCTAssertEqual(try ConfigFile(#"{"n": 1048576}"#, path: "c").count("n"), 1 << 20)
        XCTAssertNil(try ConfigFile(#"{"n": 1}"#, path: "c").count("m"))
    }

    /// Through the command line the values that used to trap ("Double value cannot be converted
    /// to Int") end in exit status 1, one `error:` line naming file and key, and no output.
    func testCLIRefusesHugeNumbersWithOneLine() throws {
        for value in ["9223372036854775808", "1e300"] {
            let dir = temporaryDirectory(self)
            let src = try makeModel(dir, .mixtral, key: "num_local_experts", value: value)
            let outs = dir + "/outs"
            try FileManager.default.createDirectory(atPath: outs, withIntermediateDirectories: false)
            let r = try runCLI(["import", src, "-o", outs + "/m.h5"])
            XCTAssertEqual(r.status, 1, r.stderr)
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            XCTAssertTrue(r.stderr.hasPrefix("error: ") && r.stderr.contains(src + "/config.json: num_local_experts: "), r.stderr)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: outs), [])
        }
    }
}
