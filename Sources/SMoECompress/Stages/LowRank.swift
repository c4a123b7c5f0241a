import CLinAlg
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
        .lowRank(streams: !hasTokens || objective(hasTokens: true) == .output, rank: largestRank, sparsity: sparsity)
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
        case .exact: return false
        case .randomized: return r + oversampling < p
        case .auto: return 4 * (r + oversampling) <= p
        }
    }

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

/// What factoring did to one matrix.
public struct MatrixLowRankReport: Sendable {
    /// up, gate or down.
    public var matrix: String
    /// Stored expert index.
    public var expert: Int
    public var rows: Int
    public var cols: Int
    public var rank: Int
    public var nnz: Int
    /// ‖W − (U·V + S)‖_F / ‖W‖_F of what is stored (0 when kept dense).
    public var relativeError: Double
    public var paramsBefore: Int
    public var paramsAfter: Int
    public var bytesBefore: Int
    public var bytesAfter: Int
    /// The factored form would not have been smaller, so the matrix stays dense.
    public var keptDense: Bool = false
    public var reason: String? = nil
    /// "exact" or "randomized".
    public var svd: String
    /// Entries of S ranked by |S_ij|·‖X_j‖.
    public var activationAware: Bool = false
    /// U·V minimised the output error ‖ΔW·X‖ on the whitened matrix (ALGORITHM.md §4.1).
    public var whitened: Bool = false
    /// With whitening: ‖(W − (U·V + S))·L‖_F / ‖W·L‖_F, the relative output error on the
    /// calibration inputs (ridge included; 0 when kept dense).
    public var outputError: Double? = nil
    /// Relative error after the one-shot split and after each refinement (best one is kept).
    public var errorHistory: [Double] = []

    public var json: JSONValue {
        var kv: [(String, JSONValue)] = [
            ("matrix", .string(matrix)), ("expert", .int(expert)), ("shape", JSONValue([rows, cols])), ("rank", .int(rank)),
            ("nnz", .int(nnz)), ("relative_error", .double(relativeError)), ("params_before", .int(paramsBefore)),
            ("params_after", .int(paramsAfter)), ("bytes_before", .int(bytesBefore)), ("bytes_after", .int(bytesAfter)),
            ("kept_dense", .bool(keptDense)), ("svd", .string(svd)), ("activation_aware", .bool(activationAware)),
            ("whitened", .bool(whitened)),
        ]
        if let e = outputError { kv.append(("output_error", .double(e))) }
        if let r = reason { kv.append(("reason", .string(r))) }
        if errorHistory.count > 1 { kv.append(("error_history", JSONValue(errorHistory))) }
        return .object(kv)
    }
}

/// What the stage did to one layer.
public struct LayerLowRankReport: Sendable {
    public var name: String
    public var matrices: [MatrixLowRankReport]

    public var bytesBefore: Int { matrices.reduce(0) { $0 + $1.bytesBefore } }
    public var bytesAfter: Int { matrices.reduce(0) { $0 + $1.bytesAfter } }
    public var paramsBefore: Int { matrices.reduce(0) { $0 + $1.paramsBefore } }
    public var paramsAfter: Int { matrices.reduce(0) { $0 + $1.paramsAfter } }
    /// The mean of the matrices' relative errors.
    public var meanRelativeError: Double {
        matrices.isEmpty ? 0 : matrices.reduce(0) { $0 + $1.relativeError } / Double(matrices.count)
    }
    public var maxRelativeError: Double { matrices.map(\.relativeError).max() ?? 0 }

    public var json: JSONValue {
        .object([("name", .string(name)), ("bytes_before", .int(bytesBefore)), ("bytes_after", .int(bytesAfter)),
                 ("params_before", .int(paramsBefore)), ("params_after", .int(paramsAfter)),
                 ("mean_relative_error", .double(meanRelativeError)), ("max_relative_error", .double(maxRelativeError)),
                 ("matrices", .array(matrices.map(\.json)))])
    }

    /// The compact form recorded in the checkpoint history.
    public var historyJSON: JSONValue {
        .object([("name", .string(name)), ("ranks", JSONValue(matrices.map(\.rank))), ("nnz", JSONValue(matrices.map(\.nnz))),
                 ("kept_dense", .int(matrices.filter(\.keptDense).count)),
                 ("mean_relative_error", .double(meanRelativeError))])
    }
}

