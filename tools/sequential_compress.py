#!/usr/bin/env python3
"""Sequential calibration driver (issue 23, item 2): compress a checkpoint one MoE layer at a time,
each layer calibrated on the inputs the already-compressed layers before it produce.

    tools/sequential_compress.py ORIGINAL.h5 --text TEXT [--text-range START:END] [--windows N]
        --tokens N [--seq-len L] [--targets reference|shifted] -o OUT.h5 -- <compress options>

Steps (docs/ALGORITHM.md §3d; README, "Sequential calibration"):
  1. `smoe-compress export ORIGINAL.h5` once into WORK/reference (the reference model).
  2. For each MoE layer l in index order (for an encoder-decoder: the encoder's first):
       capture  -- layer 0: the plain capture of the reference; later layers: the current checkpoint
                   (layers < l compressed) exported and captured with `capture_calibration.py
                   --layerwise --reference WORK/reference --targets T` (inputs and router logits of
                   the compressed prefix; `output` the original model's block on its own inputs
                   for the same token with T = reference, error compensation; the compressed
                   model's own block with T = shifted);
       compress -- `smoe-compress compress CURRENT --layers l --calib CAPTURE_l
                   --refit-targets capture <compress options> -o WORK/step-<i>.h5`.
  3. The last step is copied to OUT.h5 (temporary name, then rename), with OUT.h5.sequential.json
     beside it: the driver's settings and each step's capture and compress result. Each compress
     step is also in the checkpoint's history (one `compress` entry per layer).

Only the E-slot layout (`--router slots`, the default; with or without `--rank`): a compact or pruned
layer changes the expert count, and a Hugging Face config holds one count, so a partly compact model
cannot be exported for the next capture. `--shard` does not compose: layer l needs layers < l.

Reruns with the same work directory (default OUT.h5.seq/) reuse every finished step whose inputs
match (a key over the original file, the text, the capture and compress settings and the previous
step). Deterministic: the same inputs give the same checkpoint. Bad input: one `error:` line on
stderr, exit status 2.
"""

import argparse
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

TOOLS = pathlib.Path(__file__).resolve().parent
REPO = TOOLS.parent
CAPTURE = TOOLS / "capture_calibration.py"
VERSION = 1

# compress options the driver sets itself, or that do not compose with a layer-at-a-time run.
OWNED = {"--layers": "the driver compresses one layer per step",
         "--calib": "the driver makes one capture per layer",
         "--refit-targets": "the driver sets --refit-targets capture",
         "-o": "give -o to the driver", "--output": "give -o to the driver",
         "--shard": "layer l needs the compressed layers before it, so the steps cannot run in parallel",
         "--resume": "the driver reuses its own finished steps (work directory)",
         "--target-size": "a size budget is planned across all layers at once; use uniform settings",
         "--adaptive": "a shared budget of groups is planned across all layers at once; use uniform settings",
         "--plan-only": "nothing to plan per layer"}


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_compress_options(opts):
    for i, o in enumerate(opts):
        name = o.split("=", 1)[0]
        if name in OWNED:
            fail(f"compress option {name} cannot be used here: {OWNED[name]}")
        if name == "--prune":
            fail("sequential calibration supports the E-slot layout only: --prune changes the expert count, "
                 "and a partly pruned model cannot be exported for the next layer's capture")
        if name == "--router":
            v = o.split("=", 1)[1] if "=" in o else (opts[i + 1] if i + 1 < len(opts) else "")
            if v != "slots":
                fail(f"sequential calibration supports the E-slot layout only (--router slots): --router {v} changes "
                     "the expert count, and a partly compact model cannot be exported for the next layer's capture")


def find_binary(arg):
    for p in ([arg] if arg else []) + [os.environ.get("SMOE_COMPRESS"), REPO / ".build/release/smoe-compress",
                                        REPO / ".build/debug/smoe-compress", shutil.which("smoe-compress")]:
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return str(p)
    fail("no smoe-compress binary: build it (swift build -c release --product smoe-compress) or give --bin")


def run(cmd, what):
    r = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
        fail(f"{what} failed: {lines[-1] if lines else f'exit status {r.returncode}'}")
    return r.stdout


def moe_layers(path):
    """[(index, name)] of the checkpoint's MoE layers in index order."""
    try:
        import h5py
    except ImportError:
        fail("the driver needs h5py (pip install h5py)")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != "smoe-checkpoint":
                fail(f"{path}: not an smoe-checkpoint file")
            g = f["moe_layers"]
            return sorted((int(g[n].attrs["index"]), n) for n in g)
    except (OSError, KeyError) as e:
        fail(f"{path}: cannot read it as an smoe-checkpoint: {e}")


