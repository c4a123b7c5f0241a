#!/usr/bin/env python3
"""End-to-end held-out loss of a checkpoint of the trained fixtures (issue 28, item 1).

    tools/eval_loss.py CHECKPOINT.h5 [--text ../shared/fixtures/trained-text.txt] [--export-dtype D] [--json]

Exports CHECKPOINT with `smoe-compress export` into a temporary folder, loads it with the stock
transformers class (MixtralForCausalLM or SwitchTransformersForConditionalGeneration, float32)
and reports the mean loss in nats per predicted byte on the SECOND half of the fixtures' text
(bytes 95,733 to the end: the half the `*.heldout.h5` windows come from; calibration never saw
it). Windows: non-overlapping 128-byte windows starting at byte 95,733 (747 windows, the last
117 bytes unused), all of them:
  * Mixtral-style: causal LM over the window, tokens = bytes; 127 predicted bytes per window.
  * Switch-style: the encoder reads bytes 0-63 of the window, the decoder reads the start token
    256 then bytes 64-126 and predicts bytes 64-127 (teacher forcing); 64 predicted per window.

export builds the config.json of a checkpoint made without a source config from its weights
and transformers' defaults, which do not describe the fixtures exactly (Fixtures/TRAINED.md):
for Mixtral it guesses 2 heads of 32 / 1 KV head (the fixture has 4 heads of 16 / 2 KV heads,
the same weight shapes) and leaves RoPE θ at transformers' 1e6 (the fixture: 1e4); for Switch
it leaves the pad / decoder-start token at 0 (the fixture: 256). The tool therefore sets the
fixtures' values (FIXTURE_CONFIG) in the exported config.json and reports every key it changed
(`config_patch` in --json). The test (tools/test_eval_loss.py) checks that the patched model
reproduces the fixtures' captures, MoE block by MoE block.

--export-dtype D is export's --dtype (f8-block, mxfp4, bf16, ...): the loss of the model as it is
served in that encoding. Without a GPU, transformers dequantizes an FP8 folder on loading: each
weight q·s (an e4m3 value, 4 significant bits, times its block's float32 scale) is rounded to
bfloat16 (8 significant bits), a rounding far below FP8's own and part of what a CPU serves; the
model then runs in float32 as always. The exported expert bytes are in --json
(`exported_expert_bytes`).

Deterministic: fixed windows, no sampling, float32 on CPU, sums in float64. Bad input gives one
`error:` line on stderr and exit status 2. Importable: frontier.py reuses `Evaluator`.
"""

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
HELDOUT_START = 95_733  # first byte of the text's second half (TRAINED.md, "The captures")
WINDOW = 128
SWITCH_START = 256  # Switch decoder start (and pad) token

# The fixtures' architecture (Fixtures/TRAINED.md, "The models"), set over export's config.json.
FIXTURE_CONFIG = {
    "mixtral": {
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        "num_experts_per_tok": 2,
        "router_jitter_noise": 0.0,
        "sliding_window": None,
        "vocab_size": 256,
    },
    "switch_transformers": {
        "num_heads": 4,
        "d_kv": 16,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "tie_word_embeddings": True,
        "router_jitter_noise": 0.0,
        "router_bias": False,
        "router_dtype": "float32",
        "dense_act_fn": "relu",
        "feed_forward_proj": "relu",
        "is_gated_act": False,
        "pad_token_id": SWITCH_START,
        "decoder_start_token_id": SWITCH_START,
        "eos_token_id": 257,
        "vocab_size": 258,
    },
}
D_MODEL = 64


class UsageError(Exception):
    """Bad input: printed as one `error:` line."""


def shared_dir():
    """`<repo>/../shared` (CI: a read-only copy next to the clone); in a git worktree, also the
    main checkout's sibling; $SMOE_SHARED overrides. The first that exists, else the first."""
    candidates = []
    if os.environ.get("SMOE_SHARED"):
        candidates.append(pathlib.Path(os.environ["SMOE_SHARED"]))
    candidates.append(REPO.parent / "shared")
    try:
        common = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--path-format=absolute", "--git-common-dir"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        if common:
            candidates.append(pathlib.Path(common).parent.parent / "shared")
    except (OSError, subprocess.SubprocessError):
        pass
    for c in candidates:
        if (c / "fixtures" / "trained-text.txt").is_file():
            return c
    return candidates[0]


DEFAULT_TEXT = shared_dir() / "fixtures" / "trained-text.txt"


