import CLinAlg
import Foundation

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

/// Factoring matrices and layers as U·V + S (ALGORITHM.md §4): the computation the `lowrank`
/// stage runs per layer.
extension LowRankStage {
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
        var f = try MatrixFactoring(w, options: options, inputNorms: inputNorms, whitening: whitening, name: name)
        let first = try f.firstLowRankPart(rule: rankOverride.map(RankRule.fixed) ?? options.rank)
        return try finish(&f, first)
    }

    /// `factor` whitened through the output Gram `og` of W (ALGORITHM.md §4.1; the caller checked
    /// `LowRankOptions.factorsByOutputGram` and that some token reached the expert): the same
    /// factors, report and kept-dense decision, with `svd` "output-gram". nil when P or its
    /// eigenpairs fail the check of `MatrixFactoring.outputGramPart`: the caller then factors
    /// W through the input Gram as before.
    public static func factor(_ w: Matrix, options: LowRankOptions, outputGram og: OutputGram, rank rankOverride: Int? = nil,
                              name: String = "matrix") throws -> (op: LinearOp, report: MatrixLowRankReport)? {
        var f = try MatrixFactoring(w, options: options, inputNorms: og.columnNorms, whitening: nil, name: name)
        guard let first = try f.outputGramPart(og, rule: rankOverride.map(RankRule.fixed) ?? options.rank) else { return nil }
        return try finish(&f, first)
    }

    /// The sparse part, refinements, report and kept-dense decision after the first low-rank part.
    private static func finish(_ f: inout MatrixFactoring, _ first: (rank: Int, factors: (u: Matrix, v: Matrix), svd: String)) throws
        -> (op: LinearOp, report: MatrixLowRankReport) {
        let (r, lowRank, svdUsed) = first
        let options = f.options, w = f.w, name = f.name
        let (best, bestIsFirst, history) = try f.refineSparse(lowRank, rank: r)
        let factored = LinearOp.factored(LowRankSparse(u: best.u, v: best.v, s: best.s))
        let dense = LinearOp.dense(w)
        let fb = options.floatBytes
        var report = MatrixLowRankReport(
            matrix: name, expert: 0, rows: f.out, cols: f.inn, rank: r, nnz: best.s.nnz, relativeError: f.rel(best.errSq),
            paramsBefore: dense.parameterCount, paramsAfter: factored.parameterCount,
            bytesBefore: dense.storedBytes(floatBytes: fb), bytesAfter: factored.storedBytes(floatBytes: fb),
            svd: svdUsed, activationAware: f.norms != nil, errorHistory: history)
        if f.whitening != nil || f.outputGramError != nil {
            report.whitened = true
            report.outputError = f.whitenedOutputError(best, bestIsFirst: bestIsFirst)
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
        rankForEnergy(squared: s.map { Double($0) * Double($0) }, fraction: f)
    }

    /// `rankForEnergy` from the squared singular values (eigenvalues of a Gram, descending; a
    /// negative one, from rounding, counts as 0).
    static func rankForEnergy(squared: [Double], fraction f: Double) -> Int {
        let sq = squared.map { max($0, 0) }
        let total = sq.reduce(0, +)
        guard total > 0 else { return 1 }
        var acc = 0.0
        for (i, v) in sq.enumerated() {
            acc += v
            // A relative slack of 1e-12 keeps F = 1 from running past the last value on rounding.
            if acc >= f * total * (1 - 1e-12) { return i + 1 }
        }
        return sq.count
    }

    /// The rank-r truncated SVD as balanced factors U_r·√Σ_r, √Σ_r·V_rᵀ, by the method the
    /// options choose for this shape; also names the method used.
    static func truncatedSVD(_ w: Matrix, rank r: Int, options: LowRankOptions) throws -> ((u: Matrix, v: Matrix), String) {
        if options.prefersRandomized(rank: r, rows: w.rows, cols: w.cols) {
            let seed = options.seed ^ (UInt64(w.rows) &* 0x9E37_79B9) ^ (UInt64(w.cols) &* 0x85EB_CA6B)
            let res = try w.randomizedSVD(rank: r, oversampling: options.oversampling, powerIterations: options.powerIterations, seed: seed)
            return (split(res, rank: r), "randomized")
        }
        if options.prefersGram(rank: r, rows: w.rows, cols: w.cols) {
            // `auto` tries float32 `ssyevr` first, kept when it passes the check, else `dsyevr`.
            let accept: ((GramSVDResult) -> Bool)? = options.svd == .auto ? { gramPassesCheck($0) } : nil
            let g = try w.gramTruncatedSVD(rank: r, float32First: accept)
            let name = g.eigensolver == "ssyevr" ? "gram-float32" : "gram"
            if gramPassesCheck(g) || options.svd == .gram { return (split(g.svd, rank: r), name) }
            return (split(try w.thinSVD(), rank: r), "exact (gram check failed)")
        }
        return (split(try w.thinSVD(), rank: r), "exact")
    }

    /// The a-posteriori check of a Gram factorisation (ALGORITHM.md §4): the squared error it
    /// leaves, ‖A‖² − Σσ_j², is within (1.01)² of the optimum's ‖A‖² − Σλ_j (float64 eigenvalues
    /// of the float64 Gram; float32 ones lowered by their `eigenvalueSlack`), plus 1e-6·‖A‖² for
    /// float32 rounding of A·V; and that optimum's
    /// relative error is at least 1 %, so that rounding slack is under 1 % of it. A matrix
    /// (nearly) of rank r fails the second condition and gets the exact SVD.
    static func gramPassesCheck(_ g: GramSVDResult) -> Bool {
        let total = g.normSquared
        guard total > 0, total.isFinite, g.eigenvalueSlack.isFinite else { return false }
        // float32 eigenvalues (`eigensolver` "ssyevr") may fall short of the float64 Gram's by up
        // to their slack: the optimum is lowered by it, so it is never overstated.
        let optimum = max(total - g.eigenvalueSum - g.eigenvalueSlack, 0), reached = max(total - g.capturedSum, 0)
        guard optimum >= 1e-4 * total else { return false }
        return reached <= 1.0201 * optimum + 1e-6 * total
    }

    /// U = U_r·√Σ_r [m, r] and V = √Σ_r·V_rᵀ [r, n] from an SVD with at least r values.
    public static func balancedFactors(_ svd: SVDResult, rank r: Int) -> (u: Matrix, v: Matrix) { split(svd, rank: r) }

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
    /// ranked by |S_ij|·‖X_j‖ with those weighted norms. A matrix with fewer outputs than inputs
    /// (down when d_ff > d_model) is whitened through its output Gram instead when
    /// `LowRankOptions.factorsByOutputGram` allows (no sparse part, `--svd` not exact): the same
    /// optimum without any in × in matrix, falling back to the input Gram if its check fails. A matrix that is already factored is an
    /// error; matrices not selected are left as they are.
    public static func compressLayer(_ layer: MoELayer, options: LowRankOptions, inputNorms: [ExpertInputNorms]? = nil,
                                     whitenOn tokens: TokenBlocks? = nil,
                                     progress: ProgressCallback? = nil) throws -> (MoELayer, LayerLowRankReport) {
        try compressLayer(LayerSource(layer), options: options, inputNorms: inputNorms, whitenOn: tokens, progress: progress)
    }

    /// `compressLayer` reading the experts from `source` one at a time: up and gate expert by
    /// expert, then down, each stored expert is read, its matrix factored, and only the factors
    /// kept; an expert is read again for each kind (and for a kind that stays dense).
    public static func compressLayer(_ source: LayerSource, options: LowRankOptions, inputNorms: [ExpertInputNorms]? = nil,
                                     whitenOn tokens: TokenBlocks? = nil,
                                     progress: ProgressCallback? = nil) throws -> (MoELayer, LayerLowRankReport) {
        let G = source.numStored, c = source.config
        if let n = inputNorms, n.count != G {
            throw SMoEError("layer \(source.name): \(n.count) input norms for \(G) stored experts", layer: source.name)
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
        // up and gate read the same inputs, so they are factored together expert by expert and
        // each expert's input Gram and whitening (a d_model² float64 Cholesky) is formed once for
        // both, one expert's at a time; down follows once up and gate are decided (its inputs
        // come from them). The results do not depend on this order.
        let phases = [names.filter { $0 != .down }, names.filter { $0 == .down }].filter { !$0.isEmpty }
        for phase in phases {
            var phaseOps = [ExpertMatrixName: [LinearOp]](), phaseReports = [ExpertMatrixName: [MatrixLowRankReport]]()
            for g in 0..<G {
                var shared: (norms: [Float]?, whitening: Whitening?)? = nil
                // The factorings of this expert that need no further input (up and gate, which
                // share one whitening) run side by side once their inputs are read, one BLAS
                // thread each (`BLAS.perform`: HDF5 is read on this thread only); much of a
                // rank-1024 Gram route is single-threaded (the eigensolver's bisection and inverse
                // iteration, float64 conversions), so two at once use both cores. The results are
                // the same sums in the same order whatever the number of cores.
                var pending: [(m: ExpertMatrixName, w: Matrix, o: LowRankOptions, norms: [Float]?, whitening: Whitening?,
                               rank: Int?, label: String, fellBack: Bool)] = []
                func record(_ m: ExpertMatrixName, _ newOp: LinearOp, _ rep: MatrixLowRankReport) {
                    var rep = rep
                    rep.matrix = m.rawValue
                    rep.expert = g
                    phaseOps[m, default: []].append(newOp)
                    phaseReports[m, default: []].append(rep)
                    done += 1
                    progress?("factoring \(source.name)", done, total)
                }
                for m in phase {
                    let label = "layer \(source.name) expert \(g) \(m.rawValue)"
                    let expert = try current(g)
                    guard let op = expert[matrix: m.rawValue] else { continue }
                    guard case .dense(let w) = op else { throw SMoEError("\(label) is already factored; run expand first", layer: source.name) }
                    var o = options
                    o.seed = options.seed &+ UInt64(g &* 3 &+ (ExpertMatrixName.allCases.firstIndex(of: m)!)) &* 0x9E37_79B9_7F4A_7C15
                    // One expert's Gram at a time (down's input Gram is d_ff² float64: 1.6 GB at
                    // Mixtral's 14336; its output Gram d_model²); down's inputs come from this
                    // expert's already factored up and gate.
                    var norms = inputNorms?[g].norms(for: m)
                    var whitening: Whitening? = nil
                    let rank = options.ranks[LowRankOptions.rankKey(m, expert: g)]
                    var byOutputGram: (op: LinearOp, report: MatrixLowRankReport)? = nil, fellBack = false
                    if let blocks = tokens {
                        var inputSide = true
                        // Fewer outputs than inputs (down): the output Gram, no in × in matrix
                        // (ALGORITHM.md §4.1); an expert no token reached is factored by weight
                        // as below, and a failed check falls back to the input Gram.
                        if options.factorsByOutputGram(rows: w.rows, cols: w.cols) {
                            let og = try outputGram(source, expert: expert, stored: g, matrix: w, tokens: blocks, hidden: m == .down,
                                                    relativeRidge: options.whiteningRidge)
                            norms = og.columnNorms
                            if og.inputEnergy > 0 && og.inputEnergy.isFinite {
                                do {
                                    byOutputGram = try factor(w, options: o, outputGram: og, rank: rank, name: label)
                                } catch let e as SMoEError {
                                    throw e.about(layer: source.name)  // `label` names the layer
                                }
                                fellBack = byOutputGram == nil
                            }
                            inputSide = fellBack
                        }
                        // The input Gram (one for up and gate), unless factored through the output
                        // Gram above or by weight (no token reached the expert).
                        if inputSide {
                            if m != .down, let sh = shared {
                                (norms, whitening) = sh
                            } else {
                                let gram = try inputGram(source, expert: expert, stored: g, tokens: blocks, hidden: m == .down)
                                norms = gram.columnNorms
                                whitening = try Whitening(gram, relativeRidge: options.whiteningRidge)
                                if m != .down { shared = (norms, whitening) }
                            }
                        }
                    }
                    if let d = byOutputGram {
                        record(m, d.op, d.report)
                    } else {
                        pending.append((m, w, o, norms, whitening, rank, label, fellBack))
                    }
                }
                let jobs = pending
                let results = try BLAS.perform(jobs.count) { k -> (LinearOp, MatrixLowRankReport) in
                    let j = jobs[k]
                    do {
                        var (newOp, rep) = try factor(j.w, options: j.o, inputNorms: j.norms, whitening: j.whitening, rank: j.rank, name: j.label)
                        if j.fellBack { rep.svd += " (output-gram check failed)" }
                        return (newOp, rep)
                    } catch let e as SMoEError {
                        throw e.about(layer: source.name)  // `label` names the layer
                    }
                }
                for (j, r) in zip(jobs, results) { record(j.m, r.0, r.1) }
            }
            for m in phase {
                var ops = phaseOps[m] ?? [], mReports = phaseReports[m] ?? []
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
        }
        var out = source.header
        out.experts = try (0..<G).map(current)
        out.expertEncoding = .float  // factored matrices are never FP8
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
                let xg = MoELayer.expertInput(x, disp, config: layer.config).rows  // scaled where the router scales the input
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
}

/// The steps of `LowRankStage.factor` on one matrix W [out, in]: checked inputs, the first
/// low-rank part at the rank the rule gives, the sparse refinements, and the whitened output
/// error. It keeps the whitened W·L and the whitened factor V_w of the first low-rank part, so
/// that W·L is formed once (one triangular product of 2·out·in² flops, the largest single cost
/// of a whitened matrix at Mixtral's shape).
private struct MatrixFactoring {
    typealias Factors = (u: Matrix, v: Matrix)
    typealias Candidate = (u: Matrix, v: Matrix, s: CSRMatrix, errSq: Double)
    let w: Matrix, options: LowRankOptions, whitening: Whitening?, name: String
    let out: Int, inn: Int, p: Int
    /// Input norms that rank the sparse entries; nil for none or an all-zero vector (an expert
    /// never routed to carries no information: rank by magnitude).
    let norms: [Float]?
    let normSq: Double
    var first: (whitened: Matrix, vw: Matrix)? = nil
    /// Set by `outputGramPart`: ‖(W − U·V)·L‖² reconstructed from P and the float32 factors, and
    /// tr P = ‖W·L‖².
    var outputGramError: (errSq: Double, trace: Double)? = nil

    init(_ w: Matrix, options: LowRankOptions, inputNorms: [Float]?, whitening: Whitening?, name: String) throws {
        out = w.rows; inn = w.cols; p = min(out, inn)
        guard p > 0 else { throw SMoEError("\(name): empty matrix [\(out), \(inn)]") }
        guard w.allFinite else { throw SMoEError("\(name): contains NaN or Inf") }
        if let n = inputNorms, n.count != inn {
            throw SMoEError("\(name): \(n.count) input norms for \(inn) input features")
        }
        norms = inputNorms.flatMap { n in n.contains(where: { $0 > 0 }) ? n : nil }
        if let wh = whitening, wh.n != inn { throw SMoEError("\(name): whitening of \(wh.n) inputs for \(inn) input features") }
        self.w = w; self.options = options; self.whitening = whitening; self.name = name
        normSq = w.frobeniusNorm * w.frobeniusNorm
    }

    func rel(_ e: Double) -> Double { normSq > 0 ? (max(e, 0) / normSq).squareRoot() : 0 }

    /// The rank-r part of m (W, or W − S in refinements), whitened and un-whitened if asked;
    /// `whitened` is m·L when the caller has it.
    mutating func lowRankPart(_ m: Matrix, rank r: Int, whitened: Matrix? = nil) throws -> (Factors, String) {
        guard let wh = whitening else { return try LowRankStage.truncatedSVD(m, rank: r, options: options) }
        let a = whitened ?? wh.whiten(m)
        let (lr, used) = try LowRankStage.truncatedSVD(a, rank: r, options: options)
        if first == nil { first = (a, lr.v) }
        return ((lr.u, wh.unwhiten(lr.v)), used)
    }

    /// The rank the rule gives and the first low-rank part, with the SVD method used.
    mutating func firstLowRankPart(rule: RankRule) throws -> (rank: Int, factors: Factors, svd: String) {
        switch rule {
        case .fixed(let fixed):
            guard fixed <= p else {
                throw SMoEError.setting(.rank, "\(fixed) is more than min(out, in) = \(p) of \(name) [\(out), \(inn)]")
            }
            let (lr, used) = try lowRankPart(w, rank: fixed)
            return (fixed, lr, used)
        case .energy(let f):
            let target = whitening?.whiten(w) ?? w
            if whitening == nil && (options.svd == .exact || !options.prefersRandomized(rank: 1, rows: out, cols: inn)) {
                let full = try w.thinSVD()
                let r = LowRankStage.rankForEnergy(full.s, fraction: f)
                return (r, LowRankStage.split(full, rank: r), "exact")
            }
            let r = LowRankStage.rankForEnergy(try target.singularValues(), fraction: f)
            let (lr, used) = try lowRankPart(w, rank: r, whitened: whitening == nil ? nil : target)
            return (r, lr, used)
        }
    }

    /// The first low-rank part from the output Gram P = W·(G + λI)·Wᵀ (ALGORITHM.md §4.1): the
    /// r leading eigenpairs (λ_k, u_k) of P by `dsyevr` (all of them for an energy rule, whose
    /// rank they give), U = U_r·Λ_r^{1/2} and V = B·W with B = Λ_r^{-1/2}·U_rᵀ — the balanced
    /// factors of the whitened truncated SVD (A = W·L = P_A·Σ·Qᵀ has P_A = U, Σ² = Λ, and
    /// √Σ_r·Q_rᵀ·L⁻¹ = Σ_r^{-1/2}·U_rᵀ·A·L⁻¹ = B·W), with no L and no triangular solve.
    /// nil when the result is not trustworthy (the caller falls back to the input Gram):
    /// - P not finite or tr P ≤ 0, or an eigenvalue not finite or below −1e-10·tr P. P is a float64
    ///   sum of outer products, positive semidefinite; its rounding and `dsyevr`'s are ~1e-16·tr P
    ///   times modest multiples of out and the token count, far below 1e-10·tr P, so anything
    ///   more negative is a P that is not the Gram it should be.
    /// - The reconstructed error fails the bound of the input Gram path's check
    ///   (`gramPassesCheck`): e = tr((I − U·B)·P·(I − U·B)ᵀ) = ‖(I − U·B)·W·L‖², computed in
    ///   float64 from P and the float32 U and B (so their rounding is in it), must be within
    ///   (1.01)² of the optimum tr P − Σ_{k≤r} λ_k, plus 1e-6·tr P: the resolution of factors
    ///   stored in float32 (the same slack the Gram path allows for its float32 A·V). Eigenvalues
    ///   and eigenvectors must agree; a `dsyevr` that returned poor vectors or values fails it.
    ///   `--svd gram` accepts the factors anyway, as it does on the Gram path.
    /// - `--svd auto` with a fixed rank and out ≥ `LowRankOptions.float32EigenMinDimension` takes
    ///   the eigenpairs by float32 `ssyevr` on P rounded to float32 first (`svd`
    ///   "output-gram-float32"), with the optimum lowered by their slack
    ///   (`largestSymmetricEigenpairsFloat32`); failing the check, by `dsyevr` as above.
    /// The report's output error is √(e / tr P), the error of the factors actually returned.
    /// Eigenvalues at rounding level (≤ out·ε·λ_1: P of rank < r, possible only without ridge)
    /// give zero factor rows instead of dividing by noise.
    mutating func outputGramPart(_ og: OutputGram, rule: RankRule) throws -> (rank: Int, factors: Factors, svd: String)? {
        guard og.n == out else { throw SMoEError("\(name): output Gram of \(og.n) outputs for \(out) output features") }
        let tr = og.trace, n = out
        guard tr > 0, tr.isFinite, og.gram.allSatisfy(\.isFinite) else { return nil }
        let r: Int
        switch rule {
        case .fixed(let fixed):
            guard fixed <= p else {
                throw SMoEError.setting(.rank, "\(fixed) is more than min(out, in) = \(p) of \(name) [\(out), \(inn)]")
            }
            r = fixed
            // `auto` at n ≥ `LowRankOptions.float32EigenMinDimension`: float32 `ssyevr` first, kept
            // when it passes the same check with its eigenvalue slack; else `dsyevr` as before.
            if options.svd == .auto && n >= LowRankOptions.float32EigenMinDimension {
                let e = try largestSymmetricEigenpairsFloat32(og.gram, n: n, count: r)
                let saved = outputGramError
                if let res = try outputGramFactors(og, rank: r, vecs: e.vectors, values: e.values, slack: e.slack, svd: "output-gram-float32") {
                    return res
                }
                outputGramError = saved
            }
            var a = og.gram  // dsyevr destroys its input; P is kept for the check
            let (vecs, values) = try largestSymmetricEigenpairs(&a, n: n, count: fixed)
            a = []
            return try outputGramFactors(og, rank: r, vecs: vecs, values: values, slack: 0, svd: "output-gram")
        case .energy(let f):
            var a = og.gram
            let all = try largestSymmetricEigenpairs(&a, n: n, count: n)
            a = []
            r = LowRankStage.rankForEnergy(squared: all.values, fraction: f)
            return try outputGramFactors(og, rank: r, vecs: all.vectors.rowBlock(0, r), values: Array(all.values.prefix(r)), slack: 0,
                                         svd: "output-gram")
        }
    }

    /// The factors of `outputGramPart` from r eigenpairs of P (vectors as rows [r, n], values
    /// largest first) and its check, the optimum lowered by `slack` (the eigenvalues' possible
    /// shortfall: 0 for `dsyevr`); nil when the check fails.
    private mutating func outputGramFactors(_ og: OutputGram, rank r: Int, vecs: Matrix, values: [Double], slack: Double,
                                            svd: String) throws -> (rank: Int, factors: Factors, svd: String)? {
        let tr = og.trace, n = out
        guard values.allSatisfy({ $0.isFinite && $0 >= -1e-10 * tr }), slack.isFinite else { return nil }
        let floor = Double(n) * Double.ulpOfOne * max(values[0], 0)
        var u = Matrix(rows: n, cols: r), b = Matrix(rows: r, cols: n)
        for k in 0..<r {
            let lam = values[k] > floor ? values[k] : 0
            let s = Float(lam.squareRoot()), inv = lam > 0 ? Float(1 / lam.squareRoot()) : 0
            for i in 0..<n {
                let e = vecs.data[k * n + i]
                u.data[i * r + k] = e * s
                b.data[k * n + i] = e * inv
            }
        }
        let optimum = max(tr - values.reduce(0.0) { $0 + max($1, 0) } - slack, 0)
        let errSq = Self.reconstructedErrorSq(og, u: u, b: b)
        outputGramError = (max(errSq, 0), tr)
        guard errSq.isFinite else { return nil }
        guard errSq <= 1.0201 * optimum + 1e-6 * tr || options.svd == .gram else { return nil }
        let v = BLAS.matmul(b, w)
        return (r, (u, v), svd)
    }

    /// tr((I − U·B)·P·(I − U·B)ᵀ) = tr P − 2·tr(U·B·P) + tr(UᵀU·B·P·Bᵀ) in float64 (U [n, r], B [r, n]):
    /// three `dgemm`s, 2·r·n² + 4·r²·n flops.
    static func reconstructedErrorSq(_ og: OutputGram, u: Matrix, b: Matrix) -> Double {
        let n = og.n, r = u.cols
        let bd = b.data.map(Double.init), ud = u.data.map(Double.init)
        var c = [Double](repeating: 0, count: r * n)  // B·P [r, n]
        BLAS.dgemmAccumulate(m: r, n: n, k: n, a: bd, transA: false, lda: n, b: og.gram, transB: false, ldb: n, into: &c)
        var t1 = 0.0
        for k in 0..<r { for i in 0..<n { t1 += ud[i * r + k] * c[k * n + i] } }
        var bpb = [Double](repeating: 0, count: r * r), utu = [Double](repeating: 0, count: r * r)
        BLAS.dgemmAccumulate(m: r, n: r, k: n, a: c, transA: false, lda: n, b: bd, transB: true, ldb: n, into: &bpb)
        BLAS.dgemmAccumulate(m: r, n: r, k: n, a: ud, transA: true, lda: r, b: ud, transB: false, ldb: r, into: &utu)
        var t2 = 0.0
        for k in 0..<(r * r) { t2 += utu[k] * bpb[k] }  // both symmetric: tr(X·Y) = Σ X_kl·Y_kl
        return og.trace - 2 * t1 + t2
    }

    /// The sparse part of W − U·V within the options' budget, and the squared error left.
    func splitSparse(_ lr: Factors, budget: Int) -> (s: CSRMatrix, errSq: Double) {
        var resid = w
        BLAS.gemm(lr.u, lr.v, alpha: -1, beta: 1, into: &resid)
        return LowRankStage.selectSparse(resid, budget: budget, structure: options.structure, norms: norms)
    }

    /// The sparse split of the first low-rank part and the options' alternating refinements
    /// (refactor W − S, re-select S); the best candidate, whether it is the first one, and the
    /// relative error after each step.
    mutating func refineSparse(_ lowRank: Factors, rank r: Int) throws -> (best: Candidate, bestIsFirst: Bool, history: [Double]) {
        let budget = min(options.sparseBudget(rows: out, cols: inn), out * inn)
        var (s, errSq) = splitSparse(lowRank, budget: budget)
        var best = (u: lowRank.u, v: lowRank.v, s: s, errSq: errSq)
        var bestIsFirst = true
        var history = [rel(errSq)]
        if budget > 0 && budget < out * inn {
            for _ in 0..<options.iterations {
                var ws = w
                s.add(to: &ws, scale: -1)
                let lr = try lowRankPart(ws, rank: r).0
                (s, errSq) = splitSparse(lr, budget: budget)
                history.append(rel(errSq))
                if errSq < best.errSq { best = (lr.u, lr.v, s, errSq); bestIsFirst = false }
            }
        }
        return (best, bestIsFirst, history)
    }

    /// ‖(W − U·V − S)·L‖ / ‖W·L‖. Without a sparse part and with the first low-rank part kept,
    /// (W − U·V)·L = W·L − U·V_w (V = V_w·L⁻¹): one product of 2·out·in·r flops on the kept W·L
    /// instead of two more triangular products (equal up to float rounding).
    func whitenedOutputError(_ best: Candidate, bestIsFirst: Bool) -> Double {
        // The output Gram path has no sparse part (`factorsByOutputGram`), so best is the first part.
        if let e = outputGramError { return e.trace > 0 ? (e.errSq / e.trace).squareRoot() : 0 }
        guard let wh = whitening else { return 0 }
        let a = first?.whitened ?? wh.whiten(w)
        let residW: Matrix
        if let f = first, bestIsFirst, best.s.nnz == 0 {
            var rw = f.whitened
            BLAS.gemm(best.u, f.vw, alpha: -1, beta: 1, into: &rw)
            residW = rw
        } else {
            var resid = w
            BLAS.gemm(best.u, best.v, alpha: -1, beta: 1, into: &resid)
            best.s.add(to: &resid, scale: -1)
            residW = wh.whiten(resid)
        }
        let base = a.frobeniusNorm
        return base > 0 ? residW.frobeniusNorm / base : 0
    }
}