def parse_range(s, n):
    try:
        a, b = s.split(":")
        a = int(a) if a else 0
        b = int(b) if b else n
    except ValueError:
        fail(f"--text-range {s}: expected START:END (byte offsets)")
    if not 0 <= a < b <= n:
        fail(f"--text-range {s}: outside the text's {n} bytes or empty")
    return a, b


def select_text(args):
    """The calibration text (bytes): the range, or --windows evenly spaced windows of --seq-len bytes
    in it (window i starts at START + i * ((END - START) // N), as the fixtures' captures)."""
    try:
        data = pathlib.Path(args.text).read_bytes()
    except OSError as e:
        fail(f"{args.text}: cannot read it: {e}")
    a, b = parse_range(args.text_range, len(data)) if args.text_range else (0, len(data))
    if args.windows:
        stride = (b - a) // args.windows
        if stride < args.seq_len:
            fail(f"--windows {args.windows} of --seq-len {args.seq_len} bytes do not fit in {b - a} bytes")
        parts = [data[a + i * stride: a + i * stride + args.seq_len] for i in range(args.windows)]
        out = b"".join(parts)
    else:
        out = data[a:b]
    try:
        out.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"the selected text is not valid UTF-8 (a cut inside a character, byte {e.start}): move --text-range")
    return out


