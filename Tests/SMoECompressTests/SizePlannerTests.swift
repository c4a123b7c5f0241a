import Foundation
import XCTest
@testable import SMoECompress

/// `compress --target-size` (ALGORITHM.md §4.3). The full comparison on both trained fixtures
/// at 50 % and 25 % is `smoe-bench fidelity` (README, merging section); here one fixture at 50 %
/// with fewer candidates, to stay well under 20 s in a debug build.
final class SizePlannerTests: XCTestCase {
    let model = try! CheckpointReader(fixture("trained-switch.h5"))
    let calib = try! CalibrationReader(fixture("trained-switch.calib.h5"))
    let heldout = try! CalibrationReader(fixture("trained-switch.heldout.h5"))

    func run(_ settings: CompressSettings) throws -> (report: CompressReport, plan: SizePlan?) {
        let stage = try CompressStage(model: model, calibration: calib, evaluation: heldout, stats: nil, settings: settings, storage: .f16)
        return (stage.report(try stage.run(model: model) { _ in }.reports), stage.plan)
    }

    /// At half the expert bytes the plan fits, and its held-out error is at or below the best
    /// uniform grid point that fits (G 8, rank 16, 442,880 B: `smoe-bench fidelity` sweeps G 1…8 ×
    /// ranks 4…40) and well below merging alone at that size (G 4, the largest that fits).
    func testHalfSizeBeatsTheBestUniformPointAndMerging() throws {
        var settings = CompressSettings(merge: MergeSettings(groups: 1), lowRank: nil)
        var planner = PlannerSettings(target: .fraction(0.5), groupCandidates: [6, 8])
        planner.levels = 8
        settings.target = planner
        let (planned, plan) = try run(settings)
        let budget = 1_048_576 / 2
        XCTAssertLessThanOrEqual(planned.bytesFinal, budget)
        XCTAssertEqual(planned.bytesFinal, plan?.bytes, "the run stores what was planned")
        let grid = try run(CompressSettings(merge: MergeSettings(groups: 8), lowRank: LowRankOptions(rank: .fixed(16)))).report
        let merged = try run(CompressSettings(merge: MergeSettings(groups: 4), lowRank: nil)).report
        XCTAssertLessThanOrEqual(grid.bytesFinal, budget)
        XCTAssertLessThanOrEqual(planned.evaluation.meanRelativeError, grid.evaluation.meanRelativeError)
        XCTAssertLessThan(planned.evaluation.meanRelativeError, 0.6 * merged.evaluation.meanRelativeError)
    }

    /// The plan is a deterministic value; one G everywhere when asked; never over budget; a
    /// budget below the smallest option is one error naming the setting.
    func testPlanIsDeterministicUniformAndWithinBudget() throws {
        var s = PlannerSettings(target: .fraction(0.3), groupCandidates: [2, 4], uniformGroups: true)
        s.levels = 4
        let lr = LowRankOptions(rank: .fixed(1), floatBytes: 2)
        let plan = { try SizePlanner.plan(model: self.model, calibration: self.calib, stats: nil, merge: MergeSettings(groups: 1),
                                          lowRank: lr, settings: s, storage: .f16) }
        let a = try plan(), b = try plan()
        XCTAssertEqual(a, b)
        XCTAssertEqual(Set(a.layers.map(\.groups)).count, 1)
        XCTAssertLessThanOrEqual(a.bytes, a.budget)
        s.target = .bytes(1000)
        XCTAssertThrowsError(try plan()) { XCTAssertEqual(($0 as? SMoEError)?.setting, .targetSize) }
    }

    func testTargetSizeParsing() throws {
        XCTAssertEqual(try TargetSize.parse("0.25"), .fraction(0.25))
        XCTAssertEqual(try TargetSize.parse("20GB"), .bytes(20_000_000_000))
        XCTAssertEqual(try TargetSize.parse("300000"), .bytes(300_000))
        XCTAssertThrowsError(try TargetSize.parse("0")) { XCTAssertEqual(($0 as? SMoEError)?.setting, .targetSize) }
        XCTAssertThrowsError(try TargetSize.parse("big")) { XCTAssertEqual(($0 as? SMoEError)?.setting, .targetSize) }
    }

    /// `--plan-only` prints the plan and writes nothing.
    func testPlanOnlyWritesNothing() throws {
        let out = temporaryDirectory(self) + "/never.h5"
        let res = try runCLI(["compress", fixture("trained-switch.h5"), "--calib", fixture("trained-switch.calib.h5"),
                              "--target-size", "0.5", "--groups", "8", "--plan-only", "--json", "--quiet", "-o", out])
        XCTAssertEqual(res.status, 0, res.stderr)
        let plan = try XCTUnwrap(try JSONValue.parse(res.stdout)["plan"])
        XCTAssertLessThanOrEqual(try XCTUnwrap(plan["expert_bytes"]?.intValue), 524_288)
        XCTAssertFalse(FileManager.default.fileExists(atPath: out))
    }
}
