"""Model families against transformers itself (pytest), issue 24.

Each test builds a tiny randomly initialised model of one family from its config with the
installed transformers (no download), saves it with save_pretrained, captures calibration with
tools/capture_calibration.py, imports the folder with the debug build of smoe-compress and checks
what the tool computes against what transformers computes:
- `smoe-compress eval M M --calib CAPTURE --json`: every imported layer's forward pass on the
  captured inputs reproduces transformers' block outputs (captured_output_error <= 1e-5);
- `export` of the unmodified import: transformers loads it and its logits are bit-identical;
- `merge --groups G` (and `--router compact` where the family supports it) -> `export`: the
  folder loads with the stock class and runs; for the sigmoid and selection-bias routers
  (DeepSeek-V3, GLM-4.5, MiniMax-M2, ERNIE-4.5) the compact export's logits are closer to the
  original's than with the routed experts dropped, and its layer errors are below 1.
Without torch, transformers, h5py or numpy each test skips naming the missing package; without
a built smoe-compress (swift build) they skip too.
"""

import json
import pathlib
import subprocess

import pytest

from optional_deps import h5py, np, torch, transformers  # noqa: F401
from optional_deps import needs_all

TOOLS = pathlib.Path(__file__).resolve().parent
REPO = TOOLS.parent
EXE = REPO / ".build" / "debug" / "smoe-compress"
TEXT = "Sparse mixture of experts models route each token to a few experts of every layer. " * 12


def run(*args):
    r = subprocess.run([str(EXE), *map(str, args), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def needs_exe():
    if not EXE.exists():
        pytest.skip("smoe-compress is not built (swift build)")


def save_tiny(tmp, cls, config, seed=0, init=None):
    """A random model of `cls` from `config` saved to tmp/model (float32)."""
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config).eval()
    if init is not None:
        with torch.no_grad():
            init(model)
    d = tmp / "model"
    model.save_pretrained(d)
    (tmp / "text.txt").write_text(TEXT)
    return d


def capture(tmp, model_dir, tokens=96):
    """tools/capture_calibration.py's main() run in this process: the same arguments and code as
    the command line, without a new interpreter importing torch and transformers for each test
    (a failure is SystemExit with the error line on stderr)."""
    import capture_calibration
    out = tmp / "calib.h5"
    capture_calibration.main([str(model_dir), "-o", str(out), "--text", str(tmp / "text.txt"),
                              "--tokens", str(tokens), "--seq-len", "32", "--batch-size", "2"])
    return out


def logits(cls, folder, ids):
    model = getattr(transformers, cls).from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def check_family(tmp, cls, model_dir, groups, compact=True, expert_count_keys=()):
    """capture -> import -> eval against the capture -> export bit-identical -> merge -> export -> load."""
    calib = capture(tmp, model_dir)
    h5 = tmp / "m.h5"
    run("import", model_dir, "-o", h5)
    report = json.loads(run("eval", h5, h5, "--calib", calib, "--json"))
    layers = report["evaluation"]["layers"]
    assert layers
    for layer in layers:
        assert layer["captured_output_error"] <= 1e-5, layer
    ids = torch.tensor([list(TEXT[:40].encode())]) % transformers.AutoConfig.from_pretrained(str(model_dir)).get_text_config().vocab_size
    want = logits(cls, model_dir, ids)
    run("export", h5, "-o", tmp / "same")
    got = logits(cls, tmp / "same", ids)
    assert torch.equal(want, got)
    run("merge", h5, "--calib", calib, "--groups", groups, "-o", tmp / "merged.h5")
    run("export", tmp / "merged.h5", "-o", tmp / "merged")
    assert torch.isfinite(logits(cls, tmp / "merged", ids)).all()
    if compact:
        run("merge", h5, "--calib", calib, "--groups", groups, "--router", "compact", "-o", tmp / "compact.h5")
        run("export", tmp / "compact.h5", "-o", tmp / "compact")
        config = json.loads((tmp / "compact" / "config.json").read_text())
        for k in expert_count_keys:
            assert config[k] == groups, (k, config)
        assert torch.isfinite(logits(cls, tmp / "compact", ids)).all()
    return report


@needs_all
def test_qwen3_moe_saved_by_transformers_5_compact_export_loads(tmp_path):
    """transformers 5 writes Qwen3-MoE's expert count as num_local_experts (no num_experts): a
    compact export must set that key, not add num_experts beside it."""
    needs_exe()
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, max_position_embeddings=128)
    d = save_tiny(tmp_path, "Qwen3MoeForCausalLM", cfg)
    saved = json.loads((d / "config.json").read_text())
    assert saved.get("num_local_experts") == 16
    check_family(tmp_path, "Qwen3MoeForCausalLM", d, groups=4, expert_count_keys=[k for k in ("num_experts", "num_local_experts") if k in saved])
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config.get("num_experts", 4) == 4


