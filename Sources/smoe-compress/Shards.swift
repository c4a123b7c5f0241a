import ArgumentParser
import Foundation
import SMoECompress

struct Plan: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print how --shard I/N splits a model's MoE layers into N shards (balanced by expert bytes).",
        discussion: """
            Largest layers first, each to the shard with the fewest expert bytes so far (ties to the lower \
            index). Every writing stage run with --shard I/N computes the layers listed for shard I; \
            `assemble` puts the shard files together. More shards than layers leave shards empty.
            """)

    @Argument(help: "The checkpoint to split.") var model: String
    @Option(help: "Number of shards.") var shards: Int
    @OptionGroup var global: GlobalOptions

    func run() throws {
        let reader = try CheckpointReader(model)
        let split = try namingFile(model) { try reader.shardSplit(count: shards) }
        let total = max(split.reduce(0) { $0 + $1.expertBytes }, 1)
        if global.json {
            // The largest layer's expert parameters: what one task holds (tools/slurm sizes --mem by it).
            let largest = try reader.layers.map { try reader.summary($0.name).expertParameters }.max() ?? 0
            return printJSON(.object([
                ("model", .string(model)), ("shards", .int(shards)), ("max_layer_parameters", .int(largest)),
                ("split", .array(split.map { a in
                    .object([("shard", .int(a.shard)), ("layers", JSONValue(a.layers)), ("expert_bytes", .int(a.expertBytes))])
                })),
            ]))
        }
        var t = Table(["shard", "layers", "expert bytes", "share", "names"])
        for a in split {
            t.add(["\(a.shard)/\(shards)", "\(a.layers.count)", formatBytes(a.expertBytes),
                   String(format: "%.1f%%", 100 * Double(a.expertBytes) / Double(total)), a.layers.joined(separator: " ")])
        }
        print(t.render())
    }
}

struct Assemble: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Put the shard files of one sharded run (--shard I/N) together into one checkpoint or statistics file.",
        discussion: """
            Checks every shard: of this model (fingerprint), the same stage and settings, each shard once, no \
            layer twice; shards missing are an error unless --allow-partial (their layers are then copied \
            unchanged from MODEL, or left out of statistics). Copies the shards' layers verbatim, writes the \
            untouched layers and /dense from MODEL as the single run would, and adds one history entry \
            listing the shards. Each bad shard gets one error line.
            """)

    @Argument(help: "The model the shards were computed from.") var model: String
    @Argument(help: "The shard files (any order).") var shards: [String]
    @Option(name: [.customShort("o"), .long], help: "Output file (written to a temporary file, renamed on success).")
    var output: String
    @Flag(help: "Accept missing shards: their layers are copied unchanged (checkpoints) or left out (statistics).")
    var allowPartial = false
    @OptionGroup var global: GlobalOptions

    func run() throws {
        try ensureOutputDiffers(output, from: [model] + shards)
        let reader = try CheckpointReader(model)
        let (assembly, problems) = ShardAssembly.check(model: reader, shards: shards, allowPartial: allowPartial)
        guard let assembly, problems.isEmpty else {
            // One error line per problem: all but the last here, the last as the command's error.
            for p in problems.dropLast() { FileHandle.standardError.write(Data((errorLine(p) + "\n").utf8)) }
            throw problems.last ?? SMoEError("no shard to assemble")
        }
        try assembly.write(to: output)
        let held = assembly.shards.reduce(0) { $0 + $1.header.layers.count }
        if global.json {
            return printJSON(.object([("output", .string(output)), ("kind", .string(assembly.kind)),
                                      ("stage", .string(assembly.stage)), ("history", assembly.historyEntry)]))
        }
        print("wrote \(output): \(assembly.kind) of \(assembly.stage), \(held) layers from \(assembly.shards.count) shards"
              + (assembly.missing.isEmpty ? "" : ", \(assembly.missing.count) layers of missing shards "
                 + (assembly.kind == "smoe-stats" ? "left out" : "copied unchanged") + ": \(assembly.missing.joined(separator: ", "))"))
    }
}
