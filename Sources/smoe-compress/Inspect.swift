import ArgumentParser
import Foundation
import SMoECompress

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Describe an smoe-h5 file: checkpoint, calibration capture or statistics.")

    @Argument(help: "The file to describe.")
    var file: String

    @Flag(help: "Also read every weight and check it (shapes, expert_map range, NaN/Inf); slower.")
    var check = false

    @OptionGroup var global: GlobalOptions

    func run() throws {
        switch try smoeFileKind(file) {
        case "smoe-checkpoint": try checkpoint()
        case "smoe-calibration": try calibration()
        case "smoe-stats": try stats()
        case let other: throw SMoEError.dataset(file, "/@format", "unknown format \"\(other)\"")
        }
    }

    func checkpoint() throws {
        let r = try CheckpointReader(file)
        let (json, layers, dense) = try Inspection.checkpoint(r)
        if check {
            let progress = global.progress
            for (i, l) in r.layers.enumerated() {
                progress.update("checking", i, r.layers.count)
                _ = try r.readLayer(l.name)
            }
            progress.finish()
        }
        if global.json { return printJSON(json) }
        print("\(file): smoe-checkpoint, architecture \(r.architecture), \(layers.count) MoE layers")
        var t = Table(["layer", "E", "G", "k", "d_model", "d_ff", "experts", "act", "router", "params", "bytes", "ranks", "nnz"])
        for s in layers {
            let c = s.config
            let ranks = s.matrices.compactMap { m in m.ranks.map { "\(m.name):\($0.min()!)-\($0.max()!)" } }
            let nnz = s.matrices.compactMap { m in m.nnz.map { "\(m.name):\($0.reduce(0, +))" } }
            t.add([c.name, "\(c.numExperts)", "\(s.numStored)", "\(c.topK)", "\(c.dModel)", "\(c.dFF)",
                   c.expertType.rawValue + (s.matrices.first?.encoding.isFP8 == true ? " f8" : ""), c.activation.rawValue, c.routerType.rawValue,
                   "\(s.expertParameters)", formatBytes(s.expertFileBytes),
                   ranks.isEmpty ? "-" : ranks.joined(separator: " "), nnz.isEmpty ? "-" : nnz.joined(separator: " ")])
        }
        print(t.render())
        let eb = layers.reduce(0) { $0 + $1.expertFileBytes }
        print("expert bytes: \(formatBytes(eb)) (\(eb) B); dense: \(dense.count) tensors, \(dense.parameters) parameters, \(formatBytes(dense.bytes))")
        print("history:")
        if r.history.isEmpty { print("  (none)") }
        for h in r.history { print("  " + h.serialized()) }
    }

    func calibration() throws {
        let c = try CalibrationReader(file)
        if check {
            for l in c.layers {
                try c.forEachBlock(l.name) { _, _ in }
                if l.hasRouterLogits { _ = try c.routerLogits(l.name) }
                if l.hasOutput { _ = try c.output(l.name) }
            }
        }
        if global.json { return printJSON(Inspection.calibration(c)) }
        print("\(file): smoe-calibration, \(c.layers.count) MoE layers")
        var t = Table(["layer", "index", "tokens", "d_model", "router_logits", "output"])
        for l in c.layers {
            t.add([l.name, "\(l.index)", "\(l.numTokens)", "\(l.dModel)", l.hasRouterLogits ? "yes" : "no", l.hasOutput ? "yes" : "no"])
        }
        print(t.render())
        if !c.source.isEmpty { print("source: \(c.source)") }
    }

    func stats() throws {
        let r = try StatsReader(file)
        if global.json { return printJSON(try Inspection.stats(r)) }
        print("\(file): smoe-stats, \(r.layers.count) MoE layers")
        var t = Table(["layer", "index", "tokens", "E", "k", "max share", "never chosen", "similarity"])
        for l in r.layers {
            let s = try r.read(l.name)
            t.add([l.name, "\(l.index)", "\(l.numTokens)", "\(l.numExperts)", "\(l.topK)", fixed(s.maxShare, 2),
                   s.neverChosen.isEmpty ? "-" : s.neverChosen.map(String.init).joined(separator: " "),
                   l.bases.isEmpty ? "-" : l.bases.map(\.rawValue).joined(separator: ",")])
        }
        print(t.render())
        for l in r.layers { printUsage(try r.read(l.name)) }
        if !r.source.isEmpty { print("source: \(r.source)") }
    }
}
