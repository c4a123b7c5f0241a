#!/usr/bin/env python3
"""Capture calibration data for smoe-compress from a Hugging Face MoE model.

Runs the model (PyTorch + transformers) on text and records, for every MoE block, what
`smoe-compress` needs (docs/FORMAT.md section 2, an `smoe-calibration` HDF5 file):

    /moe_layers/<name>/hidden_states  [N, d_model]  the block's input (after the pre-norm)
    /moe_layers/<name>/router_logits  [N, E]        router logits of those tokens
    /moe_layers/<name>/output         [N, d_model]  the routed experts' weighted output

one row per real token (padding is never recorded), float32. Layer names are the MoE block
prefixes of the checkpoint's own tensor names, exactly what `smoe-compress import` produces
(`model.layers.3.block_sparse_moe`, `model.layers.3.mlp`, `encoder.block.1.layer.1.mlp`), and
the `index` attribute follows import's order (encoder before decoder, then by layer number).

Families: those of smoe-compress's family table, read from tools/model_families.json (generated
from Sources/SMoECompress/Formats/ModelFamilies.swift and kept equal to it by a test): Mixtral,
SwitchTransformers (encoder and decoder; decoder inputs are the text shifted right),
Qwen2-MoE / Qwen3-MoE, OLMoE, DeepSeek-MoE. For blocks with shared experts (Qwen2-MoE
`shared_expert` + `shared_expert_gate`, DeepSeek `shared_experts`) the shared contribution is
subtracted from `output`, because import leaves shared experts in /dense: `output` is what the
imported layer computes. Router logits are recomputed in float32 from the block input and the
router weight (the same numbers the router module computes, independent of transformers'
version-specific return values).

Text: a UTF-8 file (`--text`), or a `datasets` split (`--dataset wikitext --dataset-config
wikitext-2-raw-v1 --split train`) when the datasets package is installed. It is tokenized with
the model folder's tokenizer (or `--tokenizer`); a folder without one (a randomly initialised
test model) falls back to UTF-8 bytes modulo the vocabulary size. Tokens are cut into
sequences of `--seq-len`, run in batches of `--batch-size` (the last batch is padded; padding
rows are dropped using the attention mask) until `--tokens` real tokens have been recorded.

Example:
    python3 tools/capture_calibration.py models/Mixtral-8x7B -o mixtral.calib.h5 \
        --text wiki.txt --tokens 4096 --seq-len 512 --dtype bfloat16
    smoe-compress import models/Mixtral-8x7B -o mixtral.h5
    smoe-compress merge mixtral.h5 --calib mixtral.calib.h5 --groups 4 -o merged.h5
"""

import argparse
import json
import os
import re
import sys

