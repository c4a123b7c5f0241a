import Foundation
import XCTest
@testable import SMoECompress

/// `--max-memory`: the calibration block is lowered to fit the predicted peak, or the run stops
/// up front naming the smallest budget that would work (issue 15, item 1).
final class MemoryModelTests: XCTestCase {
    func testBlockSizeFitsTheBudgetOrTheErrorNamesTheSmallest() throws {
        let model = try CheckpointReader(fixture("trained-mixtral.h5"))
        let c = model.layers[0]
        let least = MemoryModel.peakBytes(.outputAware, layer: c, blockSize: 1)
        let perToken = (c.dModel + c.dFF) * 4
        // Ample: the requested block stands.
        XCTAssertEqual(try MemoryModel.blockSize(.outputAware, model: model, layers: nil, budget: 1 << 40, requested: 4096), 4096)
        // Room for exactly 100 more tokens than one: a block of 101, and its peak fits.
        let budget = least + 100 * perToken
        let block = try MemoryModel.blockSize(.outputAware, model: model, layers: nil, budget: budget, requested: 4096)
        XCTAssertEqual(block, 101)
        XCTAssertLessThanOrEqual(MemoryModel.peakBytes(.outputAware, layer: c, blockSize: block), budget)
        XCTAssertGreaterThan(MemoryModel.peakBytes(.outputAware, layer: c, blockSize: block + 1), budget)
        // Too little: one error naming the setting and the smallest budget.
        XCTAssertThrowsError(try MemoryModel.blockSize(.outputAware, model: model, layers: nil, budget: least - 1, requested: 4096)) { e in
            XCTAssertEqual((e as? SMoEError)?.setting, .maxMemory)
            XCTAssertTrue("\(e)".contains(MemoryModel.gib(least)), "\(e)")
        }
        // The stages' needs are ordered as measured: statistics < alignment < output-aware merging.
        XCTAssertLessThan(MemoryModel.peakBytes(.statistics, layer: c, blockSize: 1), MemoryModel.peakBytes(.alignment, layer: c, blockSize: 1))
        XCTAssertLessThan(MemoryModel.peakBytes(.alignment, layer: c, blockSize: 1), least)
    }

    func testCommandLineBudget() throws {
        let dir = temporaryDirectory(self)
        let m = fixture("trained-mixtral.h5"), c = fixture("trained-mixtral.calib.h5")
        let small = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--max-memory", "1MiB", "-o", dir + "/x.h5", "--quiet"])
        XCTAssertEqual(small.status, 1)
        XCTAssertTrue(small.stderr.hasPrefix("error: --max-memory: 0.00 GiB is too little: layer ") && small.stderr.split(separator: "\n").count == 1,
                      small.stderr)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/x.h5"))
        let ok = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--max-memory", "8GiB", "-o", dir + "/m.h5", "--json", "--quiet"])
        XCTAssertEqual(ok.status, 0, ok.stderr)
        let bad = try runCLI(["merge", m, "--calib", c, "--groups", "4", "--max-memory", "lots", "-o", dir + "/y.h5", "--quiet"])
        XCTAssertTrue(bad.stderr.hasPrefix("error: --max-memory: 'lots' is not a size"), bad.stderr)
    }
}
