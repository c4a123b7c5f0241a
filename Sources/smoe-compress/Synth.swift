import ArgumentParser
import Foundation
import SMoECompress

struct Synth: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a planted (synthetic) checkpoint and its calibration file, with known answers.",
        discussion: """
            Each layer's experts are noisy copies of --families prototype experts, each copy with a random \
            hidden-neuron permutation. The planted family, permutation and usage of every slot are stored \
            under /moe_layers/<name>/planted/. --preset switch|mixtral reproduces the committed fixtures.
            """)

    @Option(help: "switch or mixtral: the committed fixtures' settings (other options then override nothing).")
    var preset: Preset?
    @Option(help: "MoE layers.") var layers = 2
    @Option(help: "Router slots per layer (E).") var experts = 8
    @Option(help: "Planted families per layer.") var families = 4
    @Option(help: "Experts chosen per token.") var topK = 1
    @Option(help: "Hidden size.") var dModel = 32
    @Option(help: "Expert intermediate size.") var dFF = 64
    @Option(help: "mlp or glu.") var expertType: ExpertType = .mlp
    @Option(help: "relu, gelu, gelu_tanh or silu.") var activation: Activation = .relu
    @Option(help: "softmax_topk, softmax_topk_norm, sigmoid_topk, sigmoid_topk_norm or topk_softmax.") var routerType: RouterType = .softmax_topk
    @Option(help: "Expert groups of grouped top-k (DeepSeek-V3 n_group; 1: none).") var expertGroups = 1
    @Option(help: "Groups eligible per token (topk_group).") var topkGroups = 1
    @Option(help: "Every routing weight times this (routed_scaling_factor).") var routedScalingFactor: Float = 1
    @Flag(help: "Add a per-slot selection bias (DeepSeek-V3 e_score_correction_bias: for the choice only), N(0, σ²) with σ = --selection-bias-std.")
    var selectionBias = false
    @Option(help: "Standard deviation of the selection bias.") var selectionBiasStd: Float = 0.02
    @Option(help: "Relative noise of each copy.") var noise: Float = 0.01
    @Option(help: "Calibration tokens per layer.") var tokens = 1024
    @Option(help: "Random seed.") var seed: UInt64 = 1
    @Option(help: "Stored float type of the weights: f32, f16 or bf16 (the capture is computed on the stored weights).")
    var dtype: StoredType = .f32
    @Option(name: [.customShort("o"), .long], help: "Checkpoint to write.") var output: String
    @Option(help: "Calibration file to write.") var calib: String
    @OptionGroup var global: GlobalOptions

    enum Preset: String, ExpressibleByArgument { case `switch`, mixtral }

    enum StoredType: String, ExpressibleByArgument {
        case f32, f16, bf16
        var storage: StorageType { self == .f16 ? .f16 : self == .bf16 ? .bf16 : .f32 }
    }

    func run() throws {
        let spec: SyntheticSpec
        switch preset {
        case .switch: spec = .switchFixture
        case .mixtral: spec = .mixtralFixture
        case nil:
            var s = SyntheticSpec(
                architecture: "synthetic", numLayers: layers, numExperts: experts, families: families, topK: topK,
                dModel: dModel, dFF: dFF, expertType: expertType, activation: activation, routerType: routerType,
                noise: noise, tokens: tokens, seed: seed)
            (s.numGroups, s.topKGroups, s.routedScalingFactor) = (expertGroups, topkGroups, routedScalingFactor)
            s.selectionBiasStd = selectionBias ? selectionBiasStd : 0
            spec = s
        }
        try ensureOutputDiffers(output, from: [calib])
        let truth = try SyntheticGenerator.write(spec, model: output, calibration: calib, storage: dtype.storage)
        if global.json {
            return printJSON(.object([
                ("model", .string(output)), ("calibration", .string(calib)),
                ("layers", .array(truth.map { .object([("name", .string($0.name)), ("family", JSONValue($0.family)),
                                                        ("counts", JSONValue($0.counts))]) })),
            ]))
        }
        print("wrote \(output) and \(calib): \(spec.numLayers) layers, \(spec.numExperts) experts in \(spec.families) families")
        for t in truth { print("  \(t.name): family \(t.family), usage \(t.counts)") }
    }
}
