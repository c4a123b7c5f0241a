import Foundation
import XCTest
@testable import SMoECompress

/// The repository's Fixtures/ folder.
let fixturesDir: String = {
    URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fixtures").path
}()

func fixture(_ name: String) -> String { fixturesDir + "/" + name }

/// A fresh temporary folder, removed when the test ends.
func temporaryDirectory(_ test: XCTestCase) -> String {
    let dir = NSTemporaryDirectory() + "smoe-test-" + UUID().uuidString
    try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    test.addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
    return dir
}

func randomMatrix(_ rows: Int, _ cols: Int, _ rng: inout SplitMix64, scale: Float = 1) -> Matrix {
    Matrix(rows: rows, cols: cols, data: (0..<(rows * cols)).map { _ in Float(rng.nextGaussian()) * scale })
}

/// A random layer for tests: any expert type, router type, optional biases and expert map.
func randomLayer(_ rng: inout SplitMix64, type: ExpertType, router: RouterType, activation: Activation = .silu,
                 E: Int = 6, G: Int? = nil, k: Int = 2, d: Int = 12, f: Int = 20, biases: Bool = false) -> MoELayer {
    let g = G ?? E
    let experts = (0..<g).map { _ in
        Expert(up: randomMatrix(f, d, &rng, scale: 0.3), gate: type == .glu ? randomMatrix(f, d, &rng, scale: 0.3) : nil,
               down: randomMatrix(d, f, &rng, scale: 0.3),
               upBias: biases ? (0..<f).map { _ in Float(rng.nextGaussian()) * 0.1 } : nil,
               downBias: biases ? (0..<d).map { _ in Float(rng.nextGaussian()) * 0.1 } : nil)
    }
    let map: [Int]? = g == E ? nil : (0..<E).map { $0 < g ? $0 : rng.nextInt(below: g) }
    let config = LayerConfig(name: "layers.0.moe", index: 0, numExperts: E, topK: k, dModel: d, dFF: f,
                             expertType: type, activation: activation, routerType: router)
    return MoELayer(config: config, router: randomMatrix(E, d, &rng), routerBias: biases ? (0..<E).map { _ in Float(rng.nextGaussian()) } : nil,
                    experts: experts, expertMap: map)
}

/// Result of running the command-line tool.
struct CLIResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs the built `smoe-compress` executable (next to the test bundle); `environment` entries
/// are added to (nil: removed from) the environment it gets.
func runCLI(_ args: [String], cwd: String? = nil, environment: [String: String?] = [:]) throws -> CLIResult {
    let exe = productsDirectory.appendingPathComponent("smoe-compress")
    let p = Process()
    p.executableURL = exe
    p.arguments = args
    if let c = cwd { p.currentDirectoryURL = URL(fileURLWithPath: c) }
    // The tool runs with the OpenBLAS kernels of this test process (unless a test asks
    // otherwise), so its results can be compared bit for bit with the library's in-process ones;
    // left to itself it may pick faster kernels (`BLAS.preferredCore`).
    var env = ProcessInfo.processInfo.environment
    env["OPENBLAS_CORETYPE"] = env["OPENBLAS_CORETYPE"] ?? BLAS.coreName
    for (k, v) in environment { env[k] = v }
    p.environment = env
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return CLIResult(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
}

var productsDirectory: URL {
    for bundle in Bundle.allBundles where bundle.bundlePath.hasSuffix(".xctest") {
        return bundle.bundleURL.deletingLastPathComponent()
    }
    return Bundle.main.bundleURL
}

/// Whether `python3 -c "import <module>"` works.
func pythonHas(_ module: String) -> Bool {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = ["python3", "-c", "import \(module)"]
    p.standardOutput = FileHandle.nullDevice
    p.standardError = FileHandle.nullDevice
    do { try p.run() } catch { return false }
    p.waitUntilExit()
    return p.terminationStatus == 0
}

/// Runs a python3 script with arguments; returns stdout or fails the test.
func runPython(_ script: String, _ args: [String] = [], file: StaticString = #filePath, line: UInt = #line) throws -> String {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = ["python3", "-c", script] + args
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    try p.run()
    let o = out.fileHandleForReading.readDataToEndOfFile()
    let e = err.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    if p.terminationStatus != 0 {
        XCTFail("python failed: \(String(decoding: e, as: UTF8.self))", file: file, line: line)
    }
    return String(decoding: o, as: UTF8.self)
}
