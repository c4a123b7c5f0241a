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
    var preset: String?
    @Option(help: "MoE layers.") var layers = 2
    @Option(help: "Router slots per layer (E).") var experts = 8
    @Option(help: "Planted families per layer.") var families = 4
    @Option(help: "Experts chosen per token.") var topK = 1
    @Option(help: "Hidden size.") var dModel = 32
    @Option(help: "Expert intermediate size.") var dFF = 64
    @Option(help: "mlp or glu.") var expertType = "mlp"
    @Option(help: "relu, gelu, gelu_tanh or silu.") var activation = "relu"
    @Option(help: "softmax_topk or softmax_topk_norm.") var routerType = "softmax_topk"
    @Option(help: "Relative noise of each copy.") var noise: Float = 0.01
    @Option(help: "Calibration tokens per layer.") var tokens = 1024
    @Option(help: "Random seed.") var seed: UInt64 = 1
    @Option(name: [.customShort("o"), .long], help: "Checkpoint to write.") var output: String
    @Option(help: "Calibration file to write.") var calib: String
    @OptionGroup var global: GlobalOptions

    func validate() throws {
        if let p = preset, p != "switch", p != "mixtral" { throw ValidationError("--preset must be switch or mixtral") }
        guard ExpertType(rawValue: expertType) != nil else { throw ValidationError("--expert-type must be mlp or glu") }
        guard Activation(rawValue: activation) != nil else { throw ValidationError("--activation must be relu, gelu, gelu_tanh or silu") }
        guard RouterType(rawValue: routerType) != nil else { throw ValidationError("--router-type must be softmax_topk or softmax_topk_norm") }
    }

    func run() throws {
        let spec: SyntheticSpec
        switch preset {
        case "switch": spec = .switchFixture
        case "mixtral": spec = .mixtralFixture
        default:
            spec = SyntheticSpec(
                architecture: "synthetic", numLayers: layers, numExperts: experts, families: families, topK: topK,
                dModel: dModel, dFF: dFF, expertType: ExpertType(rawValue: expertType)!,
                activation: Activation(rawValue: activation)!, routerType: RouterType(rawValue: routerType)!,
                noise: noise, tokens: tokens, seed: seed)
        }
        try ensureOutputDiffers(output, from: [calib])
        let truth = try SyntheticGenerator.write(spec, model: output, calibration: calib)
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
