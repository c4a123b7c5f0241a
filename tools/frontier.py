#!/usr/bin/env python3
"""Size / end-to-end loss frontier of the trained fixtures (issue 28, item 3).

    tools/frontier.py [--fixtures trained-mixtral,trained-switch] [--sizes 0.5,0.35,0.25,0.15]
                      [--groups 2,3,4,5,6,7] [--ranks dense,8,16,24] [--work out/frontier]
                      [--every K] [--json FILE] [--skip-targets] [--skip-grid] [--reuse-only]

For each fixture (Fixtures/NAME.h5 with NAME.calib.h5 to calibrate and NAME.heldout.h5 for the
layer errors), with the release smoe-compress (or --exe):
  * the original;
  * `compress --target-size F` for every F, E-slot (default router) and `--router compact
    --uniform-groups` (a compact model has one G in every layer);
  * the uniform grid `compress --groups G [--adaptive] [--rank R]`;
and for each checkpoint: the expert bytes (compress --json `expert_bytes_final`), the mean
held-out layer output error (`mean_relative_error_final` on NAME.heldout.h5) and the end-to-end
held-out loss (tools/eval_loss.py: nats per predicted byte on the second half of
trained-text.txt; --every K uses every K-th 128-byte window only). The table compares, at each
F, the planner's two checkpoints with the best uniform grid point whose expert bytes fit
F × the original's (best by loss, and the one the layer-error objective would pick).

Every checkpoint and its JSON stay in --work (default out/frontier/NAME/TAG.*); a rerun reuses
them, so an interrupted run continues. Prints the markdown table, then writes the JSON (--json).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import eval_loss  # noqa: E402
from eval_loss import REPO, UsageError  # noqa: E402

FIXTURES = REPO / "Fixtures"


def parse_list(text, conv, name):
    try:
        return [conv(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--{name} {text!r}: not a comma-separated list")


def rank_value(x):
    return None if x.strip() == "dense" else int(x)


class Runner:
    def __init__(self, args, evaluator):
        self.exe = pathlib.Path(args.exe) if args.exe else REPO / ".build" / "release" / "smoe-compress"
        if not self.exe.exists():
            raise UsageError(f"{self.exe}: smoe-compress is not built (swift build -c release --product smoe-compress)")
        self.work = pathlib.Path(args.work)
        self.evaluator = evaluator
        self.log = args.verbose
        self.reuse_only = getattr(args, "reuse_only", False)

    def say(self, msg):
        if self.log:
            print(msg, file=sys.stderr, flush=True)

    def compress(self, name, tag, options):
        """(checkpoint, compress report) of `compress NAME.h5 OPTIONS`, reused when present."""
        d = self.work / name
        d.mkdir(parents=True, exist_ok=True)
        out, js = d / f"{tag}.h5", d / f"{tag}.compress.json"
        if not js.exists() and self.reuse_only:
            return None, {"error": "not run (--reuse-only)"}
        if not js.exists():
            cmd = [str(self.exe), "compress", str(FIXTURES / f"{name}.h5"), "--calib", str(FIXTURES / f"{name}.calib.h5"),
                   "--eval-calib", str(FIXTURES / f"{name}.heldout.h5"), *options, "-o", str(out), "--json", "--quiet"]
            t = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True, env=eval_loss.one_blas_thread())
            if r.returncode != 0:
                line = next((l for l in r.stderr.splitlines() if l.startswith("error:")), r.stderr.strip()[-300:])
                self.say(f"{name} {tag}: compress failed: {line}")
                return None, {"error": line}
            js.write_text(r.stdout)
            self.say(f"{name} {tag}: compress {time.time() - t:.0f} s")
        return out, json.loads(js.read_text())["report"]

    def loss(self, name, tag, checkpoint):
        js = self.work / name / f"{tag}.loss-every{self.evaluator.every}.json"
        js.parent.mkdir(parents=True, exist_ok=True)  # the original is measured before any compress
        if not js.exists():
            t = time.time()
            js.write_text(json.dumps(self.evaluator.evaluate(checkpoint), indent=2))
            self.say(f"{name} {tag}: loss {time.time() - t:.0f} s")
        return json.loads(js.read_text())

    def point(self, name, tag, options, kind):
        checkpoint, report = self.compress(name, tag, options)
        if checkpoint is None:
            return {"tag": tag, "kind": kind, "options": options, "error": report["error"]}
        if not report.get("expert_bytes_original"):
            # compress --resume reports only the layers it computed: measure with `eval` instead
            return {"tag": tag, "kind": kind, "options": options, "error": "compress report lists no layers (a --resume run?)"}
        loss = self.loss(name, tag, checkpoint)
        return {
            "tag": tag, "kind": kind, "options": options,
            "expert_bytes": report["expert_bytes_final"], "expert_bytes_original": report["expert_bytes_original"],
            "fraction": report["expert_bytes_final"] / report["expert_bytes_original"],
            "heldout_layer_error": report["mean_relative_error_final"],
            "layer_errors": {l["name"]: l["relative_error_final"] for l in report["layers"]},
            "loss": loss["loss_nats_per_byte"], "experts_per_layer_exported": loss["experts_per_layer"],
        }

    def original(self, name):
        loss = self.loss(name, "original", FIXTURES / f"{name}.h5")
        return {"tag": "original", "kind": "original", "loss": loss["loss_nats_per_byte"], "heldout_layer_error": 0.0,
                "fraction": 1.0, "predicted_bytes": loss["predicted_bytes"], "windows": loss["windows"]}


def best_fitting(points, fraction, key):
    fits = [p for p in points if "error" not in p and p["fraction"] <= fraction + 1e-9]
    return min(fits, key=lambda p: p[key]) if fits else None


def describe(p):
    if p is None:
        return "—"
    return f"{p['loss']:.4f} ({p['tag'].removeprefix('u-')}, {p['fraction']:.3f}, err {p['heldout_layer_error']:.3f})"


def table(results, sizes, suffix=""):
    flags = {"": "", "-sens": " --sensitivity", "-fp8": " --fp8", "-sens-fp8": " --sensitivity --fp8"}[suffix]
    lines = [f"| model | F | original | `--target-size F{flags}` (slots) | `--target-size F{flags} --router compact --uniform-groups` | best uniform by loss | uniform the layer-error objective picks |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for f in sizes:
            t = {p["tag"]: p for p in r["targets"]}
            cells = []
            for tag in (f"target-{f}-slots{suffix}", f"target-{f}-compact{suffix}"):
                p = t.get(tag)
                cells.append("—" if p is None else (p["error"] if "error" in p else
                             f"{p['loss']:.4f} ({p['fraction']:.3f}, err {p['heldout_layer_error']:.3f})"))
            cells.append(describe(best_fitting(r["grid"], f, "loss")))
            cells.append(describe(best_fitting(r["grid"], f, "heldout_layer_error")))
            lines.append(f"| {name} | {f} | {r['original']['loss']:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(message)

    p = Parser(prog="frontier.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", default="trained-mixtral,trained-switch")
    p.add_argument("--sizes", default="0.5,0.35,0.25,0.15")
    p.add_argument("--groups", default="2,3,4,5,6,7")
    p.add_argument("--ranks", default="dense,8,16,24")
    p.add_argument("--no-adaptive", action="store_true", help="the grid without --adaptive points")
    p.add_argument("--work", default=str(REPO / "out" / "frontier"))
    p.add_argument("--every", type=int, default=1, metavar="K")
    p.add_argument("--text", default=None)
    p.add_argument("--exe", default=None, help="smoe-compress (default: the release build)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--sensitivity", action="store_true", help="plan the targets with Fixtures/NAME.sensitivity.json")
    p.add_argument("--fp8", action="store_true", help="plan the targets with --fp8 (FP8 options per layer)")
    p.add_argument("--skip-targets", action="store_true")
    p.add_argument("--skip-grid", action="store_true")
    p.add_argument("--reuse-only", action="store_true", help="run no compress: report the checkpoints already in --work")
    p.add_argument("--verbose", action="store_true", help="one progress line per step on stderr")
    try:
        args = p.parse_args(argv)
        names = parse_list(args.fixtures, str, "fixtures")
        for n in names:
            for suffix in (".h5", ".calib.h5", ".heldout.h5"):
                if not (FIXTURES / f"{n}{suffix}").is_file():
                    raise UsageError(f"{FIXTURES / (n + suffix)}: fixture file not found")
        sizes = parse_list(args.sizes, float, "sizes")
        if any(not 0 < f <= 1 for f in sizes):
            raise UsageError(f"--sizes {args.sizes}: fractions in (0, 1]")
        groups = parse_list(args.groups, int, "groups")
        ranks = parse_list(args.ranks, rank_value, "ranks")
        runner = Runner(args, eval_loss.Evaluator(args.text, args.exe, args.every))
        results = {}
        for name in names:
            r = {"original": runner.original(name), "targets": [], "grid": []}
            if not args.skip_targets:
                extra = (["--sensitivity", str(FIXTURES / f"{name}.sensitivity.json")] if args.sensitivity else []) + (["--fp8"] if args.fp8 else [])
                suffix = ("-sens" if args.sensitivity else "") + ("-fp8" if args.fp8 else "")
                for f in sizes:
                    for router in ("slots", "compact"):
                        # compact needs one G in every layer (compress says so otherwise)
                        opts = ["--target-size", str(f)] + (["--router", "compact", "--uniform-groups"] if router == "compact" else []) + extra
                        r["targets"].append(runner.point(name, f"target-{f}-{router}{suffix}", opts, "target"))
            if not args.skip_grid:
                for g in groups:
                    for adaptive in ([False] if args.no_adaptive else [False, True]):
                        for rank in ranks:
                            tag = f"u-G{g}{'a' if adaptive else ''}-{'dense' if rank is None else f'R{rank}'}"
                            opts = ["--groups", str(g)] + (["--adaptive"] if adaptive else []) + ([] if rank is None else ["--rank", str(rank)])
                            r["grid"].append(runner.point(name, tag, opts, "uniform"))
            results[name] = r
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(results, sizes, ("-sens" if args.sensitivity else "") + ("-fp8" if args.fp8 else "")))
    doc = {"text": str(runner.evaluator.text_path), "every": args.every, "windows": len(runner.evaluator.windows),
           "sizes": sizes, "results": results}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(doc, indent=2))
    else:
        print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
