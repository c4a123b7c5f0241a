#!/usr/bin/env python3
"""Peak memory of the layer-wise calibration capture on a Mixtral-shaped random model (issue 23).

Writes a random Mixtral-style checkpoint (bfloat16; by default d_model 4096, d_ff 14336, 8 experts,
4 layers: 11.8 GB) one decoder layer at a time, as sharded safetensors (one shard per layer plus one
for the embeddings and head) with a model.safetensors.index.json, in the tensor layout transformers'
save_pretrained writes for Mixtral (`model.layers.L.block_sparse_moe.experts.E.w1.weight`, ...), so
the generator holds one layer at most. Then runs

    tools/capture_calibration.py MODEL --layerwise --dtype bfloat16 ...

in a subprocess and reports its wall time and peak RSS (getrusage RUSAGE_CHILDREN: the capture is the
only child waited for) against the capture's own printed estimate (the README formula) and against
the weight bytes; the issue's target is peak RSS <= 0.6 x the weight bytes and within the formula.
The model is deleted afterwards (--keep keeps it). Needs torch, transformers, safetensors, h5py.

Example (about 12 GB of disk, a few minutes on 2 cores):
    python3 tools/bench_capture_memory.py --dir /work/tmp
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_model(path, args):
    """The random checkpoint, one layer (one shard) in memory at a time. Returns the weight bytes."""
    import torch
    import transformers
    from safetensors.torch import save_file
    cfg = transformers.MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_ff, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, num_local_experts=args.experts,
        num_experts_per_tok=2, max_position_embeddings=4096, dtype="bfloat16")
    cfg.save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    head_dim = args.d_model // args.heads
    d, f, kv = args.d_model, args.d_ff, args.kv_heads * head_dim

    def rand(*shape):
        return (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    weight_map, total = {}, 0
    shards = args.layers + 1
    for s in range(shards):
        t = {}
        if s == args.layers:
            t["model.embed_tokens.weight"] = rand(args.vocab, d)
            t["model.norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
            t["lm_head.weight"] = rand(args.vocab, d)
        else:
            p = f"model.layers.{s}."
            t[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
            t[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
            t[p + "self_attn.q_proj.weight"] = rand(d, d)
            t[p + "self_attn.k_proj.weight"] = rand(kv, d)
            t[p + "self_attn.v_proj.weight"] = rand(kv, d)
            t[p + "self_attn.o_proj.weight"] = rand(d, d)
            t[p + "block_sparse_moe.gate.weight"] = rand(args.experts, d)
            for e in range(args.experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                t[q + "w1.weight"] = rand(f, d)
                t[q + "w2.weight"] = rand(d, f)
                t[q + "w3.weight"] = rand(f, d)
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(t, os.path.join(path, name), metadata={"format": "pt"})
        for k, v in t.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
        del t
        print(f"wrote shard {s + 1}/{shards}", file=sys.stderr)
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh, indent=2)
    return total


def parse_size(text):
    m = re.search(r"estimated peak memory ([\d.]+) (GiB|MiB)", text)
    if not m:
        return None
    return float(m.group(1)) * (2**30 if m.group(2) == "GiB" else 2**20)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="where to write the model (a temporary folder inside it; default: the system's)")
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--d-ff", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--keep", action="store_true", help="keep the model folder")
    p.add_argument("--require-targets", action="store_true",
                   help="exit 1 when peak RSS exceeds 0.6 x the weight bytes or the printed estimate")
    args = p.parse_args(argv)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError as e:
        print(f"error: the benchmark needs torch, transformers and safetensors: {e}", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="bench-capture-", dir=args.dir)
    try:
        model = os.path.join(work, "model")
        t0 = time.time()
        weight_bytes = write_model(model, args)
        gen_s = time.time() - t0
        text = os.path.join(work, "text.txt")
        with open(os.path.join(os.path.dirname(TOOLS), "README.md"), encoding="utf-8") as f:
            readme = f.read()
        with open(text, "w", encoding="utf-8") as f:
            f.write(readme * (1 + args.tokens // max(1, len(readme.encode()))))
        cmd = [sys.executable, os.path.join(TOOLS, "capture_calibration.py"), model, "-o", os.path.join(work, "calib.h5"),
               "--text", text, "--tokens", str(args.tokens), "--seq-len", str(args.seq_len), "--dtype", "bfloat16",
               "--layerwise"]
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            print(f"error: the capture failed (exit {r.returncode})", file=sys.stderr)
            return 1
        estimate = parse_size(r.stderr)
        est_line = next((line for line in r.stderr.splitlines() if "estimated peak memory" in line), "")
        gib = 2**30
        print(f"cpu: {cpu_model()} ({os.cpu_count()} cores visible)")
        print(f"model: Mixtral-style, d_model {args.d_model}, d_ff {args.d_ff}, {args.experts} experts, {args.layers} layers, "
              f"bfloat16; weights {weight_bytes / gib:.2f} GiB ({weight_bytes:,} bytes), written in {gen_s:.0f} s")
        print(f"capture: {args.tokens} tokens, seq-len {args.seq_len}, --layerwise --dtype bfloat16: wall {wall:.1f} s")
        print(f"  {est_line.strip()}")
        print(f"peak RSS {peak / gib:.2f} GiB = {peak / weight_bytes:.3f} x the weight bytes (target <= 0.6)"
              + (f"; the estimate {estimate / gib:.2f} GiB ({peak / estimate:.2f} of it)" if estimate else ""))
        ok = peak <= 0.6 * weight_bytes and (estimate is None or peak <= estimate)
        print("targets met" if ok else "targets NOT met")
        return 0 if ok or not args.require_targets else 1
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