def default_exe():
    """$SMOE_COMPRESS, else the release build, else the debug build of this checkout."""
    if os.environ.get("SMOE_COMPRESS"):
        return pathlib.Path(os.environ["SMOE_COMPRESS"])
    release = REPO / ".build" / "release" / "smoe-compress"
    return release if release.exists() else REPO / ".build" / "debug" / "smoe-compress"


def one_blas_thread():
    """The environment for smoe-compress runs on the tiny fixtures: one OpenBLAS thread unless
    OPENBLAS_NUM_THREADS is set (on a shared, busy CPU, BLAS threads spin: 23 s against 82 s
    for one compress)."""
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def read_heldout(text_path):
    """The bytes of the text's second half."""
    p = pathlib.Path(text_path)
    if not p.is_file():
        raise UsageError(f"{p}: text file not found (the fixtures' trained-text.txt, in ../shared/fixtures/)")
    data = p.read_bytes()
    if len(data) <= HELDOUT_START + WINDOW:
        raise UsageError(f"{p}: {len(data)} bytes; the held-out half starts at byte {HELDOUT_START}, so this is not trained-text.txt")
    return data[HELDOUT_START:]


def window_starts(n_bytes):
    """Offsets (in the held-out half) of the non-overlapping 128-byte windows."""
    return list(range(0, n_bytes - WINDOW + 1, WINDOW))


