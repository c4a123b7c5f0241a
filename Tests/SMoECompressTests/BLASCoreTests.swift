import Foundation
import XCTest
@testable import SMoECompress

/// The OpenBLAS core the tool asks for on a CPU its OpenBLAS does not know (issue 15, item 6).
final class BLASCoreTests: XCTestCase {
    func testPreferredCoreFollowsTheInstructionSet() {
        let avx512: Set<Substring> = ["fma", "avx2", "avx512f", "avx512bw", "avx512vl"]
        let avx2: Set<Substring> = ["fma", "avx2"]
        XCTAssertEqual(BLAS.preferredCore(current: "Prescott", cpuFlags: avx512, environment: [:]), "SkylakeX")
        XCTAssertEqual(BLAS.preferredCore(current: "Prescott", cpuFlags: avx2, environment: [:]), "Haswell")
        XCTAssertNil(BLAS.preferredCore(current: "Prescott", cpuFlags: ["sse2"], environment: [:]), "nothing better known")
        XCTAssertNil(BLAS.preferredCore(current: "Zen", cpuFlags: avx512, environment: [:]), "OpenBLAS recognised the CPU")
        XCTAssertNil(BLAS.preferredCore(current: "Prescott", cpuFlags: avx512, environment: ["OPENBLAS_CORETYPE": "Prescott"]),
                     "the user's choice stands")
    }

    /// Whatever kernels the tool picks, results agree with the generic kernels to float rounding:
    /// the same stored bytes and layer errors within 1e-4 relative (products summed in another
    /// order; the merge solves and SVDs amplify that little on these well-conditioned fixtures).
    func testChosenKernelsAgreeWithTheGenericOnes() throws {
        let dir = temporaryDirectory(self)
        func run(_ env: [String: String?], _ out: String) throws -> JSONValue {
            let r = try runCLI(["compress", fixture("trained-mixtral.h5"), "--calib", fixture("trained-mixtral.calib.h5"),
                                "--eval-calib", fixture("trained-mixtral.heldout.h5"), "--groups", "4", "--rank", "16",
                                "-o", dir + "/" + out, "--json", "--quiet"], environment: env)
            XCTAssertEqual(r.status, 0, r.stderr)
            return try XCTUnwrap(try JSONValue.parse(r.stdout)["report"])
        }
        let generic = try run(["OPENBLAS_CORETYPE": "Prescott"], "g.h5")
        let chosen = try run(["OPENBLAS_CORETYPE": nil], "c.h5")
        XCTAssertEqual(generic["expert_bytes_final"]?.intValue, chosen["expert_bytes_final"]?.intValue)
        for key in ["mean_relative_error_merged", "mean_relative_error_final"] {
            let a = try XCTUnwrap(generic[key]?.doubleValue), b = try XCTUnwrap(chosen[key]?.doubleValue)
            XCTAssertEqual(a, b, accuracy: 1e-4 * a, key)
        }
    }
}