/// Column norms ‖X_j‖ of one stored expert's matrix inputs over the tokens routed to it.
public struct ExpertInputNorms: Sendable, Equatable {
    /// Norms of the layer input x [d_model] (inputs of up and gate).
    public var input: [Float]
    /// Norms of the hidden activation h [d_ff] (input of down).
    public var hidden: [Float]
    /// Tokens the expert ran on.
    public var tokens: Int

    public init(input: [Float], hidden: [Float], tokens: Int) {
        self.input = input
        self.hidden = hidden
        self.tokens = tokens
    }

    public func norms(for matrix: ExpertMatrixName) -> [Float] { matrix == .down ? hidden : input }
}

/// Low-rank plus sparse compression of expert matrices (ALGORITHM.md §4).
public struct LowRankStage: LayerStage {
    // MARK: one matrix

    /// Factors W [out, in] as U·V + S: U = U_r·√Σ_r, V = √Σ_r·V_rᵀ from the rank-r truncated SVD,
    /// S the largest residual entries (ties to the lower row-major index), optionally refined.
    /// With `inputNorms` ([in]) entries (or rows) are ranked by |S_ij|·‖X_j‖. When the factored
    /// form would not take fewer bytes than W it returns `.dense(W)` and says so in the report.
    /// With `whitening` (of this matrix's inputs) U·V is the truncated SVD of W·L times L⁻¹, the
    /// minimiser of the output error (the energy rule then counts whitened singular values).
    /// `rank` overrides the options' rule. `name` labels errors ("layer L expert 3 up").
    public static func factor(_ w: Matrix, options: LowRankOptions, inputNorms: [Float]? = nil, whitening: Whitening? = nil,
                              rank rankOverride: Int? = nil,
                              name: String = "matrix") throws -> (op: LinearOp, report: MatrixLowRankReport) {
        let out = w.rows, inn = w.cols, p = min(out, inn)
        guard p > 0 else { throw SMoEError("\(name): empty matrix [\(out), \(inn)]") }
        guard w.allFinite else { throw SMoEError("\(name): contains NaN or Inf") }
        if let n = inputNorms, n.count != inn {
            throw SMoEError("\(name): \(n.count) input norms for \(inn) input features")
        }
        // An all-zero norm vector (expert never routed to) carries no information: rank by magnitude.
        let norms = inputNorms.flatMap { n in n.contains(where: { $0 > 0 }) ? n : nil }
        if let wh = whitening, wh.n != inn { throw SMoEError("\(name): whitening of \(wh.n) inputs for \(inn) input features") }
        let normSq = w.frobeniusNorm * w.frobeniusNorm
        // The rank-r part of m (W, or W − S in refinements), whitened and un-whitened if asked.
        func lowRankPart(_ m: Matrix, rank r: Int) throws -> ((u: Matrix, v: Matrix), String) {
            guard let wh = whitening else { return try truncatedSVD(m, rank: r, options: options) }
            let (lr, used) = try truncatedSVD(wh.whiten(m), rank: r, options: options)
            return ((lr.u, wh.unwhiten(lr.v)), used)
        }

        // Rank and the first low-rank part.
        var r: Int
        var svdUsed: String
        var lowRank: (u: Matrix, v: Matrix)
        let rule = rankOverride.map(RankRule.fixed) ?? options.rank
        switch rule {
        case .fixed(let fixed):
            guard fixed <= p else {
                throw SMoEError.setting(.rank, "\(fixed) is more than min(out, in) = \(p) of \(name) [\(out), \(inn)]")
            }
            r = fixed
            (lowRank, svdUsed) = try lowRankPart(w, rank: r)
        case .energy(let f):
            let target = whitening?.whiten(w) ?? w
            if whitening == nil && (options.svd == .exact || !options.prefersRandomized(rank: 1, rows: out, cols: inn)) {
                let full = try w.thinSVD()
                r = rankForEnergy(full.s, fraction: f)
                lowRank = split(full, rank: r)
                svdUsed = "exact"
            } else {
                r = rankForEnergy(try target.singularValues(), fraction: f)
                (lowRank, svdUsed) = try lowRankPart(w, rank: r)
            }
        }

        let budget = min(options.sparseBudget(rows: out, cols: inn), out * inn)
        func splitSparse(_ lr: (u: Matrix, v: Matrix)) -> (s: CSRMatrix, errSq: Double) {
            var resid = w
            BLAS.gemm(lr.u, lr.v, alpha: -1, beta: 1, into: &resid)
            return selectSparse(resid, budget: budget, structure: options.structure, norms: norms)
        }
        var (s, errSq) = splitSparse(lowRank)
        var best = (u: lowRank.u, v: lowRank.v, s: s, errSq: errSq)
        func rel(_ e: Double) -> Double { normSq > 0 ? (max(e, 0) / normSq).squareRoot() : 0 }
        var history = [rel(errSq)]
        if budget > 0 && budget < out * inn {
            for _ in 0..<options.iterations {
                var ws = w
                s.add(to: &ws, scale: -1)
                let lr = try lowRankPart(ws, rank: r).0
                (s, errSq) = splitSparse(lr)
                history.append(rel(errSq))
                if errSq < best.errSq { best = (lr.u, lr.v, s, errSq) }
            }
        }

        let factored = LinearOp.factored(LowRankSparse(u: best.u, v: best.v, s: best.s))
        let dense = LinearOp.dense(w)
        let fb = options.floatBytes
        var report = MatrixLowRankReport(
            matrix: name, expert: 0, rows: out, cols: inn, rank: r, nnz: best.s.nnz, relativeError: rel(best.errSq),
            paramsBefore: dense.parameterCount, paramsAfter: factored.parameterCount,
            bytesBefore: dense.storedBytes(floatBytes: fb), bytesAfter: factored.storedBytes(floatBytes: fb),
            svd: svdUsed, activationAware: norms != nil, errorHistory: history)
        if let wh = whitening {
            var resid = w
            BLAS.gemm(best.u, best.v, alpha: -1, beta: 1, into: &resid)
            best.s.add(to: &resid, scale: -1)
            let base = wh.whiten(w).frobeniusNorm
            report.whitened = true
            report.outputError = base > 0 ? wh.whiten(resid).frobeniusNorm / base : 0
        }
        if report.bytesAfter >= report.bytesBefore {
            report.keptDense = true
            report.reason = "rank \(r) + \(best.s.nnz) sparse entries would take \(report.bytesAfter) B, dense takes \(report.bytesBefore) B"
            report.relativeError = 0
            if report.outputError != nil { report.outputError = 0 }
            report.paramsAfter = report.paramsBefore
            report.bytesAfter = report.bytesBefore
            return (dense, report)
        }
        return (factored, report)
    }