def torch_modules():
    """(torch, transformers), or UsageError naming what is missing."""
    missing, mods = [], []
    for name in ("torch", "transformers"):
        try:
            mods.append(__import__(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise UsageError(f"eval_loss needs torch and transformers (missing: {', '.join(missing)})")
    return mods


def export(checkpoint, folder, exe=None, dtype=None):
    """`smoe-compress export CHECKPOINT -o FOLDER [--dtype DTYPE]`, then the fixture config set over config.json.
    Returns (model_type, {key: {"export": value or None, "used": value}} for every changed key)."""
    exe = pathlib.Path(exe) if exe else default_exe()
    if not exe.exists():
        raise UsageError(f"{exe}: smoe-compress is not built (swift build --product smoe-compress)")
    if not pathlib.Path(checkpoint).is_file():
        raise UsageError(f"{checkpoint}: checkpoint not found")
    cmd = [str(exe), "export", str(checkpoint), "-o", str(folder), "--quiet"] + (["--dtype", dtype] if dtype else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=one_blas_thread())
    if r.returncode != 0:
        lines = [l for l in r.stderr.splitlines() if l.strip()]
        msg = next((l for l in lines if l.startswith("error:")), lines[-1] if lines else f"exit status {r.returncode}")
        raise UsageError(f"{checkpoint}: smoe-compress export failed: {msg.removeprefix('error: ')}")
    cfg_path = pathlib.Path(folder) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    model_type = cfg.get("model_type")
    if model_type not in FIXTURE_CONFIG:
        raise UsageError(f"{checkpoint}: model type {model_type!r}; eval_loss measures the trained fixtures (mixtral, switch_transformers)")
    width = cfg.get("hidden_size", cfg.get("d_model"))
    if width != D_MODEL:
        raise UsageError(f"{checkpoint}: d_model {width}; eval_loss measures the trained fixtures (d_model {D_MODEL}, byte vocabulary)")
    patch = {}
    for key, value in FIXTURE_CONFIG[model_type].items():
        if cfg.get(key, "<absent>") != value and not (key not in cfg and value is None):
            patch[key] = {"export": cfg.get(key, "absent (transformers default)"), "used": value}
            cfg[key] = value
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return model_type, patch


def load(folder, model_type):
    torch, transformers = torch_modules()
    torch.set_num_threads(1)  # see Evaluator
    cls = transformers.MixtralForCausalLM if model_type == "mixtral" else transformers.SwitchTransformersForConditionalGeneration
    model = cls.from_pretrained(str(folder), dtype=torch.float32).eval()
    if model_type == "mixtral":
        theta = (getattr(model.config, "rope_parameters", None) or {}).get("rope_theta", getattr(model.config, "rope_theta", None))
        if theta != FIXTURE_CONFIG["mixtral"]["rope_theta"]:
            raise UsageError(f"transformers {transformers.__version__} did not take RoPE theta 1e4 from config.json (got {theta})")
    return model


def model_inputs(torch, model_type, windows):
    """Model arguments and the labels (predicted bytes) for a batch of 128-byte windows."""
    ids = torch.tensor(windows, dtype=torch.long)
    if model_type == "mixtral":
        return {"input_ids": ids}, ids[:, 1:]
    start = torch.full((ids.shape[0], 1), SWITCH_START, dtype=torch.long)
    return {"input_ids": ids[:, :64], "decoder_input_ids": torch.cat([start, ids[:, 64:127]], dim=1)}, ids[:, 64:]


def logits_for_labels(model_type, logits):
    return logits[:, :-1] if model_type == "mixtral" else logits


def mean_loss(model, model_type, windows, batch=64):
    """(mean nats per predicted byte, predicted bytes) over the windows (lists of 128 ints)."""
    torch, _ = torch_modules()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            inputs, labels = model_inputs(torch, model_type, windows[i : i + batch])
            logits = logits_for_labels(model_type, model(**inputs).logits).float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            total += float(nll.double().sum())
            count += labels.numel()
    return total / count, count


class Evaluator:
    """Held-out loss of checkpoints: the text read once, transformers imported once."""

    def __init__(self, text=None, exe=None, every=1, export_dtype=None):
        if every < 1:
            raise UsageError(f"--every {every}: must be at least 1")
        self.text_path = pathlib.Path(text) if text else DEFAULT_TEXT
        heldout = read_heldout(self.text_path)
        self.every = every
        self.windows = [list(heldout[s : s + WINDOW]) for s in window_starts(len(heldout))[::every]]
        self.exe = exe
        self.export_dtype = export_dtype
        torch, _ = torch_modules()
        # One thread: the model is tiny, and on a shared CPU two threads were 5-12x slower
        # (measured, same result to the bit).
        torch.set_num_threads(1)

    def evaluate(self, checkpoint):
        with tempfile.TemporaryDirectory(prefix="eval_loss.") as tmp:
            folder = pathlib.Path(tmp) / "model"
            model_type, patch = export(checkpoint, folder, self.exe, self.export_dtype)
            model = load(folder, model_type)
            experts = model.config.num_local_experts if model_type == "mixtral" else model.config.num_experts
            loss, count = mean_loss(model, model_type, self.windows)
            expert_bytes = expert_tensor_bytes(folder)
        return {
            "checkpoint": str(checkpoint),
            "model_type": model_type,
            "export_dtype": self.export_dtype or "auto",
            "experts_per_layer": experts,
            "exported_expert_bytes": expert_bytes,
            "text": str(self.text_path),
            "heldout_bytes": [HELDOUT_START, HELDOUT_START + len(read_heldout(self.text_path))],
            "windows": len(self.windows),
            "window_stride_bytes": WINDOW * self.every,
            "predicted_bytes": count,
            "loss_nats_per_byte": loss,
            "bits_per_byte": loss / math.log(2),
            "config_patch": patch,
        }


def expert_tensor_bytes(folder):
    """Bytes of the `.experts.` tensors of an exported folder (safetensors headers)."""
    import struct

    total = 0
    for f in sorted(pathlib.Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__" and ".experts." in k)
    return total


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def main(argv=None):
    parser = Parser(prog="eval_loss.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="smoe-h5 checkpoint of a trained fixture (original, merged, compressed)")
    parser.add_argument("--text", default=None, help=f"the fixtures' text (default: {DEFAULT_TEXT})")
    parser.add_argument("--exe", default=None, help="smoe-compress binary (default: $SMOE_COMPRESS, else .build/release, else .build/debug)")
    parser.add_argument("--every", type=int, default=1, metavar="K", help="use every K-th window only (default 1: all 747; frontier.py's quick mode)")
    parser.add_argument("--export-dtype", default=None, metavar="D",
                        help="export's --dtype (auto, f32, f16, bf16, f8-block, mxfp4): the loss as served in that encoding")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    try:
        args = parser.parse_args(argv)
        if not pathlib.Path(args.checkpoint).is_file():
            raise UsageError(f"{args.checkpoint}: checkpoint not found")
        result = Evaluator(args.text, args.exe, args.every, args.export_dtype).evaluate(args.checkpoint)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['checkpoint']}: {result['model_type']}, {result['experts_per_layer']} experts per layer "
              f"({result['exported_expert_bytes']} expert bytes exported as {result['export_dtype']}), "
              f"held-out loss {result['loss_nats_per_byte']:.6f} nats/byte ({result['bits_per_byte']:.4f} bits/byte) "
              f"over {result['predicted_bytes']} predicted bytes in {result['windows']} windows")
        if result["config_patch"]:
            print("config.json set to the fixture's values: " + ", ".join(
                f"{k} {v['export']!r} -> {v['used']!r}" for k, v in result["config_patch"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
