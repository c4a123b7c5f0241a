import Foundation


/// Which entries of the residual the sparse part keeps.
public enum SparseStructure: String, Sendable, CaseIterable {
    /// The individually largest entries (by |S_ij|, or |S_ij|·‖X_j‖ with input norms).
    case unstructured
    /// Whole rows, ranked by the mean |residual| of the row (the published method's one-shot form).
    case row
}

/// How the truncated SVD is computed.
public enum SVDMethod: String, Sendable, CaseIterable {
    /// Randomized when the rank is small next to the matrix (see `LowRankOptions.prefersRandomized`).
    case auto
    /// LAPACK `sgesdd` of the whole matrix.
    case exact
    /// Range finder with oversampling and power iterations (QR re-orthonormalised), seeded.
    case randomized
    /// The r largest eigenpairs of the smaller Gram (float64 `dsyrk` + `dsyevr`), then one
    /// product for the other side (ALGORITHM.md §4); without `auto`'s a-posteriori fallback.
    case gram
}

/// The expert matrices a stage may touch.
public enum ExpertMatrixName: String, Sendable, CaseIterable, Hashable, Comparable {
    case up, gate, down

    public static func < (a: Self, b: Self) -> Bool { allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)! }
}

/// How many singular values a factored matrix keeps.
public enum RankRule: Sendable, Equatable {
    /// The same rank for every factored matrix.
    case fixed(Int)
    /// Per matrix, the smallest rank keeping this fraction (0, 1] of the squared singular values.
    case energy(Double)
}

/// Settings of the low-rank plus sparse stage (ALGORITHM.md §4).
public struct LowRankOptions: Sendable {
    public var rank: RankRule
    /// Fraction of each matrix's entries kept in the sparse part S (0 = pure low rank).
    public var sparsity: Double = 0
    public var structure: SparseStructure = .unstructured
    /// Alternating refinements (S from W − U·V, then U·V from the rank-r SVD of W − S); the best
    /// iterate is kept, so the error never increases.
    public var iterations: Int = 0
    /// Matrices to compress; the others are left as they are.
    public var matrices: Set<ExpertMatrixName> = Set(ExpertMatrixName.allCases)
    public var svd: SVDMethod = .auto
    /// Randomized SVD: extra columns of the sketch and power iterations.
    public var oversampling: Int = 10
    public var powerIterations: Int = 2
    /// Seed of the randomized SVD's test matrices (each matrix derives its own from it).
    public var seed: UInt64 = 0
    /// Float width on disk, for the kept-dense decision (4 = float32, 2 = float16).
    public var floatBytes: Int = 4
    /// What U·V minimises; nil: the output error when the stage has calibration tokens, else the
    /// weight error (`objective(hasTokens:)`).
    public var objective: LowRankObjective? = nil
    /// The whitening ridge relative to the mean diagonal of the input Gram (`Whitening`).
    public var whiteningRidge: Double = Whitening.defaultRelativeRidge
    /// Per matrix and stored expert, a rank that overrides `rank` (from a budget allocation,
    /// `RankAllocation`); keyed by `rankKey`.
    public var ranks: [String: Int] = [:]

    public init(rank: RankRule, sparsity: Double = 0, structure: SparseStructure = .unstructured,
                iterations: Int = 0, matrices: Set<ExpertMatrixName> = Set(ExpertMatrixName.allCases), svd: SVDMethod = .auto,
                seed: UInt64 = 0, floatBytes: Int = 4, objective: LowRankObjective? = nil) {
        self.rank = rank
        self.sparsity = sparsity
        self.structure = structure
        self.iterations = iterations
        self.matrices = matrices
        self.svd = svd
        self.seed = seed
        self.floatBytes = floatBytes
        self.objective = objective
    }

    /// The largest rank any matrix can get (nil with an energy rule: not known before the SVD).
    public var largestRank: Int? {
        guard case .fixed(let r) = rank else { return nil }
        return max(r, ranks.values.max() ?? 0)
    }

    /// What `lowrank` needs in memory per layer (`MemoryModel`), with or without calibration.
    public func memoryWork(hasTokens: Bool) -> MemoryModel.Work {
        .lowRank(streams: !hasTokens || objective(hasTokens: true) == .output, rank: largestRank, sparsity: sparsity,
                 largeGram: needsLargeGram(hasTokens: hasTokens))
    }

    /// Whether some matrix may be whitened through the Gram of inputs on the larger side of the
    /// layer (d_ff² for down when d_ff > d_model, `MemoryModel`): whitened (output objective with
    /// tokens) and the output Gram not taken for matrices with fewer outputs than inputs
    /// (`factorsByOutputGram`: a sparse part or `--svd exact`).
    public func needsLargeGram(hasTokens: Bool) -> Bool {
        hasTokens && objective(hasTokens: true) == .output && !factorsByOutputGram(rows: 1, cols: 2)
    }

    /// The objective in force: the one asked for, else output when calibration tokens exist.
    public func objective(hasTokens: Bool) -> LowRankObjective { objective ?? (hasTokens ? .output : .weight) }

    /// The key of one matrix of one stored expert in `ranks` ("up/3").
    public static func rankKey(_ matrix: ExpertMatrixName, expert: Int) -> String { "\(matrix.rawValue)/\(expert)" }