FAMILIES_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_families.json")


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def tensor_names(model_dir):
    """Tensor names of the checkpoint (single file or index), without loading weights."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return list(json.load(f)["weight_map"])
    from safetensors import safe_open
    files = [f for f in sorted(os.listdir(model_dir)) if f.endswith(".safetensors") and not f.startswith(".")]
    if not files:
        fail(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    names = []
    for fn in files:
        with safe_open(os.path.join(model_dir, fn), "np") as f:
            names += list(f.keys())
    return names


def load_families():
    """The family table smoe-compress uses (tools/model_families.json)."""
    with open(FAMILIES_JSON) as f:
        return json.load(f)["families"]


def family_of(model_type, architectures=()):
    """The table entry a config.json names (None when unsupported): as in `smoe-compress import`,
    model_type decides when present, architectures only when it is absent."""
    families = load_families()
    if model_type is not None:
        return next((f for f in families if model_type in f["model_types"]), None)
    return next((f for a in architectures for f in families if a in f["architectures"]), None)


def supported_model_types():
    return [t for f in load_families() for t in f["model_types"]]


def block_regex(family):
    """Matches a router tensor name; group 1 is the MoE block prefix (import's layer name)."""
    parts = [r"\d+" if "index" in p else "(?:" + "|".join(map(re.escape, p["words"])) + ")" for p in family["block"]]
    return re.compile("^(" + r"\.".join(parts) + ")" + re.escape("." + family["router_suffix"]) + "$")


def stack_order(family, prefix):
    """Import's layer order: the first name part's word order (encoder before decoder)."""
    first = family["block"][0]
    words = first.get("words", [])
    head = prefix.split(".")[0]
    return words.index(head) if head in words else 0


def natural_key(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def moe_layers(model_dir, family, config=None):
    """MoE block prefixes in import's order, from the routers in the checkpoint's names. Blocks
    numbered at or beyond the family's layer count (DeepSeek-V3 / GLM-4.5 multi-token-prediction
    layers, which transformers does not run) are not MoE layers, as in import."""
    pat = block_regex(family)
    prefixes = [m.group(1) for m in map(pat.match, tensor_names(model_dir)) if m]
    count = (config or {}).get(family.get("layer_count_key") or "", None)
    if isinstance(count, int):
        index = next(i for i, p in enumerate(family["block"]) if "index" in p)
        prefixes = [p for p in prefixes if int(p.split(".")[index]) < count]
    if not prefixes:
        fail(f"{model_dir}: no MoE routers found for {family['family']} (tensors named like "
             f"{family['block_pattern']}.{family['router_suffix']})")
    return sorted(prefixes, key=lambda p: (stack_order(family, p), natural_key(p)))


def find_module(model, family, prefix):
    """The module of a checkpoint prefix. Checkpoint and module names differ in some versions
    (transformers 5 saves Mixtral's `mlp` block as `block_sparse_moe`), so every spelling the
    family table allows for the block is tried; the first part (the stack, such as encoder or
    decoder) is never swapped."""
    names = dict(model.named_modules())
    parts = prefix.split(".")
    candidates = [prefix]
    for i, p in enumerate(family["block"][1:], start=1):
        for w in p.get("words", []):
            if i < len(parts) and w != parts[i]:
                candidates.append(".".join(parts[:i] + [w] + parts[i + 1:]))
    for c in candidates:
        for base in ["", "model.", "base_model."]:
            if base + c in names:
                return names[base + c]
    fail(f"no module {prefix} in the loaded model")


def router_of(family, block):
    """The router weight (and bias) of a block: the module the family's router tensor names
    first, then those of the other families (module names that vary between versions)."""
    paths = [f["router_suffix"].rsplit(".", 1)[0] for f in load_families()]
    own = family["router_suffix"].rsplit(".", 1)[0]
    for path in [own] + [p for p in dict.fromkeys(paths) if p != own]:
        m = block
        try:
            for part in path.split("."):
                m = getattr(m, part)
        except AttributeError:
            continue
        if hasattr(m, "weight") and getattr(m, "weight") is not None and m.weight.dim() == 2:
            return m.weight, getattr(m, "bias", None)
    fail(f"cannot find the router weight of {type(block).__name__}")


def shared_part(block, x):
    """The shared experts' contribution (zero when the block has none)."""
    import torch
    if hasattr(block, "shared_expert") and block.shared_expert is not None:
        y = block.shared_expert(x)
        if getattr(block, "shared_expert_gate", None) is not None:
            y = torch.sigmoid(block.shared_expert_gate(x)) * y
        return y
    if getattr(block, "shared_experts", None) is not None:
        return block.shared_experts(x)
    return None


class Recorder:
    """Appends rows to resizable datasets of one layer group."""

    def __init__(self, group, d_model, n_experts):
        import numpy as np
        self.np = np
        self.ds = {
            "hidden_states": group.create_dataset("hidden_states", (0, d_model), maxshape=(None, d_model), dtype="f4", chunks=(256, d_model)),
            "router_logits": group.create_dataset("router_logits", (0, n_experts), maxshape=(None, n_experts), dtype="f4", chunks=(256, n_experts)),
            "output": group.create_dataset("output", (0, d_model), maxshape=(None, d_model), dtype="f4", chunks=(256, d_model)),
        }

    def append(self, **arrays):
        for k, a in arrays.items():
            d = self.ds[k]
            n = d.shape[0]
            d.resize(n + a.shape[0], axis=0)
            d[n:] = a


def tokenize(args, model_dir, vocab_size):
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    else:
        try:
            import datasets
        except ImportError:
            fail("--dataset needs the `datasets` package (pip install datasets); or give --text FILE")
        ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
        text = "\n\n".join(t for t in ds[args.text_column] if t.strip())
    tok_dir = args.tokenizer or model_dir
    tokenizer_files = {"tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json"}
    if args.tokenizer or tokenizer_files & set(os.listdir(model_dir)):
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(tok_dir)
        except Exception as e:
            fail(f"{tok_dir}: cannot load tokenizer: {e}")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if text.strip() and not ids:
            fail(f"{tok_dir}: the tokenizer turned the text into no tokens")
        print(f"tokenized with {tok_dir}: {len(ids)} tokens", file=sys.stderr)
    else:  # no tokenizer files: randomly initialised test models
        ids = [b % vocab_size for b in text.encode("utf-8")]
        print(f"no tokenizer in {model_dir}; using UTF-8 bytes: {len(ids)} tokens", file=sys.stderr)
    if len(ids) < args.tokens:
        print(f"note: the text has {len(ids)} tokens, fewer than --tokens {args.tokens}", file=sys.stderr)
    return ids[: args.tokens]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder (config.json + safetensors), as given to `smoe-compress import`")
    p.add_argument("-o", "--output", required=True, help="smoe-calibration HDF5 file to write")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text file")
    src.add_argument("--dataset", help="a `datasets` name, e.g. wikitext")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    p.add_argument("--tokens", type=int, default=4096, help="real tokens to record per layer")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model compute dtype")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.seq_len < 1 or args.batch_size < 1:
        fail("--tokens, --seq-len and --batch-size must be positive")

    # The model folder is checked before the heavy imports, so a wrong folder is reported the
    # same way whether or not torch is installed.
    config_path = os.path.join(args.model, "config.json")
    if not os.path.exists(config_path):
        fail(f"{config_path}: missing")
    with open(config_path) as f:
        cfg = json.load(f)
    model_type = cfg.get("model_type")
    family = family_of(model_type, cfg.get("architectures") or ())
    if family is None:
        fail(f"{config_path}: model_type {model_type!r} is not supported ({', '.join(supported_model_types())})")

    try:
        import h5py
        import numpy as np
        import torch
        import transformers
    except ImportError as e:
        fail(f"capture needs the python packages h5py, numpy, torch and transformers: {e}")
    layers = moe_layers(args.model, family, cfg)

    dtype = getattr(torch, args.dtype)
    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    load = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
    model = getattr(transformers, family["transformers_class"]).from_pretrained(args.model, **load)
    model.to(args.device).eval()
    vocab = model.config.vocab_size
    ids = tokenize(args, args.model, vocab)
    if not ids:
        fail("no tokens to run")

    out_dir = os.path.dirname(os.path.abspath(args.output))
    tmp = os.path.join(out_dir, f".{os.path.basename(args.output)}.tmp-{os.getpid()}")
    f = h5py.File(tmp, "w")
    try:
        f.attrs["format"] = "smoe-calibration"
        f.attrs["format_version"] = np.int64(1)
        f.attrs["source"] = json.dumps({"model": os.path.abspath(args.model), "tool": "capture_calibration.py",
                                        "text": args.text or f"{args.dataset}:{args.dataset_config}:{args.split}",
                                        "tokens": len(ids), "seq_len": args.seq_len, "dtype": args.dtype})
        root = f.create_group("moe_layers")
        state = {"mask": None}
        hooks = []
        for i, name in enumerate(layers):
            block = find_module(model, family, name)
            w, b = router_of(family, block)
            g = root.create_group(name)
            g.attrs["index"] = np.int64(i)
            rec = Recorder(g, w.shape[1], w.shape[0])

            def hook(module, inputs, kwargs, output, rec=rec, w=w, b=b):
                x = inputs[0] if inputs else kwargs["hidden_states"]
                y = output[0] if isinstance(output, tuple) else output
                d = x.shape[-1]
                x2 = x.reshape(-1, d)
                y2 = y.reshape(-1, d).float()
                shared = shared_part(module, x2)
                if shared is not None:
                    y2 = y2 - shared.float()
                keep = state["mask"]
                if keep is not None and keep.numel() == x2.shape[0]:
                    x2, y2 = x2[keep], y2[keep]
                xf = x2.float()
                z = xf @ w.float().t()
                if b is not None:
                    z = z + b.float()
                rec.append(hidden_states=xf.cpu().numpy(), router_logits=z.cpu().numpy(), output=y2.cpu().numpy())

            hooks.append(block.register_forward_hook(hook, with_kwargs=True))

        seqs = [ids[i:i + args.seq_len] for i in range(0, len(ids), args.seq_len)]
        pad = getattr(model.config, "pad_token_id", None) or 0
        with torch.no_grad():
            for bi in range(0, len(seqs), args.batch_size):
                batch = seqs[bi:bi + args.batch_size]
                T = max(len(s) for s in batch)
                inp = torch.full((len(batch), T), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), T), dtype=torch.long)
                for r, s in enumerate(batch):
                    inp[r, :len(s)] = torch.tensor(s)
                    mask[r, :len(s)] = 1
                inp, mask = inp.to(args.device), mask.to(args.device)
                state["mask"] = mask.reshape(-1).bool()
                if family["encoder_decoder"]:
                    start = getattr(model.config, "decoder_start_token_id", None)
                    start = pad if start is None else start
                    dec = torch.cat([torch.full_like(inp[:, :1], start), inp[:, :-1]], dim=1)
                    dec_mask = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
                    # Decoder rows follow the shifted mask; run encoder and decoder separately so
                    # each sees its own mask.
                    enc = model.encoder(input_ids=inp, attention_mask=mask)
                    state["mask"] = dec_mask.reshape(-1).bool()
                    model.decoder(input_ids=dec, attention_mask=dec_mask, encoder_hidden_states=enc[0],
                                  encoder_attention_mask=mask)
                else:
                    model(input_ids=inp, attention_mask=mask, use_cache=False)
                print(f"\rcaptured {min((bi + len(batch)) * args.seq_len, len(ids))}/{len(ids)} tokens", end="", file=sys.stderr)
        print(file=sys.stderr)
        for h in hooks:
            h.remove()
        f.close()
        os.replace(tmp, args.output)
    except BaseException:
        f.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(f"wrote {args.output}: {len(layers)} MoE layers, {len(ids)} tokens each")


if __name__ == "__main__":
    main()