def random_router(model, std=0.5, bias_std=0.05):
    """Router weights large enough that the choice matters, and a non-zero selection bias."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=g) * bias_std)


def refuses_compact_groups(tmp, h5, calib, groups, choices):
    """--router compact with a group count that breaks the grouped top-k: one line naming the
    counts that work."""
    r = subprocess.run([str(EXE), "merge", str(h5), "--calib", str(calib), "--groups", str(groups), "--router", "compact",
                        "-o", str(tmp / "refused.h5")], capture_output=True, text=True)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --router: compact") and choices in lines[0], r.stderr
    assert not (tmp / "refused.h5").exists()


def compact_beats_dropping_the_experts(tmp, cls, model_dir, h5, calib):
    """After check_family(compact=True): the compact export's logits are closer to the original's
    than those of the original with every routed expert's down projection zeroed (the trivial
    baseline: the MoE layers' routed part dropped), and every compact layer's output error on the
    calibration tokens is below 1 (the error of a zero output)."""
    ids = torch.tensor([list(TEXT[:40].encode())]) % 128
    want = logits(cls, model_dir, ids)
    got = logits(cls, tmp / "compact", ids)
    model = getattr(transformers, cls).from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        zeroed = 0
        for name, p in model.named_parameters():
            if ".experts." in name and "shared" not in name and ("down" in name or name.endswith("w2.weight")):
                p.zero_()
                zeroed += 1
        assert zeroed
        dropped = model(input_ids=ids).logits
    assert (got - want).norm() < (dropped - want).norm(), ((got - want).norm(), (dropped - want).norm())
    report = json.loads(run("eval", h5, tmp / "compact.h5", "--calib", calib, "--json"))
    for layer in report["evaluation"]["layers"]:
        assert layer["relative_error"] < 1, layer
    return report


def pruned_export_loads(tmp, cls, expert_count_key):
    """`merge --groups 8 --prune reap` of the imported `tmp/m.h5` exports as a standard 8-expert
    model (router rows and selection biases kept) that transformers loads and runs."""
    run("merge", tmp / "m.h5", "--calib", tmp / "calib.h5", "--groups", 8, "--prune", "reap", "-o", tmp / "p.h5")
    run("export", tmp / "p.h5", "-o", tmp / "pruned")
    config = json.loads((tmp / "pruned" / "config.json").read_text())
    assert config[expert_count_key] == 8
    ids = torch.tensor([list(TEXT[:40].encode())]) % 128
    assert torch.isfinite(logits(cls, tmp / "pruned", ids)).all()


COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@needs_all
def test_deepseek_v3(tmp_path):
    """64 routed experts, top-8 in 8 groups of which 4 are eligible, non-zero correction bias,
    scaling 2.5, renormalised; a dense first layer and a shared expert (to /dense)."""
    needs_exe()
    cfg = transformers.DeepseekV3Config(
        **COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=64,
        num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, head_dim=8)
    d = save_tiny(tmp_path, "DeepseekV3ForCausalLM", cfg, init=random_router)
    report = check_family(tmp_path, "DeepseekV3ForCausalLM", d, groups=16, expert_count_keys=["n_routed_experts"])
    assert [l["name"] for l in report["evaluation"]["layers"]] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    # --router compact: 16 experts in the 8 groups (2 each), 4 eligible, top-8; scaling kept.
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert (config["n_group"], config["topk_group"], config["num_experts_per_tok"]) == (8, 4, 8)
    assert config["routed_scaling_factor"] == 2.5
    compact_beats_dropping_the_experts(tmp_path, "DeepseekV3ForCausalLM", d, tmp_path / "m.h5", tmp_path / "calib.h5")
    with h5py.File(tmp_path / "compact.h5", "r") as f:
        g = f["moe_layers/model.layers.1.mlp"]
        assert g.attrs["n_group"] == 8 and g["router/selection_bias"].shape == (16,)
    refuses_compact_groups(tmp_path, tmp_path / "m.h5", tmp_path / "calib.h5", 12, "use 16, 24, 32, 40 …")
    r = subprocess.run([str(EXE), "merge", str(tmp_path / "m.h5"), "--calib", str(tmp_path / "calib.h5"), "--groups", "16",
                        "--prune", "reap", "-o", str(tmp_path / "p.h5")], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.startswith("error: --prune: drops router slots") and "expert groups" in r.stderr, r.stderr
    with h5py.File(tmp_path / "m.h5", "r") as f:
        g = f["moe_layers/model.layers.1.mlp"]
        assert g.attrs["router_type"] == "sigmoid_topk_norm" and g.attrs["n_group"] == 8 and g.attrs["topk_group"] == 4
        assert abs(g.attrs["routed_scaling_factor"] - 2.5) < 1e-12
        assert np.abs(g["router/selection_bias"][()]).max() > 0
        assert "model.layers.1.mlp.shared_experts.up_proj.weight" in f["dense"]


@needs_all
def test_deepseek_v3_multi_token_prediction_layer_is_not_a_moe_layer(tmp_path):
    """A layer numbered num_hidden_layers (DeepSeek-V3's MTP layer 61) is carried to /dense."""
    needs_exe()
    cfg = transformers.DeepseekV3Config(
        **COMMON, num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8)
    d = save_tiny(tmp_path, "DeepseekV3ForCausalLM", cfg, init=random_router)
    from safetensors.torch import load_file, save_file
    t = load_file(str(d / "model.safetensors"))
    t.update({k.replace("layers.1.", "layers.2."): v.clone() for k, v in t.items() if k.startswith("model.layers.1.")})
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    calib = capture(tmp_path, d)
    with h5py.File(calib, "r") as f:
        assert list(f["moe_layers"]) == ["model.layers.1.mlp"]
    run("import", d, "-o", tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert list(f["moe_layers"]) == ["model.layers.1.mlp"]
        assert "model.layers.2.mlp.gate.weight" in f["dense"]
    run("eval", tmp_path / "m.h5", tmp_path / "m.h5", "--calib", calib)


@needs_all
def test_glm4_moe(tmp_path):
    """GLM-4.5: the DeepSeek-V3 router; here 32 experts, top-4, 4 groups with 2 eligible."""
    needs_exe()
    cfg = transformers.Glm4MoeConfig(
        **COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=32,
        num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=1, head_dim=16)
    d = save_tiny(tmp_path, "Glm4MoeForCausalLM", cfg, init=random_router)
    check_family(tmp_path, "Glm4MoeForCausalLM", d, groups=8, expert_count_keys=["n_routed_experts"])
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert (config["n_group"], config["topk_group"]) == (4, 2)
    compact_beats_dropping_the_experts(tmp_path, "Glm4MoeForCausalLM", d, tmp_path / "m.h5", tmp_path / "calib.h5")
    refuses_compact_groups(tmp_path, tmp_path / "m.h5", tmp_path / "calib.h5", 6, "use 8, 12, 16, 20 …")


@needs_all
def test_glm4_moe_every_group_eligible_compacts_ungrouped(tmp_path):
    """n_group = topk_group (4 and 4): grouping chooses nothing, so a compact layer of any G is
    ungrouped, exactly; the export writes n_group = topk_group = 1 and loads with 6 experts."""
    needs_exe()
    cfg = transformers.Glm4MoeConfig(
        **COMMON, num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=16,
        num_experts_per_tok=4, n_shared_experts=1, n_group=4, topk_group=4, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=1, head_dim=16)
    d = save_tiny(tmp_path, "Glm4MoeForCausalLM", cfg, init=random_router)
    calib = capture(tmp_path, d)
    run("import", d, "-o", tmp_path / "m.h5")
    run("merge", tmp_path / "m.h5", "--calib", calib, "--groups", 6, "--router", "compact", "-o", tmp_path / "compact.h5")
    run("export", tmp_path / "compact.h5", "-o", tmp_path / "compact")
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"]) == (6, 1, 1), config
    compact_beats_dropping_the_experts(tmp_path, "Glm4MoeForCausalLM", d, tmp_path / "m.h5", calib)


@needs_all
def test_minimax_m2(tmp_path):
    """MiniMax-M2: sigmoid + the block's correction bias, always renormalised; saved under
    block_sparse_moe with Mixtral's w1/w3/w2 names."""
    needs_exe()
    cfg = transformers.MiniMaxM2Config(
        **COMMON, num_hidden_layers=2, intermediate_size=16, num_local_experts=16, num_experts_per_tok=4,
        head_dim=16, rotary_dim=8)
    d = save_tiny(tmp_path, "MiniMaxM2ForCausalLM", cfg, init=random_router)
    check_family(tmp_path, "MiniMaxM2ForCausalLM", d, groups=4, expert_count_keys=["num_local_experts"])
    compact_beats_dropping_the_experts(tmp_path, "MiniMaxM2ForCausalLM", d, tmp_path / "m.h5", tmp_path / "calib.h5")
    # Pruning keeps router rows and their correction biases: a standard 8-expert MiniMax-M2.
    pruned_export_loads(tmp_path, "MiniMaxM2ForCausalLM", "num_local_experts")


def random_gpt_oss(model):
    """Non-zero router and expert biases (transformers initialises them to zero)."""
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if name.endswith(("router.bias", "gate_up_proj_bias", "down_proj_bias")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif name.endswith("router.weight"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif name.endswith("experts.gate_up_proj"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)  # large enough that the clamps at ±7 act


@needs_all
def test_gpt_oss(tmp_path):
    """GPT-OSS: router bias, top-4 of 32 logits then softmax over the 4; fused input-major
    gate_up_proj [E, H, 2I] interleaved (even gate, odd up) with biases; clamped SwiGLU;
    --router compact (rows and router bias fitted)."""
    needs_exe()
    cfg = transformers.GptOssConfig(
        **COMMON, num_hidden_layers=2, intermediate_size=24, num_local_experts=32, num_experts_per_tok=4,
        head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    d = save_tiny(tmp_path, "GptOssForCausalLM", cfg, init=random_gpt_oss)
    check_family(tmp_path, "GptOssForCausalLM", d, groups=8, expert_count_keys=["num_local_experts"])
    # --router compact fits G rows and the router bias; the compact export is a stock 8-expert
    # GPT-OSS (checked loaded and run by check_family).
    with h5py.File(tmp_path / "compact.h5", "r") as f:
        g = f["moe_layers/model.layers.0.mlp"]
        assert g["router/weight"].shape == (8, 64) and g["router/bias"].shape == (8,) and "expert_map" not in g
        assert g.attrs["router_type"] == "topk_softmax"
    with h5py.File(tmp_path / "m.h5", "r") as f:
        g = f["moe_layers/model.layers.0.mlp"]
        assert g.attrs["router_type"] == "topk_softmax" and g.attrs["activation"] == "swiglu_oai"
        assert "gate_bias" in g["experts"] and "router/bias" in g


QWEN_NEXT_ATTN = dict(head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                      linear_value_head_dim=16)


def random_softmax_router(model, std=0.5):
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
            p.copy_(torch.randn(p.shape, generator=g) * std)


@needs_all
def test_qwen3_next(tmp_path):
    """Qwen3-Next: softmax top-4 of 16, renormalised (norm_topk_prob, default true), a
    sigmoid-gated shared expert (to /dense; the capture removes its gated contribution), linear-
    and full-attention layers, layer 3 dense (mlp_only_layers: no router, not a MoE layer)."""
    needs_exe()
    cfg = transformers.Qwen3NextConfig(
        **COMMON, num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=16, shared_expert_intermediate_size=32,
        num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[3],
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"], **QWEN_NEXT_ATTN)
    d = save_tiny(tmp_path, "Qwen3NextForCausalLM", cfg, init=random_softmax_router)
    report = check_family(tmp_path, "Qwen3NextForCausalLM", d, groups=4, expert_count_keys=["num_experts"])
    assert [l["name"] for l in report["evaluation"]["layers"]] == [f"model.layers.{i}.mlp" for i in range(3)]
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert f["moe_layers/model.layers.0.mlp"].attrs["router_type"] == "softmax_topk_norm"
        assert "model.layers.0.mlp.shared_expert_gate.weight" in f["dense"]
        assert "model.layers.3.mlp.gate_proj.weight" in f["dense"]


def qwen3_5_config(multimodal):
    text = dict(**COMMON, num_hidden_layers=2, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                num_experts=16, num_experts_per_tok=4, layer_types=["linear_attention", "full_attention"], **QWEN_NEXT_ATTN)
    if not multimodal:
        return "Qwen3_5MoeForCausalLM", transformers.Qwen3_5MoeTextConfig(**text)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
    return "Qwen3_5MoeForConditionalGeneration", transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)


def fuse_experts(folder):
    """Rewrites a per-expert folder in the fused layout the official Qwen3.5 checkpoints use:
    experts.gate_up_proj [E, 2I, H] (gate rows, then up rows) and experts.down_proj [E, H, I]."""
    import re
    from safetensors.torch import load_file, save_file
    t = load_file(str(folder / "model.safetensors"))
    out, groups = {}, {}
    for k, v in t.items():
        m = re.match(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", k)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = v
        else:
            out[k] = v
    for p, roles in groups.items():
        n = len(roles["gate_proj"])
        out[p + ".gate_up_proj"] = torch.stack([torch.cat([roles["gate_proj"][e], roles["up_proj"][e]]) for e in range(n)])
        out[p + ".down_proj"] = torch.stack([roles["down_proj"][e] for e in range(n)])
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("multimodal,fused", [(True, False), (True, True), (False, False)])
@needs_all
def test_qwen3_5_moe(tmp_path, multimodal, fused):
    """Qwen3.5-MoE: softmax top-4 of 16 always renormalised, gated shared expert; the multimodal
    checkpoint keeps the decoder under model.language_model and the MoE keys in text_config (the
    compact export sets text_config.num_experts); the fused layout of the official checkpoints
    round-trips as fused."""
    needs_exe()
    cls, cfg = qwen3_5_config(multimodal)
    d = save_tiny(tmp_path, cls, cfg, init=random_softmax_router)
    if fused:
        fuse_experts(d)
    report = check_family(tmp_path, "AutoModelForCausalLM", d, groups=4)
    prefix = "model.language_model.layers" if multimodal else "model.layers"
    assert [l["name"] for l in report["evaluation"]["layers"]] == [f"{prefix}.{i}.mlp" for i in range(2)]
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    section = config["text_config"] if multimodal else config
    assert section["num_experts"] == 4 and "num_experts" not in (config if multimodal else {})
    names = json.loads((tmp_path / "same" / "model.safetensors.index.json").read_text())["weight_map"] \
        if (tmp_path / "same" / "model.safetensors.index.json").exists() else None
    from safetensors import safe_open
    with safe_open(str(tmp_path / "same" / "model.safetensors"), "pt") as f:
        keys = set(f.keys()) if names is None else set(names)
    assert (f"{prefix}.0.mlp.experts.gate_up_proj" in keys) == fused
    assert (f"{prefix}.0.mlp.experts.0.gate_proj.weight" in keys) == (not fused)


def llama4_config(multimodal):
    text = dict(**COMMON, num_hidden_layers=2, intermediate_size=24, intermediate_size_mlp=96, num_local_experts=16,
                num_experts_per_tok=1, interleave_moe_layer_step=1 if multimodal else 2, head_dim=16,
                attention_chunk_size=32)
    if not multimodal:
        return "Llama4ForCausalLM", transformers.Llama4TextConfig(**text)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    return "Llama4ForConditionalGeneration", transformers.Llama4Config(text_config=text, vision_config=vision)


def random_llama4(model):
    """Router logits spread enough that σ(z) is far from constant, and experts large enough that
    scaling the input differs from scaling the output."""
    g = torch.Generator().manual_seed(4)
    for name, p in model.named_parameters():
        if name.endswith("feed_forward.router.weight"):  # z of order 1: σ(z) spread over (0, 1)
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("multimodal", [False, True])
@needs_all
def test_llama4(tmp_path, multimodal):
    """Llama-4: top-1 of 16 logits, σ(z) multiplies the expert INPUT (topk_sigmoid_input);
    input-major fused gate_up_proj [E, H, 2I] (gate half, up half) and down_proj [E, I, H];
    an ungated shared expert (to /dense); text-only with interleave step 2 (layer 0 dense), and
    the multimodal wrapper (language_model.model.layers, MoE keys in text_config). merge -> export
    loads; merge --router compact (sigmoid rows) -> export loads with 4 experts and runs;
    compress --groups 4 with and without --rank 4 -> export loads and runs."""
    needs_exe()
    cls, cfg = llama4_config(multimodal)
    d = save_tiny(tmp_path, cls, cfg, init=random_llama4)
    report = check_family(tmp_path, "AutoModelForCausalLM", d, groups=4)
    prefix = "language_model.model.layers" if multimodal else "model.layers"
    want = [f"{prefix}.{i}.feed_forward" for i in ([0, 1] if multimodal else [1])]
    assert [l["name"] for l in report["evaluation"]["layers"]] == want
    with h5py.File(tmp_path / "m.h5", "r") as f:
        g = f["moe_layers/" + want[-1]]
        assert g.attrs["router_type"] == "topk_sigmoid_input" and g.attrs["top_k"] == 1
        assert f"{want[-1]}.shared_expert.up_proj.weight" in f["dense"]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    section = config["text_config"] if multimodal else config
    assert section["num_local_experts"] == 16  # E-slot merge: router slots unchanged
    # Compact: G = 4 sigmoid rows (top-1 of the logits, σ(z) on the input), loaded with 4 experts.
    config = json.loads((tmp_path / "compact" / "config.json").read_text())
    assert (config["text_config"] if multimodal else config)["num_local_experts"] == 4
    compact = getattr(transformers, "AutoModelForCausalLM").from_pretrained(str(tmp_path / "compact"))
    routers = [m for n, m in compact.named_modules() if n.endswith("feed_forward.router")]
    assert routers and all(r.weight.shape[0] == 4 for r in routers)
    ids = torch.tensor([list(TEXT[:40].encode())]) % 128
    # Merging only (RegMean with the scaled inputs), and merging plus low rank whitened with the
    # scaled expert inputs (σ(z)·x and the hidden activations of those rows): exported and loaded.
    for name, extra in [("c", []), ("c_rank", ["--rank", 4])]:
        run("compress", tmp_path / "m.h5", "--calib", tmp_path / "calib.h5", "--groups", 4, *extra, "-o", tmp_path / f"{name}.h5")
        run("export", tmp_path / f"{name}.h5", "-o", tmp_path / name)
        assert torch.isfinite(logits("AutoModelForCausalLM", tmp_path / name, ids)).all()
    report = json.loads(run("eval", tmp_path / "m.h5", tmp_path / "c_rank.h5", "--calib", tmp_path / "calib.h5", "--json"))
    assert all(0 < l["relative_error"] < 1 for l in report["evaluation"]["layers"]), report


@needs_all
def test_llama4_input_scaling_matters(tmp_path):
    """The imported layer evaluated as if σ(z) scaled the expert output is far from transformers
    (so the ≤ 1e-5 agreement above checks the input scaling, not a coincidence)."""
    cls, cfg = llama4_config(False)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():
        random_llama4(model)
    moe = model.model.layers[1].feed_forward
    x = torch.randn(32, 64)
    with torch.no_grad():
        want = moe(x)[0] - moe.shared_expert(x)
        z = moe.router(x)[1]
        idx = z.argmax(-1)
        w = torch.sigmoid(z.gather(1, idx[:, None]))
        gu, dn = moe.experts.gate_up_proj[idx], moe.experts.down_proj[idx]

        def expert(v):
            h = torch.einsum("th,thj->tj", v, gu)
            g, u = h.chunk(2, -1)
            return torch.einsum("ti,tih->th", u * torch.nn.functional.silu(g), dn)
        scale = want.abs().max()
        assert (expert(w * x) - want).abs().max() <= 1e-5 * scale
        assert (w * expert(x) - want).abs().max() > 0.1 * scale


def random_ernie(model):
    """Router rows large enough that the choice matters and a selection bias of the size of the
    probabilities (softmax over 16: about 1/16), so it changes the choice."""
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        elif name.endswith("e_score_correction_bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@needs_all
def test_ernie4_5_moe(tmp_path):
    """ERNIE-4.5-MoE: float32 router, softmax, a [1, E] selection bias (moe_statics) for the
    choice only, weights / max(sum, 1e-12); a shared expert (to /dense); layer 0 dense
    (moe_layer_start_index 1). Compact fits softmax rows and refits the [1, G] selection bias;
    pruning keeps the kept slots' biases and loads as a standard 8-expert model."""
    needs_exe()
    cfg = transformers.Ernie4_5_MoeConfig(
        **COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=16, moe_num_experts=16, moe_k=4,
        moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=2, moe_layer_interval=1, head_dim=16)
    d = save_tiny(tmp_path, "Ernie4_5_MoeForCausalLM", cfg, init=random_ernie)
    report = check_family(tmp_path, "Ernie4_5_MoeForCausalLM", d, groups=4, expert_count_keys=["moe_num_experts"])
    assert [l["name"] for l in report["evaluation"]["layers"]] == ["model.layers.1.mlp", "model.layers.2.mlp"]
    with h5py.File(tmp_path / "m.h5", "r") as f:
        g = f["moe_layers/model.layers.1.mlp"]
        assert g.attrs["router_type"] == "softmax_topk_norm" and np.abs(g["router/selection_bias"][()]).max() > 0
        assert "model.layers.1.mlp.shared_experts.up_proj.weight" in f["dense"]
    compact_beats_dropping_the_experts(tmp_path, "Ernie4_5_MoeForCausalLM", d, tmp_path / "m.h5", tmp_path / "calib.h5")
    with h5py.File(tmp_path / "compact.h5", "r") as f:
        assert f["moe_layers/model.layers.1.mlp/router/selection_bias"].shape == (4,)
    pruned_export_loads(tmp_path, "Ernie4_5_MoeForCausalLM", "moe_num_experts")


def capture_mode(tmp, model_dir, mode, dtype="float32"):
    """A capture in `mode` (--layerwise or --no-layerwise), in this process as `capture` does
    (four captures per test: a new interpreter each was about 5 s of importing torch)."""
    import capture_calibration
    out = tmp / f"{mode}-{dtype}.h5"
    capture_calibration.main([str(model_dir), "-o", str(out), "--text", str(tmp / "text.txt"),
                              "--tokens", "96", "--seq-len", "32", "--batch-size", "2", "--dtype", dtype, f"--{mode}"])
    with h5py.File(out, "r") as f:
        return {n: {k: f["moe_layers"][n][k][()] for k in ("hidden_states", "router_logits", "output")}
                for n in f["moe_layers"]}, json.loads(f.attrs["source"])["mode"]


@pytest.mark.parametrize("family,multimodal", [("qwen3_5_moe", True), ("qwen3_5_moe", False), ("llama4", True), ("llama4", False)])
@needs_all
def test_layerwise_capture_equals_whole_model_for_wrapper_families(tmp_path, family, multimodal):
    """Qwen3.5-MoE and Llama-4, multimodal wrapper and text-only: the layer-wise capture (the stack
    found through the first MoE block's module, the vision tower loaded as stem) equals the
    whole-model capture to the bit, in float32 and bfloat16."""
    cls, cfg = qwen3_5_config(multimodal) if family == "qwen3_5_moe" else llama4_config(multimodal)
    d = save_tiny(tmp_path, cls, cfg, init=random_softmax_router if family == "qwen3_5_moe" else random_llama4)
    for dtype in ("float32", "bfloat16"):
        whole, wm = capture_mode(tmp_path, d, "no-layerwise", dtype)
        layer, lm = capture_mode(tmp_path, d, "layerwise", dtype)
        assert (wm, lm) == ("whole-model", "layerwise")
        assert whole.keys() == layer.keys() and whole
        for n in whole:
            for k in whole[n]:
                assert np.array_equal(whole[n][k], layer[n][k]), (dtype, n, k)