    /// Checks the settings that do not depend on a matrix's shape (a stage does, once, at entry;
    /// `factor` checks the rank against each matrix's shape).
    public func validate() throws {
        switch rank {
        case .fixed(let r): if r <= 0 { throw SMoEError.setting(.rank, "must be at least 1 (got \(r))") }
        case .energy(let f): if !(f > 0 && f <= 1) { throw SMoEError.setting(.energy, "must be in (0, 1] (got \(f))") }
        }
        if !(sparsity >= 0 && sparsity <= 1) { throw SMoEError.setting(.sparsity, "must be in [0, 1] (got \(sparsity))") }
        if iterations < 0 { throw SMoEError.setting(.iterations, "must be at least 0 (got \(iterations))") }
        if matrices.isEmpty { throw SMoEError.setting(.matrices, "names no matrix (up, gate, down)") }
        if oversampling < 0 || powerIterations < 0 { throw SMoEError.setting(.svd, "oversampling and power iterations must be ≥ 0") }
        if floatBytes != 2 && floatBytes != 4 { throw SMoEError.setting(.storage, "float width must be 2 or 4 bytes") }
        if !(whiteningRidge >= 0 && whiteningRidge.isFinite) {
            throw SMoEError.setting(.whiteningRidge, "must be a finite number ≥ 0 (got \(whiteningRidge))")
        }
        if let bad = ranks.first(where: { $0.value < 1 }) { throw SMoEError.setting(.rank, "\(bad.key): must be at least 1 (got \(bad.value))") }
    }

    /// The `auto` rule: randomized when the sketch (rank + oversampling) is at most a quarter of
    /// min(out, in). From `smoe-bench lowrank`: at that size the randomized SVD is ≥ 3× faster
    /// than `sgesdd` and its error stays within 0.1% of the optimum on decaying spectra.
    public func prefersRandomized(rank r: Int, rows: Int, cols: Int) -> Bool {
        let p = min(rows, cols)
        switch svd {
        case .exact, .gram: return false
        case .randomized: return r + oversampling < p
        case .auto: return 4 * (r + oversampling) <= p
        }
    }

    /// The smallest min(out, in) at which `auto` takes the Gram eigendecomposition instead of
    /// `sgesdd` where it does not take the randomized one (ALGORITHM.md §4, `smoe-bench factor`).
    public static let gramMinDimension = 1024

    /// The smallest Gram dimension at which `auto` takes the r leading eigenpairs by float32
    /// `ssyevr` first (checked, falling back to `dsyevr`; ALGORITHM.md §4): where `dsyevr` costs
    /// seconds (about 20 CPU s at 4096). Below it `dsyevr` takes well under a second and the
    /// fixtures' results (and the regression goldens) stay those of the float64 solver.
    public static let float32EigenMinDimension = 1024

    /// Whether the rank-r factorisation goes through the Gram eigendecomposition: always with
    /// `gram`, with `auto` when the randomized one is not taken and min(out, in) ≥
    /// `gramMinDimension` (then with the a-posteriori check and its fallback to `sgesdd`).
    public func prefersGram(rank r: Int, rows: Int, cols: Int) -> Bool {
        switch svd {
        case .exact, .randomized: return false
        case .gram: return true
        case .auto: return !prefersRandomized(rank: r, rows: rows, cols: cols) && min(rows, cols) >= Self.gramMinDimension
        }
    }

    /// Whether a whitened [rows, cols] matrix is factored through its output Gram
    /// (`OutputGram`, ALGORITHM.md §4.1) instead of its input Gram: when it has fewer outputs
    /// than inputs (every expert's down when d_ff > d_model), no sparse part (so no refinements,
    /// which refactor W − S), and `--svd` is not `exact` (kept on the input Gram's exact path, the
    /// reference the Eckart–Young tests check). `randomized` and `gram` ask for a faster route to
    /// the same optimum, which the output Gram gives at the lower cost. Any rank rule.
    public func factorsByOutputGram(rows: Int, cols: Int) -> Bool { rows < cols && sparsity == 0 && svd != .exact }

    /// The entries S keeps for an [out, in] matrix: round(sparsity·out·in) unstructured, or
    /// round(sparsity·out) whole rows of `in` entries with `.row`.
    public func sparseBudget(rows: Int, cols: Int) -> Int {
        switch structure {
        case .unstructured: return Int((sparsity * Double(rows * cols)).rounded())
        case .row: return Int((sparsity * Double(rows)).rounded()) * cols
        }
    }

    public var historyJSON: [(String, JSONValue)] {
        var kv: [(String, JSONValue)] = []
        switch rank {
        case .fixed(let r): kv.append(("rank", .int(r)))
        case .energy(let f): kv.append(("energy", .double(f)))
        }
        kv += [("sparsity", .double(sparsity)), ("sparse_structure", .string(structure.rawValue)),
               ("iterations", .int(iterations)), ("matrices", JSONValue(matrices.sorted().map(\.rawValue))),
               ("svd", .string(svd.rawValue))]
        if let o = objective { kv.append(("objective", .string(o.rawValue))) }
        if objective != .weight { kv.append(("whitening_ridge", .double(whiteningRidge))) }
        if !ranks.isEmpty { kv.append(("allocated_ranks", .object(ranks.sorted { $0.key < $1.key }.map { ($0.key, .int($0.value)) }))) }
        if svd != .exact { kv += [("seed", .int(Int(truncatingIfNeeded: seed))), ("oversampling", .int(oversampling)), ("power_iterations", .int(powerIterations))] }
        return kv
    }
}
