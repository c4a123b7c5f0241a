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

Memory: the whole-model mode loads every weight. `--layerwise` (the default when the checkpoint
holds more than 4 GiB) runs the model one decoder layer at a time: the model is built on the
`meta` device, the stem (embeddings, final norms) and then each decoder layer are read from the
safetensors shards with transformers' own loader (same renaming and expert fusing as
from_pretrained; each file memory-mapped only while a tensor is read), every calibration sequence
goes through the layer, and the layer is freed; each weight is read once. The layers' arguments
(attention masks, rotary embeddings, Switch's position biases) are those the model's own forward
builds: the stack's forward runs once per batch with its layers stubbed out to record them. Peak
memory is about max(stem, 2 x the largest layer) + the hidden states of the calibration tokens
(printed before the capture starts; see --help). Both modes record the same rows to the bit.

Sequential calibration: `--reference ORIGINAL_MODEL_DIR` (layer-wise) runs the given model (for
example an exported, partly compressed one) and the original side by side, layer by layer, on
the same tokens: hidden_states and router_logits are the given model's, and `output` is the
original model's block on the original's own input for that token (`--targets reference`, the
default with --reference) or the given model's own block (`--targets shifted`, as without it).
The choice is recorded in the `source` attribute (mode, targets, reference).

Example:
    python3 tools/capture_calibration.py models/Mixtral-8x7B -o mixtral.calib.h5 \
        --text wiki.txt --tokens 4096 --seq-len 512 --dtype bfloat16
    smoe-compress import models/Mixtral-8x7B -o mixtral.h5
    smoe-compress merge mixtral.h5 --calib mixtral.calib.h5 --groups 4 -o merged.h5
"""

import argparse
import contextlib
import gc
import json
import os
import re
import struct
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
    files = [f for f in sorted(os.listdir(model_dir)) if f.endswith(".safetensors") and not f.startswith(".")]
    if not files:
        fail(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    names = []
    for fn in files:  # a damaged header is one error line naming the file
        names += list(read_safetensors_header(os.path.join(model_dir, fn)))
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


def block_pattern_text(family):
    """The block name as a regex: an optional word (a multimodal wrapper's `language_model`) may
    be absent; the first layer number is the group `L`."""
    out, seen_index = "", False
    for p in family["block"]:
        if "index" in p:
            piece = r"\d+" if seen_index else r"(?P<L>\d+)"
            seen_index = True
        else:
            piece = "(?:" + "|".join(map(re.escape, p["words"])) + ")"
        out += f"(?:{piece}\\.)?" if p.get("optional") else piece + r"\."
    return out[:-2]  # the last part is never optional


def block_regex(family):
    """Matches a router tensor name; group 1 is the MoE block prefix (import's layer name)."""
    return re.compile("^(" + block_pattern_text(family) + ")" + re.escape("." + family["router_suffix"]) + "$")


def stack_order(family, prefix):
    """Import's layer order: the first name part's word order (encoder before decoder)."""
    first = family["block"][0]
    words = [] if first.get("optional") else first.get("words", [])
    head = prefix.split(".")[0]
    return words.index(head) if head in words else 0


def natural_key(s):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def moe_layers(model_dir, family, config=None):
    """MoE block prefixes in import's order, from the routers in the checkpoint's names. Blocks
    numbered at or beyond the family's layer count (DeepSeek-V3 / GLM-4.5 multi-token-prediction
    layers, which transformers does not run) are not MoE layers, as in import."""
    pat = block_regex(family)
    matches = [m for m in map(pat.match, tensor_names(model_dir)) if m]
    count = (config or {}).get(family.get("layer_count_key") or "", None)
    if isinstance(count, int):
        matches = [m for m in matches if int(m.group("L")) < count]
    prefixes = [m.group(1) for m in matches]
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
    optional = {w for p in family["block"] if p.get("optional") for w in p["words"]}
    for i, p in enumerate(family["block"][1:], start=1):
        for w in [] if p.get("optional") else p.get("words", []):
            if i < len(parts) and w != parts[i]:
                candidates.append(".".join(parts[:i] + [w] + parts[i + 1:]))
    # A multimodal checkpoint loaded by the text-only class: the wrapper's word is not a module.
    candidates += [".".join(q for q in parts if q not in optional)] if optional & set(parts) else []
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


def tokenize(args, model_dir, vocab_size, fallback_tokenizer_dir=None):
    if args.text:
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            fail(f"{args.text}: cannot read it as UTF-8 text: {e}")
    else:
        try:
            import datasets
        except ImportError:
            fail("--dataset needs the `datasets` package (pip install datasets); or give --text FILE")
        ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
        text = "\n\n".join(t for t in ds[args.text_column] if t.strip())
    tokenizer_files = {"tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json"}
    tok_dir = args.tokenizer or model_dir
    if not args.tokenizer and not tokenizer_files & set(os.listdir(model_dir)) and fallback_tokenizer_dir \
            and tokenizer_files & set(os.listdir(fallback_tokenizer_dir)):
        tok_dir = fallback_tokenizer_dir  # an exported model has no tokenizer: the reference's
    if args.tokenizer or tokenizer_files & set(os.listdir(tok_dir)):
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


def make_batches(ids, args, pad, start, encoder_decoder):
    """The calibration batches, the same in both modes: input ids, attention mask and the mask of
    the rows to record (padding excluded); for encoder-decoder models also the decoder inputs (the
    text shifted right) and their masks."""
    import torch
    seqs = [ids[i:i + args.seq_len] for i in range(0, len(ids), args.seq_len)]
    batches = []
    for bi in range(0, len(seqs), args.batch_size):
        batch = seqs[bi:bi + args.batch_size]
        T = max(len(s) for s in batch)
        inp = torch.full((len(batch), T), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for r, s in enumerate(batch):
            inp[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        inp, mask = inp.to(args.device), mask.to(args.device)
        b = {"inp": inp, "mask": mask, "keep": mask.reshape(-1).bool(),
             "tokens": min((bi + len(batch)) * args.seq_len, len(ids))}
        if encoder_decoder:
            b["dec"] = torch.cat([torch.full_like(inp[:, :1], start), inp[:, :-1]], dim=1)
            b["dec_mask"] = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
            b["dec_keep"] = b["dec_mask"].reshape(-1).bool()
        batches.append(b)
    return batches


FIELDS = ("hidden_states", "router_logits", "output")


def record_hook(rec, w, b, state, fields=FIELDS):
    """A forward hook on an MoE block appending the real tokens' rows of `fields` to `rec`: the
    block input, router logits recomputed in float32 from it, and the block output without the
    shared experts' contribution."""
    def hook(module, inputs, kwargs, output):
        x = inputs[0] if inputs else kwargs["hidden_states"]
        d = x.shape[-1]
        x2 = x.reshape(-1, d)
        keep = state["mask"]
        use = keep is not None and keep.numel() == x2.shape[0]
        arrays = {}
        if "output" in fields:
            y = output[0] if isinstance(output, tuple) else output
            y2 = y.reshape(-1, d).float()
            shared = shared_part(module, x2)
            if shared is not None:
                y2 = y2 - shared.float()
            arrays["output"] = (y2[keep] if use else y2).cpu().numpy()
        if "hidden_states" in fields or "router_logits" in fields:
            xf = (x2[keep] if use else x2).float()
            if "hidden_states" in fields:
                arrays["hidden_states"] = xf.cpu().numpy()
            if "router_logits" in fields:
                z = xf @ w.float().t()
                if b is not None:
                    z = z + b.float()
                arrays["router_logits"] = z.cpu().numpy()
        rec.append(**arrays)
    return hook


# ---------------------------------------------------------------------------------------------
# Layer-by-layer capture (--layerwise)

LAYERWISE_ABOVE = 4 * 2**30  # checkpoint bytes above which --layerwise is the default
RUNTIME_BYTES = int(0.6 * 2**30)  # python + torch + transformers, measured (README, "Real models")
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path):
    """{name: (dtype, shape)} from a safetensors file's header (no tensor is read)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            n = struct.unpack("<Q", raw)[0]
            if n > size - 8:
                raise ValueError(f"header length {n} runs past the end of the file ({size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        fail(f"{path}: {e.strerror or e}")
    except ValueError as e:
        fail(f"{path}: not a safetensors file: {e}")
    out = {}
    if not isinstance(header, dict):
        fail(f"{path}: not a safetensors file: the header is not a JSON object")
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            dt, shape, (a, b) = v["dtype"], [int(s) for s in v["shape"]], v["data_offsets"]
        except (TypeError, KeyError, ValueError):
            fail(f"{path}: tensor {k}: malformed header entry")
        numel = 1
        for s in shape:
            numel *= s
        if dt in ITEMSIZE and b - a != numel * ITEMSIZE[dt]:
            fail(f"{path}: tensor {k}: {b - a} bytes for {dt} {shape}")
        if 8 + n + b > size:
            fail(f"{path}: tensor {k} runs past the end of the file (truncated?)")
        out[k] = (dt, shape, numel)
    return out


class Checkpoint:
    """The tensors of a safetensors checkpoint (one file or an index), from the headers only."""

    def __init__(self, model_dir):
        self.dir = model_dir
        index = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                fail(f"{index}: not a safetensors index: {e}")
        else:
            weight_map = None
            files = [f for f in sorted(os.listdir(model_dir)) if f.endswith(".safetensors") and not f.startswith(".")]
            if not files:
                fail(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
        self.tensors = {}  # name -> (file, dtype, shape, numel)
        for fn in files:
            path = os.path.join(model_dir, fn)
            if not os.path.exists(path):
                fail(f"{path}: missing (named by {index})")
            for k, (dt, shape, numel) in read_safetensors_header(path).items():
                if weight_map is None or weight_map.get(k) == fn:
                    self.tensors[k] = (path, dt, shape, numel)
        if weight_map is not None:
            for k, fn in weight_map.items():
                if k not in self.tensors:
                    fail(f"{os.path.join(model_dir, fn)}: no tensor {k} (model.safetensors.index.json puts it there)")

    def file_bytes(self, keys=None):
        keys = self.tensors if keys is None else keys
        return sum(self.tensors[k][3] * ITEMSIZE.get(self.tensors[k][1], 4) for k in keys)

    def shape(self, key):
        return self.tensors[key][2] if key in self.tensors else None


class LazySafetensor:
    """A checkpoint tensor read when the loader slices it: the file is memory-mapped only while the
    tensor is alive (closing it right away keeps the mapped pages of other tensors out of RSS)."""

    def __init__(self, path, key):
        self.path, self.key = path, key

    def __getitem__(self, index):
        from safetensors import safe_open
        with safe_open(self.path, framework="pt") as f:
            return f.get_slice(self.key)[index]


def quiet_transformers():
    """No per-layer "Loading weights" progress bars or load reports (the capture prints its own progress)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def gib(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class LayerwiseModel:
    """A model run one decoder layer at a time. The model is built on the `meta` device (no
    weights); its stem (embeddings, final norms: every tensor outside the decoder layers but the
    LM head) and then each layer are loaded from the checkpoint with transformers' own loader (the
    same key renaming and expert fusing as from_pretrained), run on every calibration batch, and
    freed. The layers' inputs (attention masks, rotary position embeddings, ...) are the model's
    own: the stack's forward runs once per batch with every layer replaced by a stub that records
    its arguments, so nothing of the model's forward is re-implemented here."""

    def __init__(self, model_dir, family, ckpt, dtype, device, batches, state):
        import torch
        import transformers
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import convert_and_load_state_dict_in_model
            from transformers.modeling_utils import LoadStateDictConfig
        except ImportError:
            fail(f"--layerwise needs transformers 5 (its weight-conversion loader); this is transformers "
                 f"{transformers.__version__}: upgrade it or use --no-layerwise")
        self.torch, self.dir, self.family, self.ckpt = torch, model_dir, family, ckpt
        with open(os.path.join(model_dir, "config.json")) as f:
            quant = json.load(f).get("quantization_config")
        if quant:
            fail(f"{os.path.join(model_dir, 'config.json')}: a quantized checkpoint "
                 f"({quant.get('quant_method', '?') if isinstance(quant, dict) else quant}); --layerwise reads "
                 f"unquantized safetensors only: dequantize it first (or use --no-layerwise)")
        self.device, self.batches, self.state = device, batches, state
        self._convert = convert_and_load_state_dict_in_model
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"  # read a layer's tensors one at a time, not all at once
        try:
            config = transformers.AutoConfig.from_pretrained(model_dir)
        except Exception as e:
            fail(f"{os.path.join(model_dir, 'config.json')}: transformers cannot read it: {e}")
        cls = getattr(transformers, family["transformers_class"])
        if hasattr(cls, "_model_mapping"):  # an Auto class: the concrete class of this config
            from transformers.models.auto.auto_factory import _get_model_class
            try:
                cls = _get_model_class(config, cls._model_mapping)
            except Exception as e:
                fail(f"{model_dir}: transformers has no model class for {config.model_type!r}: {e}")
        # A multimodal config whose class is the text model's (as the Auto class's from_pretrained does).
        text_config_class = getattr(config, "sub_configs", {}).get("text_config")
        if text_config_class is not None and getattr(cls, "config_class", None) == text_config_class:
            config = config.get_text_config()
        try:
            with contextlib.ExitStack() as stack:
                for c in cls.get_init_context(dtype, False, False, False):
                    stack.enter_context(c)
                model = cls(config)
            # Non-persistent buffers (rotary inverse frequencies) made and initialised as from_pretrained does.
            model._move_missing_keys_from_meta_to_device(set(), {"": device}, None, None)
            model._initialize_missing_keys(False)
            self.load_config = LoadStateDictConfig(
                pretrained_model_name_or_path=model_dir, device_map={"": device}, dtype=dtype,
                dtype_plan=model._get_dtype_plan(dtype), weight_mapping=get_model_conversion_mapping(model, None, None))
        except (AttributeError, TypeError) as e:
            fail(f"--layerwise does not know this transformers version ({transformers.__version__}, tested with 5.23): "
                 f"{e}; use --no-layerwise")
        model.eval()
        self.model = model
        self.tuple_layers = family["encoder_decoder"]  # Switch blocks return (h, position bias, cross bias)
        # The stacks (decoder-only: the base model; Switch: encoder then decoder) and their layers.
        self.stacks, self.units = [], []
        layer_keys = {}
        base = model.base_model_prefix
        before_index = family["block"][:next(i for i, p in enumerate(family["block"]) if "index" in p)]
        if any(p.get("optional") for p in family["block"]):
            # A decoder that may sit in a multimodal wrapper (module and checkpoint paths differ
            # between the wrapper and the text-only class, and between versions): the stack is the
            # module holding the layer list that holds the first MoE block; checkpoint keys are
            # matched with the table's words, the optional ones optional.
            list_word = before_index[-1]["words"][0]
            names = {id(m): n for n, m in model.named_modules()}
            block = names[id(find_module(model, family, moe_layers(model_dir, family, config.to_dict())[0]))]
            m = re.match(f"^(.*)\\.{re.escape(list_word)}\\.\\d+\\.", block + ".")
            if m is None:
                fail(f"{model_dir}: the MoE block {block} is not inside a {list_word} list")
            w = m.group(1)
            stack = model.get_submodule(w)
            self.stacks.append((w, stack, getattr(stack, list_word)))
            words = "".join(f"(?:{re.escape(p['words'][0])}\\.)?" if p.get("optional") else re.escape(p["words"][0]) + "\\."
                            for p in before_index)
            pats = [(0, re.compile(f"^{words}(\\d+)\\."))]
        else:
            list_word = family["block"][1]["words"][0]
            for w in family["block"][0]["words"]:
                stack = getattr(model, w, None)
                layers = getattr(stack, list_word, None) if stack is not None else None
                if layers is None:
                    fail(f"{model_dir}: the {type(model).__name__} model has no {w}.{list_word}")
                self.stacks.append((w, stack, layers))
            pats = []
            for s, (w, _, _) in enumerate(self.stacks):
                opt = "?" if w == base else ""
                pats.append((s, re.compile(f"^(?:{re.escape(w)}\\.){opt}{re.escape(list_word)}\\.(\\d+)\\.")))
        self.list_word = list_word
        for s, (_, _, layers) in enumerate(self.stacks):
            for j in range(len(layers)):
                layer_keys[(s, j)] = []
                self.units.append((s, j))
        self.stem_keys = []
        for k in sorted(ckpt.tensors, key=natural_key):
            for s, pat in pats:
                m = pat.match(k)
                if m:
                    j = int(m.group(1))
                    if (s, j) in layer_keys:  # beyond the model's layers (DeepSeek-V3's MTP layer): unused
                        layer_keys[(s, j)].append(k)
                    break
            else:
                if not k.startswith("lm_head."):
                    self.stem_keys.append(k)
        self.layer_keys = [layer_keys[u] for u in self.units]
        self.stem_loaded = False
        self.next_stack = 0  # the stack whose stem pass comes next
        self.hidden = self.calls = self.carry = self.enc_out = None

    def unit_name(self, u):
        s, j = self.units[u]
        w, _, _ = self.stacks[s]
        return f"{w}.{self.list_word}.{j}"

    def layer(self, u):
        s, j = self.units[u]
        return self.stacks[s][2][j]

    def blocks_by_unit(self, names):
        """{unit: [MoE layer names inside that decoder layer]}."""
        owner = {}
        for u in range(len(self.units)):
            for m in self.layer(u).modules():
                owner[id(m)] = u
        out = {}
        for name in names:
            mod = find_module(self.model, self.family, name)
            if id(mod) not in owner:
                fail(f"{self.dir}: the MoE block {name} is not inside a decoder layer")
            out.setdefault(owner[id(mod)], []).append((name, mod))
        return out

    def _load(self, keys, what):
        sd = {k: LazySafetensor(self.ckpt.tensors[k][0], k) for k in keys}
        info, _ = self._convert(self.model, sd, self.load_config)
        if info.mismatched_keys:
            k, got, want = sorted(info.mismatched_keys, key=str)[0]
            fail(f"{self.dir}: tensor {k} has shape {list(got)}, the model's config wants {list(want)}")
        if info.conversion_errors:
            k, msg = sorted(info.conversion_errors.items())[0]
            fail(f"{self.dir}: cannot convert tensor {k} ({what}): {msg}")

    def _check_loaded(self, module, prefix):
        for n, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_meta:
                fail(f"{self.dir}: the checkpoint has no tensor for {prefix}.{n}")

    def _stem_modules(self):
        """Every module outside the decoder layers but the LM head: the children of the model and
        of each module on the path to a stack (a multimodal wrapper's vision tower, say) that do
        not lead to a stack, and the stacks' children but their layer lists."""
        on_path = [""]
        for w, _, _ in self.stacks:
            parts = w.split(".")
            on_path += [p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p not in on_path]
        mods = []
        for prefix in on_path:
            parent = self.model.get_submodule(prefix) if prefix else self.model
            for n, c in parent.named_children():
                full = f"{prefix}.{n}" if prefix else n
                if full in on_path or full == "lm_head" or any(c is layers for _, _, layers in self.stacks):
                    continue
                mods.append((full, c))
        return mods

    def _free(self, module):
        big = sum(t.numel() * t.element_size() for t in module.parameters()) > 2**28
        module.to("meta")
        if big:  # a cycle holding a large tensor would keep it past the next layer's load (0.5 s; skipped when small)
            gc.collect()
        if self.torch.cuda.is_available() and str(self.device).startswith("cuda"):
            self.torch.cuda.empty_cache()

    def _stem_pass(self, s):
        """Runs stack s's own forward over every batch with its layers stubbed: records each layer's
        arguments per batch and the first layer's input (the embeddings)."""
        torch = self.torch
        w, stack, layers = self.stacks[s]
        if s > 0:  # Switch: the encoder's output (its final norm) is the decoder's cross-attention input
            _, prev, _ = self.stacks[s - 1]
            self.enc_out = [prev.dropout(prev.final_layer_norm(h)) for h in self.hidden]
        calls = [[] for _ in layers]

        def stub_for(j):
            def stub(*a, **kw):
                h = a[0] if a else kw["hidden_states"]
                if j > 0:  # only the first layer's input is kept; the others get the running hidden states
                    a = (None,) + a[1:] if a else a
                calls[j].append((a, kw))
                return (h, None, None) if self.tuple_layers else h
            return stub

        for j, layer in enumerate(layers):
            layer.forward = stub_for(j)
        try:
            with torch.no_grad():
                for bi, b in enumerate(self.batches):
                    if self.family["encoder_decoder"] and w == "decoder":
                        stack(input_ids=b["dec"], attention_mask=b["dec_mask"], encoder_hidden_states=self.enc_out[bi],
                              encoder_attention_mask=b["mask"], use_cache=False)
                    elif self.family["encoder_decoder"]:
                        stack(input_ids=b["inp"], attention_mask=b["mask"])
                    else:
                        stack(input_ids=b["inp"], attention_mask=b["mask"], use_cache=False)
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)
        self.hidden = []
        for a, kw in calls[0]:
            self.hidden.append(a[0] if a else kw["hidden_states"])
        calls[0] = [((None,) + a[1:] if a else a, kw) for a, kw in calls[0]]
        self.calls = calls
        self.carry = [None] * len(self.batches)

    def run(self, u, attach):
        """Loads decoder layer u, runs every batch through it (attach(layer) installs the recording
        hooks and returns their handles), keeps its outputs as the next layer's inputs, frees it."""
        torch = self.torch
        s, j = self.units[u]
        if j == 0:
            if not self.stem_loaded:
                self._load(self.stem_keys, "stem")
                self.model.tie_weights()
                for n, m in self._stem_modules():
                    self._check_loaded(m, n)
                self.stem_loaded = True
            self._stem_pass(s)
            if s == len(self.stacks) - 1:  # the last stem pass: embeddings and final norms are no longer needed
                for _, m in self._stem_modules():
                    self._free(m)
        layer = self.layer(u)
        name = self.unit_name(u)
        self._load(self.layer_keys[u], name)
        self._check_loaded(layer, name)
        handles = attach(layer)
        decoder_side = self.family["encoder_decoder"] and self.stacks[s][0] == "decoder"
        try:
            with torch.no_grad():
                for bi, b in enumerate(self.batches):
                    a, kw = self.calls[j][bi]
                    if a:
                        a = (self.hidden[bi],) + a[1:]
                    else:
                        kw = dict(kw, hidden_states=self.hidden[bi])
                    if self.tuple_layers and j > 0:  # the stack hands the first layer's position biases on
                        a = list(a)
                        a[2] = self.carry[bi][0]
                        if a[3] is not None:
                            a[5] = self.carry[bi][1]
                    self.state["mask"] = b["dec_keep"] if decoder_side else b["keep"]
                    out = layer(*a, **kw)
                    self.calls[j][bi] = None
                    if self.tuple_layers:
                        self.hidden[bi], self.carry[bi] = out[0], (out[1], out[2])
                    else:
                        self.hidden[bi] = out[0] if isinstance(out, tuple) else out
        finally:
            for h in handles:
                h.remove()
        self._free(layer)


def memory_estimate(ckpt, runner, batches, d_model, dtype_bytes, copies):
    """Peak memory of a layer-wise capture (README "Real models"): the runtime; the larger of the
    stem and twice the largest decoder layer (a layer's tensors as read plus their fused copy while
    transformers converts them; the sum for an encoder-decoder model, whose embeddings stay until
    the decoder starts); the hidden states of every calibration sequence (`copies` sets of them);
    for an encoder-decoder model also the T5 position biases the first layer hands on (self- and
    cross-attention, heads x seq_len per token)."""
    layer = max(sum(ckpt.tensors[k][3] for k in keys) for keys in runner.layer_keys) * dtype_bytes
    stem = sum(ckpt.tensors[k][3] for k in runner.stem_keys) * dtype_bytes
    rows = sum(b["inp"].numel() for b in batches)
    acts = rows * d_model * dtype_bytes * copies
    weights = max(stem, 2 * layer)
    if runner.family["encoder_decoder"]:
        weights = stem + 2 * layer
        heads = getattr(runner.model.config, "num_heads", 1)
        acts += sum(b["inp"].numel() * b["inp"].shape[1] for b in batches) * heads * dtype_bytes * copies
    how = f"{'' if runner.family['encoder_decoder'] else 'max('}stem {gib(stem)}" \
          f"{' + ' if runner.family['encoder_decoder'] else ', '}2 × largest layer {gib(layer)}" \
          f"{'' if runner.family['encoder_decoder'] else ')'}"
    return {"runtime": RUNTIME_BYTES, "layer": layer, "stem": stem, "activations": acts, "how": how,
            "total": RUNTIME_BYTES + weights + acts}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=EPILOG)
    p.add_argument("model", help="model folder (config.json + safetensors), as given to `smoe-compress import`")
    p.add_argument("-o", "--output", required=True, help="smoe-calibration HDF5 file to write")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text file")
    src.add_argument("--dataset", help="a `datasets` name, e.g. wikitext")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model folder, else the --reference folder)")
    p.add_argument("--tokens", type=int, default=4096, help="real tokens to record per layer")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model compute dtype")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    lw = p.add_mutually_exclusive_group()
    lw.add_argument("--layerwise", dest="layerwise", action="store_true", default=None,
                    help="run the model one decoder layer at a time, in about one layer's memory plus the calibration "
                         f"activations (the default when the checkpoint holds more than {LAYERWISE_ABOVE // 2**30} GiB)")
    lw.add_argument("--no-layerwise", dest="layerwise", action="store_false",
                    help="load the whole model (the default up to that size)")
    p.add_argument("--reference", metavar="ORIGINAL_MODEL_DIR",
                   help="sequential calibration (layer-wise): the model runs layer by layer and its MoE blocks' inputs "
                        "and router logits are recorded, while the same tokens flow through this (original) model")
    p.add_argument("--targets", choices=["shifted", "reference"], default=None,
                   help="`output`: `shifted`, the model's own block on its own inputs (the default without --reference), "
                        "or `reference`, the reference model's block on the reference's inputs (the default with it)")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.seq_len < 1 or args.batch_size < 1:
        fail("--tokens, --seq-len and --batch-size must be positive")
    if args.reference is not None and args.layerwise is False:
        fail("--reference runs layer by layer; it cannot be combined with --no-layerwise")
    if args.targets == "reference" and args.reference is None:
        fail("--targets reference needs --reference ORIGINAL_MODEL_DIR")
    if args.targets is None:
        args.targets = "reference" if args.reference else "shifted"
    return args


EPILOG = f"""\
memory: the whole-model mode loads every weight (about the checkpoint's size in the compute dtype).
--layerwise (the default above {LAYERWISE_ABOVE // 2**30} GiB of safetensors) keeps at most one decoder layer:
  peak ≈ {RUNTIME_BYTES / 2**30:.1f} GiB + max(stem, 2 × largest layer) + tokens_padded × d_model × b × k
with the layer and stem (embeddings, norms) in the compute dtype of b bytes per value, tokens_padded the
calibration tokens padded to whole batches, and k = 1 (2 for an encoder-decoder model, twice that with
--reference). Switch adds its embeddings to the layer term and its position biases (2 × heads × seq_len
values per token) to the activations. The estimate is printed before the capture starts.
"""


def read_config(model_dir, what="model"):
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(config_path):
        fail(f"{config_path}: missing")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{config_path}: not a JSON config: {e}")
    if not isinstance(cfg, dict):
        fail(f"{config_path}: not a JSON object")
    model_type = cfg.get("model_type")
    family = family_of(model_type, cfg.get("architectures") or ())
    if family is None:
        fail(f"{config_path}: model_type {model_type!r} is not supported ({', '.join(supported_model_types())})")
    return cfg, family


def main(argv=None):
    args = parse_args(argv)
    # The model folders are checked before the heavy imports, so a wrong folder is reported the
    # same way whether or not torch is installed.
    cfg, family = read_config(args.model)
    if args.reference is not None:
        ref_cfg, ref_family = read_config(args.reference)
        if ref_family["family"] != family["family"]:
            fail(f"--reference {args.reference}: a {ref_family['display_name']} model, {args.model} is {family['display_name']}")

    try:
        import h5py
        import numpy as np
        import torch
        import transformers
    except ImportError as e:
        fail(f"capture needs the python packages h5py, numpy, torch and transformers: {e}")
    layers = moe_layers(args.model, family, cfg)
    if args.reference is not None and moe_layers(args.reference, family, cfg) != layers:
        fail(f"--reference {args.reference}: its MoE layers differ from those of {args.model}")

    ckpt = Checkpoint(args.model) if args.layerwise is not False else None
    if args.layerwise is None:
        args.layerwise = args.reference is not None or ckpt.file_bytes() > LAYERWISE_ABOVE
    if args.layerwise and args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: torch has no CUDA here")
    dtype = getattr(torch, args.dtype)
    vocab = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    if not isinstance(vocab, int) or vocab < 1:  # a multimodal wrapper's is in its text config
        vocab = transformers.AutoConfig.from_pretrained(args.model).get_text_config().vocab_size

    model = None
    if not args.layerwise:
        major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
        load = {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
        model = getattr(transformers, family["transformers_class"]).from_pretrained(args.model, **load)
        model.to(args.device).eval()
        vocab = model.config.get_text_config().vocab_size
    ids = tokenize(args, args.model, vocab, args.reference)
    if not ids:
        fail("no tokens to run")
    pad = cfg.get("pad_token_id") if model is None else getattr(model.config, "pad_token_id", None)
    pad = pad or 0
    start = cfg.get("decoder_start_token_id") if model is None else getattr(model.config, "decoder_start_token_id", None)
    start = pad if start is None else start
    batches = make_batches(ids, args, pad, start, family["encoder_decoder"])

    out_dir = os.path.dirname(os.path.abspath(args.output))
    tmp = os.path.join(out_dir, f".{os.path.basename(args.output)}.tmp-{os.getpid()}")
    f = h5py.File(tmp, "w")
    try:
        f.attrs["format"] = "smoe-calibration"
        f.attrs["format_version"] = np.int64(1)
        source = {"model": os.path.abspath(args.model), "tool": "capture_calibration.py",
                  "text": args.text or f"{args.dataset}:{args.dataset_config}:{args.split}",
                  "tokens": len(ids), "seq_len": args.seq_len, "dtype": args.dtype,
                  "mode": "layerwise" if args.layerwise else "whole-model", "targets": args.targets}
        if args.reference is not None:
            source["reference"] = os.path.abspath(args.reference)
        f.attrs["source"] = json.dumps(source)
        root = f.create_group("moe_layers")
        state = {"mask": None}
        if args.layerwise:
            capture_layerwise(args, family, layers, ckpt, root, batches, dtype, state)
        else:
            capture_whole(model, family, layers, root, batches, state, len(ids))
        f.close()
        os.replace(tmp, args.output)
    except BaseException:
        f.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(f"wrote {args.output}: {len(layers)} MoE layers, {len(ids)} tokens each")


def capture_whole(model, family, layers, root, batches, state, n_tokens):
    import numpy as np
    import torch
    hooks = []
    for i, name in enumerate(layers):
        block = find_module(model, family, name)
        w, b = router_of(family, block)
        g = root.create_group(name)
        g.attrs["index"] = np.int64(i)
        rec = Recorder(g, w.shape[1], w.shape[0])
        hooks.append(block.register_forward_hook(record_hook(rec, w, b, state), with_kwargs=True))
    with torch.no_grad():
        for bt in batches:
            state["mask"] = bt["keep"]
            if family["encoder_decoder"]:
                # Decoder rows follow the shifted mask; run encoder and decoder separately so
                # each sees its own mask.
                enc = model.encoder(input_ids=bt["inp"], attention_mask=bt["mask"])
                state["mask"] = bt["dec_keep"]
                model.decoder(input_ids=bt["dec"], attention_mask=bt["dec_mask"], encoder_hidden_states=enc[0],
                              encoder_attention_mask=bt["mask"], use_cache=False)
            else:
                model(input_ids=bt["inp"], attention_mask=bt["mask"], use_cache=False)
            print(f"\rcaptured {bt['tokens']}/{n_tokens} tokens", end="", file=sys.stderr)
    print(file=sys.stderr)
    for h in hooks:
        h.remove()


def capture_layerwise(args, family, layers, ckpt, root, batches, dtype, state):
    import numpy as np
    import torch
    quiet_transformers()
    main_ = LayerwiseModel(args.model, family, ckpt, dtype, args.device, batches, state)
    ref = None
    if args.reference is not None and args.targets == "shifted":
        print("note: --targets shifted records nothing of the reference model; it is not run", file=sys.stderr)
    elif args.reference is not None:
        ref = LayerwiseModel(args.reference, family, Checkpoint(args.reference), dtype, args.device, batches, state)
        if [ref.unit_name(u) for u in range(len(ref.units))] != [main_.unit_name(u) for u in range(len(main_.units))]:
            fail(f"--reference {args.reference}: its decoder layers differ from those of {args.model}")
    recs, d_model = {}, None
    for i, name in enumerate(layers):
        shape = ckpt.shape(name + "." + family["router_suffix"])
        if shape is None:  # the router is stored under another spelling of the block (mlp / block_sparse_moe)
            shape = next(ckpt.shape(k) for k in ckpt.tensors if k.endswith("." + family["router_suffix"])
                         and block_regex(family).match(k) and block_regex(family).match(k).group(1) == name)
        g = root.create_group(name)
        g.attrs["index"] = np.int64(i)
        recs[name] = Recorder(g, shape[1], shape[0])
        d_model = shape[1]
    copies = (2 if family["encoder_decoder"] else 1) * (2 if ref is not None else 1)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    est = memory_estimate(ckpt, main_, batches, d_model, dtype_bytes, copies)
    if ref is not None:
        r = memory_estimate(ref.ckpt, ref, batches, d_model, dtype_bytes, copies)
        est["total"] = max(est["total"], r["total"])
    print(f"layer-wise capture: {len(main_.units)} decoder layers, each read once; estimated peak memory "
          f"{gib(est['total'])} = runtime {gib(est['runtime'])} + {est['how']} + activations {gib(est['activations'])} "
          f"(weights on disk {gib(ckpt.file_bytes())})",
          file=sys.stderr)
    blocks = main_.blocks_by_unit(layers)
    ref_blocks = ref.blocks_by_unit(layers) if ref is not None else {}
    own_fields = FIELDS if args.targets == "shifted" else ("hidden_states", "router_logits")

    def attach_for(runner, by_unit, u, fields):
        def attach(layer):
            handles = []
            for name, block in by_unit.get(u, []):
                w, b = router_of(family, block)
                handles.append(block.register_forward_hook(record_hook(recs[name], w, b, state, fields), with_kwargs=True))
            return handles
        return attach

    n = len(main_.units)
    for u in range(n):
        print(f"layer {u + 1}/{n} ({main_.unit_name(u)})", file=sys.stderr)
        main_.run(u, attach_for(main_, blocks, u, own_fields))
        if ref is not None:
            ref.run(u, attach_for(ref, ref_blocks, u, ("output",)))


if __name__ == "__main__":
    main()