    /// The smallest r whose leading squared singular values reach `fraction` of the total (≥ 1).
    public static func rankForEnergy(_ s: [Float], fraction f: Double) -> Int {
        let sq = s.map { Double($0) * Double($0) }
        let total = sq.reduce(0, +)
        guard total > 0 else { return 1 }
        var acc = 0.0
        for (i, v) in sq.enumerated() {
            acc += v
            // A relative slack of 1e-12 keeps F = 1 from running past the last value on rounding.
            if acc >= f * total * (1 - 1e-12) { return i + 1 }
        }
        return s.count
    }

    /// The rank-r truncated SVD as balanced factors U_r·√Σ_r, √Σ_r·V_rᵀ, by the method the
    /// options choose for this shape; also names the method used.
    static func truncatedSVD(_ w: Matrix, rank r: Int, options: LowRankOptions) throws -> ((u: Matrix, v: Matrix), String) {
        if options.prefersRandomized(rank: r, rows: w.rows, cols: w.cols) {
            let seed = options.seed ^ (UInt64(w.rows) &* 0x9E37_79B9) ^ (UInt64(w.cols) &* 0x85EB_CA6B)
            let res = try w.randomizedSVD(rank: r, oversampling: options.oversampling, powerIterations: options.powerIterations, seed: seed)
            return (split(res, rank: r), "randomized")
        }
        return (split(try w.thinSVD(), rank: r), "exact")
    }

    /// U = U_r·√Σ_r [m, r] and V = √Σ_r·V_rᵀ [r, n] from an SVD with at least r values.
    static func split(_ svd: SVDResult, rank r: Int) -> (u: Matrix, v: Matrix) {
        let m = svd.u.rows, n = svd.vt.cols, pu = svd.u.cols
        let sq = (0..<r).map { Float(max(svd.s[$0], 0)).squareRoot() }
        var u = Matrix(rows: m, cols: r)
        for i in 0..<m {
            for j in 0..<r { u.data[i * r + j] = svd.u.data[i * pu + j] * sq[j] }
        }
        var v = Matrix(rows: r, cols: n, data: Array(svd.vt.data[0..<(r * n)]))
        for i in 0..<r {
            for j in 0..<n { v.data[i * n + j] *= sq[i] }
        }
        return (u, v)
    }

