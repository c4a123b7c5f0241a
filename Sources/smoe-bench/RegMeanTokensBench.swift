import Foundation
import SMoECompress

/// Issue 28, item 4: does RegMean's ridge solve beat the frequency fallback when a group has
/// fewer routed tokens than d_model? For each calibration token count N, the held-out mean layer
/// output error of `compress --groups G` (regmean+refit) with the fallback rule (a group with
/// fewer than d_model distinct routed tokens takes the frequency average) against always solving
/// (the ridge towards the frequency average makes the system well posed). On the trained
/// fixtures (calibration capped at N tokens, measured on all 1024 held-out tokens) and on a
/// fine-grained synthetic layer (64 experts, top-8; its capture split into calibration and
/// held-out halves). Options: `--fixtures DIR`.
func regmeanTokensBench(_ args: [String]) throws {
    let dir = args.firstIndex(of: "--fixtures").map { args[$0 + 1] } ?? "Fixtures"
    func compare(_ model: CheckpointReader, calib: CalibrationReader, heldout: CalibrationReader, storage: StorageType,
                 groups: Int, counts: [Int]) throws {
        printRow("  tokens  fallback groups  error (fallback rule)  error (always solve)")
        for n in counts {
            var errors: [Double] = []
            var fallbacks = 0
            for minTokens in [nil, 1] as [Int?] {
                var merge = MergeSettings(groups: groups, tokens: TokenSettings(maxTokens: n))
                merge.merging.minTokens = minTokens
                let stage = try CompressStage(model: model, calibration: calib, evaluation: heldout, stats: nil,
                                              settings: CompressSettings(merge: merge, lowRank: nil), storage: storage)
                let run = try stage.run(model: model) { _ in }
                if minTokens == nil {
                    fallbacks = run.reports.reduce(0) { $0 + ($1.merge?.groups.filter { $0.warning != nil }.count ?? 0) }
                }
                errors.append(stage.report(run.reports).evaluation.meanRelativeError)
            }
            printRow(String(format: "  %6d  %15d  %21.4f  %20.4f", n, fallbacks, errors[0], errors[1]))
        }
    }
    for name in ["trained-switch", "trained-mixtral"] {
        printRow("\n\(name), G 4 (d_model 64; held-out mean layer error)")
        try compare(try CheckpointReader("\(dir)/\(name).h5"), calib: try CalibrationReader("\(dir)/\(name).calib.h5"),
                    heldout: try CalibrationReader("\(dir)/\(name).heldout.h5"), storage: .f16, groups: 4,
                    counts: [32, 64, 128, 256, 512, 1024])
    }
    // A fine-grained layer: 64 experts top-8 from 16 planted families with large noise (the
    // experts differ), d_model 128; 16384 captured tokens, the first 8192 to calibrate, the rest
    // held out.
    let tmp = NSTemporaryDirectory() + "smoe-regmean-bench-\(getpid())"
    try FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(atPath: tmp) }
    let spec = SyntheticSpec(architecture: "mixtral", numLayers: 1, numExperts: 64, families: 16, topK: 8, dModel: 128, dFF: 64,
                             expertType: .glu, activation: .silu, routerType: .softmax_topk_norm, noise: 0.5, tokens: 16384, seed: 28)
    _ = try SyntheticGenerator.write(spec, model: tmp + "/m.h5", calibration: tmp + "/all.h5")
    let all = try CalibrationReader(tmp + "/all.h5")
    for (file, range) in [("calib", 0..<8192), ("heldout", 8192..<16384)] {
        let w = try CalibrationWriter(destination: "\(tmp)/\(file).h5", source: "regmean-tokens bench split")
        for info in all.layers {
            _ = try w.write(layer: info.name, index: info.index, hiddenStates: try all.hiddenStates(info.name, rows: range),
                            routerLogits: try all.routerLogits(info.name, rows: range), output: try all.output(info.name, rows: range))
        }
        try w.commit()
    }
    printRow("\nsynthetic fine-grained layer: 64 experts top-8, d_model 128, G 32 (held-out mean layer error)")
    try compare(try CheckpointReader(tmp + "/m.h5"), calib: try CalibrationReader(tmp + "/calib.h5"),
                heldout: try CalibrationReader(tmp + "/heldout.h5"), storage: .f32, groups: 32,
                counts: [256, 512, 1024, 2048, 4096, 8192])
}
