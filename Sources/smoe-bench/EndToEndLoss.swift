import Foundation
import SMoECompress

/// The end-to-end held-out loss of checkpoints of a trained fixture (issue 28, item 1), beside
/// the layer errors of `smoe-bench fidelity`: each checkpoint is written by the `smoe-compress`
/// built beside this binary (the same command line a user runs, with `--eval-calib` on the
/// held-out capture, so its layer error is printed too) and measured by `tools/eval_loss.py
/// --json --every K` (torch and transformers: export, the fixture's config, nats per predicted
/// byte on the text's second half). `make` returns nil and the reason, printed as a skip, where
/// the tool, the binary or the Python packages are missing.
struct EndToEndLoss {
    let binary: String
    let script: String
    let every: Int
    let dir: String
    /// The original fixture's loss, stated beside every compressed figure.
    let original: Double

    static func make(fixture: String, every: Int) -> (value: EndToEndLoss?, reason: String) {
        guard let script = repositoryFile("tools/eval_loss.py") else {
            return (nil, "tools/eval_loss.py not found (run from the repository root)")
        }
        let binary = siblingSmoeCompress()
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            return (nil, "no smoe-compress at \(binary) (swift build -c release --product smoe-compress)")
        }
        let dir = NSTemporaryDirectory() + "smoe-fidelity-\(getpid())"
        do {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let partial = EndToEndLoss(binary: binary, script: script, every: every, dir: dir, original: .nan)
            let original = try partial.loss(fixture)
            return (EndToEndLoss(binary: binary, script: script, every: every, dir: dir, original: original), "")
        } catch let e as Skip {
            return (nil, e.reason)
        } catch {
            return (nil, "\(error)")
        }
    }

    /// eval_loss.py exits 2 with one `error:` line naming the missing packages.
    struct Skip: Error { let reason: String }

    /// The loss of `checkpoint` (nats per predicted byte).
    func loss(_ checkpoint: String) throws -> Double {
        let r = runPython([script, checkpoint, "--json", "--every", "\(every)", "--exe", binary])
        let err = r.err.split(separator: "\n").first { $0.hasPrefix("error:") }.map(String.init) ?? r.err
        if r.status == 2 && err.contains("needs torch and transformers") { throw Skip(reason: "python3: \(err)") }
        guard r.status == 0, let v = (try? JSONValue.parse(r.out))?["loss_nats_per_byte"]?.doubleValue else {
            throw SMoEError("tools/eval_loss.py \(checkpoint) failed (exit \(r.status)): \(err)")
        }
        return v
    }

    /// `smoe-compress compress MODEL --calib CALIB --eval-calib HELDOUT ARGS -o TMP` and the
    /// loss of TMP, with the binary's held-out mean layer error (the in-process figure it must
    /// equal: same library, same settings).
    func compressed(model: String, calib: String, heldout: String, _ args: [String]) throws -> (loss: Double, error: Double) {
        let out = dir + "/c.h5", log = dir + "/c.json"
        defer { try? FileManager.default.removeItem(atPath: out) }
        let run = try spawnAndMeasure(binary, ["compress", model, "--calib", calib, "--eval-calib", heldout] + args
                                      + ["-o", out, "--json", "--quiet"], stdoutPath: log)
        let doc = try? JSONValue.parse(String(contentsOfFile: log, encoding: .utf8))
        guard run.status == 0, let error = doc?["report"]?["mean_relative_error_final"]?.doubleValue else {
            throw SMoEError("smoe-compress compress \(args.joined(separator: " ")) failed (exit \(run.status))")
        }
        return (try loss(out), error)
    }

    func remove() { try? FileManager.default.removeItem(atPath: dir) }
}