    /// Picks the sparse part from the residual R and returns it with the squared Frobenius
    /// norm of what is left out (= ‖W − (U·V + S)‖²).
    static func selectSparse(_ resid: Matrix, budget: Int, structure: SparseStructure, norms: [Float]?) -> (CSRMatrix, Double) {
        let out = resid.rows, inn = resid.cols, total = out * inn
        func sumSq(_ m: Matrix) -> Double { m.data.reduce(0.0) { $0 + Double($1) * Double($1) } }
        if budget <= 0 { return (.empty(rows: out, cols: inn), sumSq(resid)) }
        if budget >= total { return (CSRMatrix.from(resid) { _, _ in true }, 0) }
        switch structure {
        case .row:
            let keepRows = budget / inn
            var score = [Double](repeating: 0, count: out)
            for i in 0..<out {
                var a = 0.0
                for j in 0..<inn { a += Double(abs(resid.data[i * inn + j])) * Double(norms?[j] ?? 1) }
                score[i] = a / Double(inn)
            }
            let order = (0..<out).sorted { score[$0] != score[$1] ? score[$0] > score[$1] : $0 < $1 }
            var keep = [Bool](repeating: false, count: out)
            for i in order.prefix(keepRows) { keep[i] = true }
            var left = 0.0
            for i in 0..<out where !keep[i] {
                for j in 0..<inn { let x = Double(resid.data[i * inn + j]); left += x * x }
            }
            return (CSRMatrix.from(resid) { i, _ in keep[i] }, left)
        case .unstructured:
            var scores = resid.data
            if let nv = norms {
                for i in 0..<out { for j in 0..<inn { scores[i * inn + j] = abs(scores[i * inn + j]) * nv[j] } }
            } else {
                for k in 0..<total { scores[k] = abs(scores[k]) }
            }
            var work = scores
            let t = quickselectLargest(&work, budget)
            var above = 0
            for x in scores where x > t { above += 1 }
            var ties = budget - above  // entries equal to t to keep, lowest index first
            var indptr = [Int](repeating: 0, count: out + 1)
            var idx: [Int32] = [], vals: [Float] = []
            idx.reserveCapacity(budget)
            vals.reserveCapacity(budget)
            var left = 0.0
            for i in 0..<out {
                for j in 0..<inn {
                    let k = i * inn + j, x = scores[k]
                    var keep = x > t
                    if !keep && x == t && ties > 0 { keep = true; ties -= 1 }
                    if keep {
                        idx.append(Int32(j))
                        vals.append(resid.data[k])
                    } else {
                        left += Double(resid.data[k]) * Double(resid.data[k])
                    }
                }
                indptr[i + 1] = vals.count
            }
            return (CSRMatrix(rows: out, cols: inn, indptr: indptr, indices: idx, values: vals), left)
        }
    }

    // MARK: one layer

    /// Factors the selected matrices of every stored expert. `inputNorms` (one per stored expert)
    /// switches to activation-aware ranking of the sparse entries. With `whitenOn` (calibration
    /// tokens of this layer) every matrix minimises its output error instead (ALGORITHM.md §4.1):
    /// up and gate are whitened with the Gram of the routed layer inputs, then down with the Gram
    /// of the hidden activations computed by the already factored up/gate, and the sparse part is
    /// ranked by |S_ij|·‖X_j‖ with those weighted norms. A matrix that is already factored is an
    /// error; matrices not selected are left as they are.
    public static func compressLayer(_ layer: MoELayer, options: LowRankOptions, inputNorms: [ExpertInputNorms]? = nil,
                                     whitenOn tokens: TokenBlocks? = nil,
                                     progress: ProgressCallback? = nil) throws -> (MoELayer, LayerLowRankReport) {
        try compressLayer(LayerSource(layer), options: options, inputNorms: inputNorms, whitenOn: tokens, progress: progress)
    }

