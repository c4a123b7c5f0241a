#!/usr/bin/env python3
"""Per-layer loss sensitivity of the trained fixtures (issue 28, item 2: data for the planner).

    tools/layer_sensitivity.py [--fixtures trained-mixtral,trained-switch] [--settings 1,2,4]
                               [--work out/frontier] [--every K] [--json FILE]
                               [--write-sensitivity DIR]

For each MoE layer of each fixture, compresses ONLY that layer (`compress --layers NAME
--groups G`, dense, for each G in --settings; the other layers stay the original's), takes the
layer's held-out relative output error from compress --json (on NAME.heldout.h5) and the
end-to-end held-out loss from eval_loss.py, and fits the slope d(loss)/d(error) by least
squares through the origin (error 0 is the original, loss unchanged), and c of Δloss ≈ c·error²
(the measured curves are convex: the quadratic fits them better). Prints a markdown table.
Checkpoints and JSON are kept in --work (shared with frontier.py) and reused on a rerun.

--write-sensitivity DIR writes DIR/NAME.sensitivity.json per fixture: the fitted c of every MoE
layer, the input of `compress --target-size F --sensitivity FILE` (ALGORITHM.md §4.3).
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import eval_loss  # noqa: E402
from eval_loss import UsageError  # noqa: E402
from frontier import FIXTURES, Runner, parse_list  # noqa: E402

try:
    import h5py
except ImportError:  # the layer names are then read from compress --json
    h5py = None


def layer_names(name):
    with h5py.File(FIXTURES / f"{name}.h5", "r") as f:
        return sorted(f["moe_layers"], key=lambda n: int(f["moe_layers"][n].attrs["index"]))


SENSITIVITY_FORMAT = "smoe-compress layer sensitivity"


def fit_quadratic(points):
    """c of Δloss ≈ c·error², least squares through the origin over the points
    ({"layer_error", "delta_loss"})."""
    return sum(q["layer_error"] ** 2 * q["delta_loss"] for q in points) / sum(q["layer_error"] ** 4 for q in points)


def sensitivity_document(model, rows, every=None, settings=None):
    """The sensitivity file of one model: `rows` are this script's rows of that model
    (`layer`, `quadratic` = c in Δloss ≈ c·error², `points`). Raises UsageError on a c that is
    not a finite number >= 0 (smoe-compress would refuse it)."""
    layers = {}
    for r in rows:
        c = float(r["quadratic"])
        if not (c == c and c not in (float("inf"), float("-inf"))):
            raise UsageError(f"{model}: layer {r['layer']}: the fitted sensitivity is not finite")
        # A layer whose loss fell when it was compressed fits c < 0: it costs nothing.
        layers[r["layer"]] = max(c, 0.0)
    if len(layers) != len(rows):
        raise UsageError(f"{model}: a layer is listed twice")
    return {"format": SENSITIVITY_FORMAT, "version": 1, "rule": "delta_loss = c * relative_error^2",
            "model": str(model), "every": every, "settings": settings, "layers": layers,
            "points": {r["layer"]: r.get("points", []) for r in rows}}


def write_sensitivity(path, doc):
    """Writes atomically (a temporary file renamed into place)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


def main(argv=None):
    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(message)

    p = Parser(prog="layer_sensitivity.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", default="trained-mixtral,trained-switch")
    p.add_argument("--settings", default="1,2,4", help="groups G of the one compressed layer (dense)")
    p.add_argument("--work", default=str(eval_loss.REPO / "out" / "frontier"))
    p.add_argument("--every", type=int, default=1, metavar="K")
    p.add_argument("--text", default=None)
    p.add_argument("--exe", default=None)
    p.add_argument("--json", default=None, metavar="FILE")
    p.add_argument("--write-sensitivity", default=None, metavar="DIR", help="write DIR/NAME.sensitivity.json per fixture")
    p.add_argument("--verbose", action="store_true")
    try:
        args = p.parse_args(argv)
        if h5py is None:
            raise UsageError("layer_sensitivity needs h5py (to read the layer names)")
        names = parse_list(args.fixtures, str, "fixtures")
        settings = parse_list(args.settings, int, "settings")
        runner = Runner(args, eval_loss.Evaluator(args.text, args.exe, args.every))
        rows = []
        for name in names:
            base = runner.original(name)["loss"]
            for index, layer in enumerate(layer_names(name)):
                points = []
                for g in settings:
                    pt = runner.point(name, f"layer{index}-G{g}", ["--layers", layer, "--groups", str(g)], "layer")
                    if "error" in pt:
                        raise UsageError(f"{name} {layer} G {g}: {pt['error']}")
                    points.append({"groups": g, "layer_error": pt["layer_errors"][layer], "delta_loss": pt["loss"] - base})
                sxx = sum(q["layer_error"] ** 2 for q in points)
                slope = sum(q["layer_error"] * q["delta_loss"] for q in points) / sxx
                quad = fit_quadratic(points)
                rows.append({"fixture": name, "index": index, "layer": layer, "original_loss": base, "slope": slope,
                             "quadratic": quad, "points": points})
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| fixture | layer | " + " | ".join(f"G {g}: error → Δloss" for g in settings) + " | slope Δloss / error | c in Δloss ≈ c·error² |")
    print("|---|---|" + "---|" * len(settings) + "---|---|")
    for r in rows:
        cells = " | ".join(f"{q['layer_error']:.3f} → {q['delta_loss']:+.4f}" for q in r["points"])
        print(f"| {r['fixture']} | {r['index']} `{r['layer']}` | {cells} | {r['slope']:.3f} | {r['quadratic']:.3f} |")
    if args.write_sensitivity:
        out = pathlib.Path(args.write_sensitivity)
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            mine = [r for r in rows if r["fixture"] == name]
            write_sensitivity(out / f"{name}.sensitivity.json",
                              sensitivity_document(f"Fixtures/{name}.h5", mine, args.every, settings))
    doc = {"every": args.every, "settings": settings, "rows": rows}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
