import CLinAlg
import Dispatch
import Foundation

/// Matrix products through OpenBLAS `cblas_sgemm` / `cblas_dgemm`.
public enum BLAS {
    /// `C = alpha · op(A) · op(B) + beta · C`, row-major. `C` must already have the result shape.
    public static func gemm(
        _ a: Matrix, transA: Bool = false, _ b: Matrix, transB: Bool = false,
        alpha: Float = 1, beta: Float = 0, into c: inout Matrix
    ) {
        let m = transA ? a.cols : a.rows
        let k = transA ? a.rows : a.cols
        let kb = transB ? b.cols : b.rows
        let n = transB ? b.rows : b.cols
        precondition(k == kb, "gemm inner dimensions \(k) != \(kb)")
        precondition(c.rows == m && c.cols == n, "gemm output shape \(c.rows)x\(c.cols) != \(m)x\(n)")
        if m == 0 || n == 0 { return }
        if k == 0 {
            if beta == 0 { for i in 0..<c.data.count { c.data[i] = 0 } } else if beta != 1 {
                for i in 0..<c.data.count { c.data[i] *= beta }
            }
            return
        }
        a.data.withUnsafeBufferPointer { pa in
            b.data.withUnsafeBufferPointer { pb in
                c.data.withUnsafeMutableBufferPointer { pc in
                    cblas_sgemm(
                        CblasRowMajor, transA ? CblasTrans : CblasNoTrans,
                        transB ? CblasTrans : CblasNoTrans,
                        Int32(m), Int32(n), Int32(k), alpha,
                        pa.baseAddress, Int32(max(a.cols, 1)),
                        pb.baseAddress, Int32(max(b.cols, 1)),
                        beta, pc.baseAddress, Int32(max(n, 1)))
                }
            }
        }
    }

    /// `op(A) · op(B)` as a new matrix.
    public static func matmul(_ a: Matrix, transA: Bool = false, _ b: Matrix, transB: Bool = false) -> Matrix {
        let m = transA ? a.cols : a.rows
        let n = transB ? b.rows : b.cols
        var c = Matrix(rows: m, cols: n)
        gemm(a, transA: transA, b, transB: transB, into: &c)
        return c
    }

    /// Row-major double-precision `C += alpha · op(A) · op(B)` over raw buffers (used for
    /// float64 accumulation of Gram matrices). `c` has shape m × n.
    public static func dgemmAccumulate(
        m: Int, n: Int, k: Int, alpha: Double = 1,
        a: [Double], transA: Bool, lda: Int, b: [Double], transB: Bool, ldb: Int,
        into c: inout [Double]
    ) {
        precondition(c.count == m * n)
        if m == 0 || n == 0 || k == 0 { return }
        a.withUnsafeBufferPointer { pa in
            b.withUnsafeBufferPointer { pb in
                c.withUnsafeMutableBufferPointer { pc in
                    cblas_dgemm(
                        CblasRowMajor, transA ? CblasTrans : CblasNoTrans,
                        transB ? CblasTrans : CblasNoTrans,
                        Int32(m), Int32(n), Int32(k), alpha,
                        pa.baseAddress, Int32(lda), pb.baseAddress, Int32(ldb),
                        1, pc.baseAddress, Int32(n))
                }
            }
        }
    }

    /// Sets the number of OpenBLAS threads (1 when the caller parallelises itself).
    public static func setThreads(_ n: Int) { openblas_set_num_threads(Int32(n)) }

    /// `work(i)` for i in 0..<n, results in index order: several items run in parallel with
    /// one BLAS thread each (the cores go to the items), a single one on this thread with BLAS's
    /// own threads. `work` must make no HDF5 call (read the inputs first, on this thread); the
    /// first failure in index order is thrown.
    public static func perform<T: Sendable>(_ n: Int, _ work: @Sendable (Int) throws -> T) throws -> [T] {
        guard n > 1 else { return try (0..<n).map(work) }
        let slots = ResultSlots<T>(count: n)
        let saved = threads
        setThreads(1)
        DispatchQueue.concurrentPerform(iterations: n) { i in slots.set(i, Result { try work(i) }) }
        setThreads(saved)
        return try slots.values.map { try $0!.get() }
    }
    public static var threads: Int { Int(openblas_get_num_threads()) }
    /// The OpenBLAS kernel in use (e.g. "Haswell"), for benchmark reports.
    public static var coreName: String { String(cString: openblas_get_corename()) }

    /// The OpenBLAS core to ask for instead of the one it picked, or nil to keep it. OpenBLAS
    /// older than the CPU (Debian 12 ships 0.3.21) does not recognise it and falls back to its
    /// generic Prescott kernels, ~3× slower; the CPU's instruction set then names the nearest
    /// core it has: AVX-512 → SkylakeX, AVX2 → Haswell. A user's own OPENBLAS_CORETYPE is kept.
    public static func preferredCore(current: String, cpuFlags: Set<Substring>, environment: [String: String]) -> String? {
        guard environment["OPENBLAS_CORETYPE"] == nil, current == "Prescott" else { return nil }
        if cpuFlags.contains("avx512f") && cpuFlags.contains("avx512bw") && cpuFlags.contains("avx512vl") { return "SkylakeX" }
        if cpuFlags.contains("avx2") && cpuFlags.contains("fma") { return "Haswell" }
        return nil
    }

    /// Runs the process again with OPENBLAS_CORETYPE set when OpenBLAS picked its generic kernels
    /// on a CPU it does not know but whose instruction set matches one of its cores
    /// (`preferredCore`): the variable is read when libopenblas loads, so only a new process sees
    /// it. OPENBLAS_CORETYPE set by the user is left alone (OPENBLAS_CORETYPE=Prescott keeps the
    /// generic kernels). Call it first thing in `main` (smoe-compress and smoe-bench do); returns
    /// only when nothing is to be done or exec failed.
    public static func chooseCore() {
        let env = ProcessInfo.processInfo.environment
        guard let core = preferredCore(current: coreName, cpuFlags: cpuFlags(), environment: env) else { return }
        setenv("OPENBLAS_CORETYPE", core, 1)
        setenv(coreChosenVariable, core, 1)
        execv("/proc/self/exe", CommandLine.unsafeArgv)
        // exec failed: carry on with the kernels OpenBLAS picked.
        unsetenv("OPENBLAS_CORETYPE")
        unsetenv(coreChosenVariable)
    }

    /// Set (to the core) in a process that `chooseCore` started, so it can say so.
    public static let coreChosenVariable = "SMOE_BLAS_CORE_CHOSEN"

    /// The flags of the first CPU in /proc/cpuinfo (empty where it cannot be read).
    public static func cpuFlags(cpuinfo path: String = "/proc/cpuinfo") -> Set<Substring> {
        guard let info = try? String(contentsOfFile: path, encoding: .utf8),
              let line = info.split(separator: "\n").first(where: { $0.hasPrefix("flags") }) else { return [] }
        return Set(line.split(separator: " "))
    }
}

/// Matrix product shorthand: `a * b` is `BLAS.matmul(a, b)`.
public func * (a: Matrix, b: Matrix) -> Matrix { BLAS.matmul(a, b) }

/// `BLAS.perform`'s results, each set once by its worker.
private final class ResultSlots<T>: @unchecked Sendable {
    private let lock = NSLock()
    private(set) var values: [Result<T, Error>?]

    init(count: Int) { values = .init(repeating: nil, count: count) }

    func set(_ i: Int, _ v: Result<T, Error>) {
        lock.lock()
        values[i] = v
        lock.unlock()
    }
}