    /// `compressLayer` reading the experts from `source` one at a time: matrix kind by kind
    /// (up, gate, down), each stored expert is read, its matrix factored, and only the factors
    /// kept; an expert is read again for each kind (and for a kind that stays dense).
    public static func compressLayer(_ source: LayerSource, options: LowRankOptions, inputNorms: [ExpertInputNorms]? = nil,
                                     whitenOn tokens: TokenBlocks? = nil,
                                     progress: ProgressCallback? = nil) throws -> (MoELayer, LayerLowRankReport) {
        let G = source.numStored, c = source.config
        if let n = inputNorms, n.count != G {
            throw SMoEError("layer \(source.name): \(n.count) input norms for \(G) stored experts")
        }
        // The matrices decided so far, per stored expert (the others are the source's).
        var decided = [[String: LinearOp]](repeating: [:], count: G)
        func current(_ g: Int) throws -> Expert {
            var e = try source.expert(g)
            for (name, op) in decided[g] { e[matrix: name] = op }
            return e
        }
        var reports: [MatrixLowRankReport] = []
        let names = ExpertMatrixName.allCases.filter { options.matrices.contains($0) && (c.expertType == .glu || $0 != .gate) }
        let total = names.count * G
        var done = 0
        for m in names {
            var ops: [LinearOp] = []
            var mReports: [MatrixLowRankReport] = []
            for g in 0..<G {
                let label = "layer \(source.name) expert \(g) \(m.rawValue)"
                let expert = try current(g)
                guard let op = expert[matrix: m.rawValue] else { continue }
                guard case .dense(let w) = op else { throw SMoEError("\(label) is already factored; run expand first") }
                var o = options
                o.seed = options.seed &+ UInt64(g &* 3 &+ (ExpertMatrixName.allCases.firstIndex(of: m)!)) &* 0x9E37_79B9_7F4A_7C15
                // One expert's Gram at a time (down's is d_ff² float64: 1.6 GB at Mixtral's 14336);
                // down's inputs come from this expert's already factored up and gate.
                var norms = inputNorms?[g].norms(for: m)
                var whitening: Whitening? = nil
                if let blocks = tokens {
                    let gram = try inputGram(source, expert: expert, stored: g, tokens: blocks, hidden: m == .down)
                    norms = gram.columnNorms
                    whitening = try Whitening(gram, relativeRidge: options.whiteningRidge)
                }
                var (newOp, rep) = try factor(w, options: o, inputNorms: norms, whitening: whitening,
                                              rank: options.ranks[LowRankOptions.rankKey(m, expert: g)], name: label)
                rep.matrix = m.rawValue
                rep.expert = g
                ops.append(newOp)
                mReports.append(rep)
                done += 1
                progress?("factoring \(source.name)", done, total)
            }
            // In a group where other experts are factored, a dense matrix is stored as the exact
            // factorisation I·W (FORMAT.md); when that padding makes the whole group no smaller than
            // all-dense, the whole group stays dense.
            if ops.contains(where: \.isFactored) && ops.contains(where: { !$0.isFactored }) {
                var padded = mReports
                for (g, op) in ops.enumerated() where !op.isFactored {
                    let p = LinearOp.factored(LowRankSparse.exact(op.dense()))
                    padded[g].bytesAfter = p.storedBytes(floatBytes: options.floatBytes)
                    padded[g].paramsAfter = p.parameterCount
                    padded[g].reason = (padded[g].reason ?? "") + "; stored as the exact factorisation \(op.outFeatures <= op.inFeatures ? "I·W" : "W·I") beside factored experts"
                }
                let groupAfter = padded.reduce(0) { $0 + $1.bytesAfter }, groupBefore = padded.reduce(0) { $0 + $1.bytesBefore }
                if groupAfter >= groupBefore {
                    for g in 0..<ops.count where ops[g].isFactored {
                        ops[g] = try source.expert(g)[matrix: m.rawValue]!
                        mReports[g].keptDense = true
                        mReports[g].reason = "the \(m.rawValue) matrices of the layer would take \(groupAfter) B mixed with dense ones (stored as I·W), dense take \(groupBefore) B"
                        mReports[g].relativeError = 0
                        mReports[g].bytesAfter = mReports[g].bytesBefore
                        mReports[g].paramsAfter = mReports[g].paramsBefore
                    }
                } else {
                    mReports = padded
                }
            }
            for (g, op) in ops.enumerated() { decided[g][m.rawValue] = op }
            reports += mReports
        }
        var out = source.header
        out.experts = try (0..<G).map(current)
        return (out, LayerLowRankReport(name: source.name, matrices: reports))
    }