def key_of(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def file_id(path):
    st = os.stat(path)
    return [str(pathlib.Path(path).resolve()), st.st_size, st.st_mtime_ns]


def load_step(meta_path, key, outputs):
    try:
        m = json.loads(pathlib.Path(meta_path).read_text())
    except (OSError, ValueError):
        return None
    if m.get("key") != key or not all(pathlib.Path(o).is_file() for o in outputs):
        return None
    return m


def write_json(path, obj):
    tmp = pathlib.Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def export(binary, ckpt, folder, family, patch):
    if folder.exists():
        shutil.rmtree(folder)
    cmd = [binary, "export", ckpt, "-o", folder, "--quiet"] + (["--family", family] if family else [])
    run(cmd, f"smoe-compress export {ckpt}")
    if patch:
        cfg_path = folder / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.update(patch)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    compress_opts = []
    if "--" in argv:
        i = argv.index("--")
        argv, compress_opts = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(
        prog="sequential_compress.py",
        description="Sequential calibration: compress an smoe-checkpoint one MoE layer at a time, layer l "
                    "calibrated on the inputs the compressed layers 0..l-1 produce, with targets from the "
                    "original model on the same tokens (error compensation). Options after `--` go to every "
                    "`smoe-compress compress` step (e.g. -- --groups 4 --rank 16).",
        epilog="Only the E-slot layout (--router slots, the default, with or without --rank): a compact or pruned "
               "layer changes the expert count and a partly compact model cannot be exported for the next capture. "
               "Does not compose with --shard: layer l needs the compressed layers before it, so the steps run in "
               "order. Reruns with the same --work-dir reuse the finished steps whose inputs match.")
    p.add_argument("original", help="the original smoe-checkpoint (as `smoe-compress import` writes)")
    p.add_argument("-o", "--output", required=True, help="output checkpoint (written under a temporary name, then renamed)")
    p.add_argument("--text", required=True, help="UTF-8 calibration text")
    p.add_argument("--text-range", help="START:END byte offsets of the text to use (default: all)")
    p.add_argument("--windows", type=int, help="use N evenly spaced windows of --seq-len bytes of the range "
                                               "(byte-level models: one window per sequence); default: the range from its start")
    p.add_argument("--tokens", type=int, required=True, help="calibration tokens per layer")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--targets", choices=["reference", "shifted"], default="reference",
                   help="capture `output` of layers after the first: `reference` (default), the original model's "
                        "block on its own inputs for the same token (error compensation); `shifted`, the compressed "
                        "model's own original block on the shifted inputs")
    p.add_argument("--tokenizer", help="tokenizer folder (exports hold none; default: byte-level for models without one)")
    p.add_argument("--family", help="passed to `smoe-compress export` for checkpoints not made by import")
    p.add_argument("--config-patch", help="JSON object (or @FILE) of config.json keys set in every exported folder, "
                                          "for checkpoints whose built config does not describe the model exactly")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="capture compute dtype")
    p.add_argument("--work-dir", help="per-step captures and checkpoints (default: OUTPUT.seq/); kept for reruns")
    p.add_argument("--bin", help="smoe-compress binary (default: $SMOE_COMPRESS, .build/release, .build/debug, PATH)")
    args = p.parse_args(argv)

    check_compress_options(compress_opts)
    if args.tokens < 1 or args.seq_len < 1 or args.batch_size < 1 or (args.windows is not None and args.windows < 1):
        fail("--tokens, --seq-len, --batch-size and --windows must be positive")
    if not os.path.isfile(args.original):
        fail(f"{args.original}: no such file")
    patch = None
    if args.config_patch:
        src = args.config_patch
        try:
            patch = json.loads(pathlib.Path(src[1:]).read_text() if src.startswith("@") else src)
        except (OSError, ValueError) as e:
            fail(f"--config-patch: not a JSON object: {e}")
        if not isinstance(patch, dict):
            fail("--config-patch: not a JSON object")
    binary = find_binary(args.bin)
    layers = moe_layers(args.original)
    if not layers:
        fail(f"{args.original}: no MoE layers")
    out = pathlib.Path(args.output)
    work = pathlib.Path(args.work_dir or str(out) + ".seq")
    work.mkdir(parents=True, exist_ok=True)

    text = select_text(args)
    text_path = work / "text.txt"
    if not text_path.exists() or text_path.read_bytes() != text:
        text_path.write_bytes(text)
    bin_version = run([binary, "--version"], "smoe-compress --version").strip()
    base = {"driver": VERSION, "original": file_id(args.original), "text_sha256": hashlib.sha256(text).hexdigest(),
            "tokens": args.tokens, "seq_len": args.seq_len, "batch_size": args.batch_size, "dtype": args.dtype,
            "tokenizer": args.tokenizer, "family": args.family, "config_patch": patch, "targets": args.targets,
            "compress": compress_opts, "smoe_compress": bin_version}

    # 1. the reference (original) export
    ref = work / "reference"
    ref_key = key_of("reference", base["original"], args.family, patch, bin_version)
    if load_step(work / "reference.json", ref_key, [ref / "config.json"]) is None:
        print(f"exporting the original to {ref}", file=sys.stderr)
        export(binary, args.original, ref, args.family, patch)
        write_json(work / "reference.json", {"key": ref_key})
    else:
        print(f"reusing {ref}", file=sys.stderr)

    # 2. one layer per step
    current, prev_key, steps = args.original, key_of(base), []
    cap_common = ["--text", text_path, "--tokens", args.tokens, "--seq-len", args.seq_len,
                  "--batch-size", args.batch_size, "--dtype", args.dtype] + \
                 (["--tokenizer", args.tokenizer] if args.tokenizer else [])
    for step, (index, name) in enumerate(layers):
        key = key_of(prev_key, step, name)
        ckpt, cap, meta = work / f"step-{step}.h5", work / f"step-{step}.calib.h5", work / f"step-{step}.json"
        m = load_step(meta, key, [ckpt, cap])
        if m is not None:
            print(f"layer {name} ({step + 1}/{len(layers)}): reusing {ckpt}", file=sys.stderr)
        else:
            for stale in (ckpt, cap):
                stale.unlink(missing_ok=True)
            print(f"layer {name} ({step + 1}/{len(layers)}): capture", file=sys.stderr)
            tmp_cap = work / f"step-{step}.calib.tmp.h5"
            if step == 0:
                capture = "plain capture of the original"
                run([sys.executable, CAPTURE, ref, "-o", tmp_cap] + cap_common, "capture of the original")
            else:
                capture = f"layer-wise capture of step {step - 1} with --reference the original, --targets {args.targets}"
                folder = work / "current"
                export(binary, current, folder, args.family, patch)
                tok = [] if args.tokenizer else (["--tokenizer", ref] if any(
                    (ref / t).exists() for t in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")) else [])
                run([sys.executable, CAPTURE, folder, "-o", tmp_cap, "--layerwise", "--reference", ref,
                     "--targets", args.targets] + cap_common + tok, f"capture of step {step - 1}")
                shutil.rmtree(folder)
            os.replace(tmp_cap, cap)
            print(f"layer {name} ({step + 1}/{len(layers)}): compress", file=sys.stderr)
            tmp_ckpt = work / f"step-{step}.tmp.h5"
            res = run([binary, "compress", current, "--layers", name, "--calib", cap, "--refit-targets", "capture",
                       *compress_opts, "-o", tmp_ckpt, "--json", "--quiet"], f"smoe-compress compress --layers {name}")
            os.replace(tmp_ckpt, ckpt)
            try:
                result = json.loads(res)
            except ValueError:
                result = res
            m = {"key": key, "layer": name, "index": index, "capture": capture, "compress": result}
            write_json(meta, m)
        steps.append({k: m[k] for k in ("layer", "index", "capture", "compress")})
        current, prev_key = ckpt, key

    # 3. the output, atomically, and the note
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    shutil.copyfile(current, tmp)
    note = {"sequential_calibration": {k: v for k, v in base.items() if k not in ("original",)},
            "original": str(pathlib.Path(args.original).resolve()), "text": str(pathlib.Path(args.text).resolve()),
            "text_range": args.text_range, "windows": args.windows, "work_dir": str(work.resolve()), "steps": steps}
    write_json(str(out) + ".sequential.json", note)
    os.replace(tmp, out)
    print(f"wrote {out} ({len(layers)} layers, sequential calibration, targets {args.targets})", file=sys.stderr)


if __name__ == "__main__":
    main()