    /// Column norms of each stored expert's matrix inputs over the tokens routed to it (the layer's
    /// own routing; an expert shared by several slots gets the tokens of all of them).
    public static func inputNorms(_ layer: MoELayer, tokens: TokenBlocks) throws -> [ExpertInputNorms] {
        let G = layer.numStored, d = layer.config.dModel, f = layer.config.dFF
        var inSq = [[Double]](repeating: [Double](repeating: 0, count: d), count: G)
        var hSq = [[Double]](repeating: [Double](repeating: 0, count: f), count: G)
        var counts = [Int](repeating: 0, count: G)
        try tokens { x in
            let routing = layer.route(x)
            for (g, disp) in layer.dispatch(routing).enumerated() where !disp.tokens.isEmpty {
                let xg = x.gatherRows(disp.tokens)
                let h = layer.experts[g].hidden(xg, activation: layer.config.activation)
                counts[g] += disp.tokens.count
                for t in 0..<xg.rows {
                    for j in 0..<d { let v = Double(xg.data[t * d + j]); inSq[g][j] += v * v }
                    for j in 0..<f { let v = Double(h.data[t * f + j]); hSq[g][j] += v * v }
                }
            }
        }
        return (0..<G).map { g in
            ExpertInputNorms(input: inSq[g].map { Float($0.squareRoot()) }, hidden: hSq[g].map { Float($0.squareRoot()) },
                             tokens: counts[g])
        }
    }

    // MARK: the stage

    public let name = "lowrank"
    public let layers: [String]
    public let options: LowRankOptions
    /// With calibration tokens, sparse entries are ranked activation-aware.
    public let calibration: CalibrationReader?
    public let tokens: TokenSettings

    /// Validates the options once, and that the selected layers have a matrix to factor.
    public init(model: CheckpointReader, calibration: CalibrationReader?, options: LowRankOptions,
                tokens: TokenSettings = TokenSettings(), layers: [String]? = nil) throws {
        try options.validate()
        try tokens.validate()
        let names = try model.selectLayers(layers)
        let selected = model.layers.filter { names.contains($0.name) }
        if !selected.contains(where: { c in options.matrices.contains { $0 != .gate || c.expertType == .glu } }) {
            throw SMoEError.setting(.matrices, "none of \(options.matrices.sorted().map(\.rawValue).joined(separator: ",")) exists in the selected layers of \(model.path)")
        }
        if let c = calibration { try c.checkMatches(model, layers: names) }
        if options.objective == .output && calibration == nil {
            throw SMoEError.setting(.lowrankObjective, "output needs calibration tokens ({calibration})")
        }
        self.layers = names
        self.options = options
        self.calibration = calibration
        self.tokens = tokens
    }

    /// With the output objective (or none: by weight) the loop hands the layer's source: one
    /// expert is read at a time; activation-aware ranking by weight reads the layer whole.
    public var streamsExperts: Bool { calibration == nil || options.objective(hasTokens: true) == .output }

    public func process(source: LayerSource, progress: ProgressCallback?) throws -> (output: MoELayer, report: LayerLowRankReport) {
        guard streamsExperts else { return try process(try source.whole(), progress: progress) }
        return try LowRankStage.compressLayer(source, options: options, whitenOn: calibration.map { $0.tokenBlocks(source.name, tokens) },
                                              progress: progress)
    }

    public func process(_ layer: MoELayer, progress: ProgressCallback?) throws -> (output: MoELayer, report: LayerLowRankReport) {
        let blocks = calibration.map { $0.tokenBlocks(layer.name, tokens) }
        if options.objective(hasTokens: blocks != nil) == .output {
            return try LowRankStage.compressLayer(layer, options: options, whitenOn: blocks, progress: progress)
        }
        let norms = try blocks.map { try LowRankStage.inputNorms(layer, tokens: $0) }
        return try LowRankStage.compressLayer(layer, options: options, inputNorms: norms, progress: progress)
    }

    public func historyEntry(_ reports: [LayerLowRankReport]) -> JSONValue {
        var o = options
        o.objective = options.objective(hasTokens: calibration != nil)
        return LowRankStage.historyEntry(o, calibration: calibration?.path, reports: reports)
    }

    /// The history entry of a lowrank run (also the `lowrank` part of a compress entry).
    public static func historyEntry(_ options: LowRankOptions, calibration: String?, reports: [LayerLowRankReport]) -> JSONValue {
        var kv: [(String, JSONValue)] = [("stage", "lowrank"), ("tool", .string("smoe-compress \(smoeCompressVersion)"))]
        kv += options.historyJSON
        kv.append(("activation_aware", .bool(calibration != nil)))
        if let c = calibration { kv.append(("calibration", .string(c))) }
        kv.append(("layers", .array(reports.map(\.historyJSON))))
        return .object(kv)
    }
}

/// Ranks as a table shows them: "dense" (none), "12" or "8-31".
public func rankRange(_ ranks: [Int]) -> String {
    guard let lo = ranks.min(), let hi = ranks.max() else { return "dense" }
    return lo == hi ? "\(lo)" : "\(lo)-\(hi)"
}
