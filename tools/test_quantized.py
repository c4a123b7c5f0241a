"""Quantized checkpoints in and out (issue 25), against transformers itself (pytest).

- FP8 block-scaled DeepSeek-V3 (hub layout: per-expert float8_e4m3fn weights + float32
  weight_scale_inv, made by transformers' own Fp8Quantize; attention FP8 too): the tool's
  dequantized experts equal transformers' own dequantization bit for bit in float32; partial edge
  blocks (which transformers 5.23's loader gets wrong) equal the DeepSeek reference formula; an
  unmodified import -> export is byte-identical for every tensor; compress -> export writes FP8
  again, transformers loads it, and its MoE blocks match the tool's forward within the FP8 step.
- MXFP4 GPT-OSS (hand-packed blocks with every e2m1 code and E8M0 exponents 0 ... 252): the
  tool's values equal transformers' decode; `compress --groups 4 --router compact` -> export
  writes MXFP4 again with 4 experts, transformers loads it as a 4-expert GPT-OSS, its MoE blocks
  match the tool's forward within the MXFP4 step.
- G experts from FP8: `--router compact` is refused for DeepSeek-V3's sigmoid router, so a
  DeepSeek-V3 with n_group 1 goes through `compress --groups 4 --prune reap` (a 4-expert compact
  layer) -> FP8 export that transformers loads with n_routed_experts 4; an FP8 Qwen3-MoE (softmax
  router) through `--router compact` -> FP8 export that transformers loads with 4 experts.
Skips naming torch, transformers, h5py, numpy or accelerate (transformers' FP8 loader needs it)
when one is missing, and when smoe-compress is not built.
"""

import json
import subprocess

import pytest

from optional_deps import h5py, np, optional, torch, transformers  # noqa: F401
from optional_deps import MISSING, needs_all
from test_families import EXE, TEXT, capture, needs_exe, random_gpt_oss, random_router, run

accelerate = optional("accelerate")
# transformers' FP8 loader needs accelerate: the FP8 tests name it with whatever else is missing.
FP8_MISSING = MISSING + (["accelerate"] if accelerate is None else [])
needs_all_and_accelerate = pytest.mark.skipif(bool(FP8_MISSING), reason=f"optional python packages missing: {', '.join(FP8_MISSING)}")
BLOCK = (16, 16)


def fp8_ref_quantize(w, block):
    """Independent reference with partial edge blocks: per tile, scale = 448 / amax (1 if 0),
    q = e4m3(clamp(w * scale)), scale_inv = 1 / scale (float32)."""
    rows, cols = w.shape
    bm, bn = block
    gr, gc = -(-rows // bm), -(-cols // bn)
    pad = torch.zeros(gr * bm, gc * bn)
    pad[:rows, :cols] = w.float()
    t = pad.reshape(gr, bm, gc, bn)
    amax = t.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, 448.0 / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    q = torch.clamp(t * scale[:, None, :, None], -448, 448).to(torch.float8_e4m3fn).reshape(gr * bm, gc * bn)
    return q[:rows, :cols].contiguous(), (1.0 / scale).float()


def fp8_ref_dequantize(q, s, block):
    rows, cols = q.shape
    full = s.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return q.float() * full


def deepseek_config(moe_intermediate, n_group=4, topk_group=2):
    return transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=moe_intermediate, n_routed_experts=16,
        num_experts_per_tok=4, n_group=n_group, topk_group=topk_group, n_shared_experts=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=16, head_dim=16, tie_word_embeddings=False)


def fp8_deepseek(tmp, moe_intermediate=32, own_quantizer=False, n_group=4, topk_group=2):
    """A tiny DeepSeek-V3 in the hub's FP8 layout: every 2-D Linear weight but the router, the
    embeddings and lm_head quantized (block 16 x 16); other tensors float32."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    import types
    cfg = deepseek_config(moe_intermediate, n_group, topk_group)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        random_router(model)
    src = tmp / "float"
    model.save_pretrained(src)
    sd = load_file(str(src / "model.safetensors"))
    shim = types.SimpleNamespace(quantization_config=transformers.FineGrainedFP8Config(weight_block_size=list(BLOCK)))
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight") and "norm" not in k and not k.endswith("mlp.gate.weight") \
                and "embed_tokens" not in k and not k.startswith("lm_head"):
            if own_quantizer:
                q, s = fp8_ref_quantize(v, BLOCK)
                out[k], out[k + "_scale_inv"] = q, s
            else:
                out.update(Fp8Quantize(shim)._quantize_one(k, v))
        else:
            out[k] = v
    d = tmp / "fp8"
    d.mkdir()
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    c = json.loads((src / "config.json").read_text())
    c["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": list(BLOCK)}
    (d / "config.json").write_text(json.dumps(c, indent=1))
    (tmp / "text.txt").write_text(TEXT)
    return d, out


def tensors(folder):
    from safetensors import safe_open
    out = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def raw(t):
    """The tensor's bytes (float8 tensors cannot be compared with torch.equal)."""
    return t.contiguous().view(torch.uint8)


def layer_error(h5, calib):
    report = json.loads(run("eval", h5, h5, "--calib", calib, "--json"))
    return {layer["name"]: layer["captured_output_error"] for layer in report["evaluation"]["layers"]}


def capture_nl(tmp, model_dir, name):
    """tools/capture_calibration.py's main() in this process (torch and transformers imported once,
    not once per capture; a failure is SystemExit with the error line on stderr)."""
    import capture_calibration
    out = tmp / name
    capture_calibration.main([str(model_dir), "-o", str(out), "--text", str(tmp / "text.txt"), "--tokens", "96",
                              "--seq-len", "32", "--batch-size", "2", "--no-layerwise"])
    return out


def import_compress_export(tmp, folder, *compress_args):
    """Captures `folder` with transformers, imports it (the imported, dequantized layers must
    reproduce transformers' MoE blocks: <= 1e-5), compresses it to `tmp/c.h5` with
    `--groups 4` and `compress_args`, exports that to `tmp/out` in the source encoding and returns
    the exported tensors."""
    calib = capture_nl(tmp, folder, "calib.h5")
    run("import", folder, "-o", tmp / "m.h5")
    assert max(layer_error(tmp / "m.h5", calib).values()) <= 1e-5
    run("compress", tmp / "m.h5", "--calib", calib, "--groups", 4, *compress_args, "-o", tmp / "c.h5")
    run("export", tmp / "c.h5", "-o", tmp / "out")
    return tensors(tmp / "out")


def check_export_against_transformers(tmp, hf, compressed, bound):
    """The exported folder `tmp/out`, loaded by transformers as `hf`, runs (finite logits); its MoE
    blocks, captured on its own tokens, equal the tool's re-import of the folder (<= 1e-5) and are
    within `bound` of the tool's float32 layers `compressed` (the quantization step: each caller
    says why its bound holds) but not equal to them (the export really quantized)."""
    with torch.no_grad():
        assert torch.isfinite(hf(input_ids=torch.tensor([list(range(20))])).logits).all()
    calib2 = capture_nl(tmp, tmp / "out", "calib2.h5")
    run("import", tmp / "out", "-o", tmp / "back.h5")
    assert max(layer_error(tmp / "back.h5", calib2).values()) <= 1e-5
    errors = layer_error(compressed, calib2)
    assert 0 < max(errors.values()) <= bound, errors


@needs_all_and_accelerate
def test_fp8_deepseek_v3_dequantizes_as_transformers_and_round_trips_byte_identical(tmp_path):
    needs_exe()
    d, written = fp8_deepseek(tmp_path)
    run("import", d, "-o", tmp_path / "m.h5")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    sd = hf.state_dict()
    I = 32
    with h5py.File(tmp_path / "m.h5", "r") as f:
        history = json.loads(f.attrs["history"])
        assert history[0]["source_encoding"] == {"format": "fp8_e4m3_block", "block_size": [16, 16], "scale_dtype": "F32"}
        g = f["moe_layers/model.layers.1.mlp/experts"]
        gu = sd["model.layers.1.mlp.experts.gate_up_proj"]
        assert gu.dtype == torch.float32
        # Bit for bit: transformers' own dequantization in float32.
        assert np.array_equal(g["gate"][()].view(np.uint32), gu[:, :I].numpy().view(np.uint32))
        assert np.array_equal(g["up"][()].view(np.uint32), gu[:, I:].numpy().view(np.uint32))
        assert np.array_equal(g["down"][()].view(np.uint32), sd["model.layers.1.mlp.experts.down_proj"].numpy().view(np.uint32))
        # Dense FP8 tensors and their scales: byte for byte.
        q = f["dense/model.layers.1.self_attn.q_b_proj.weight"]
        assert q.attrs["dtype"] == "float8_e4m3fn"
        assert np.array_equal(q[()], raw(written["model.layers.1.self_attn.q_b_proj.weight"]).numpy())
        assert "model.layers.1.self_attn.q_b_proj.weight_scale_inv" in f["dense"]
    run("export", tmp_path / "m.h5", "-o", tmp_path / "same")
    a, b = tensors(d), tensors(tmp_path / "same")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(raw(a[k]), raw(b[k])), k
    assert json.loads((tmp_path / "same" / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


@needs_all_and_accelerate
def test_fp8_deepseek_v3_import_keep_fp8_stores_the_release_codes(tmp_path):
    """`import --keep-fp8`: the checkpoint's expert matrices are the release's FP8 codes and scales
    (one byte per weight), export gives the release back byte for byte, and `compress --groups 8
    --router compact --fp8` of it (grouped routing: 8 of 16 keeps 2 per group) exports FP8 experts that transformers loads and that equal the tool's layers."""
    needs_exe()
    d, written = fp8_deepseek(tmp_path)
    run("import", d, "-o", tmp_path / "k.h5", "--keep-fp8")
    with h5py.File(tmp_path / "k.h5", "r") as f:
        g = f["moe_layers/model.layers.1.mlp/experts"]
        assert g["gate"].attrs["dtype"] == "float8_e4m3fn" and list(g["gate"].attrs["block_size"]) == list(BLOCK)
        for e in range(16):
            for role, name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                k = f"model.layers.1.mlp.experts.{e}.{name}.weight"
                assert np.array_equal(g[role][e], raw(written[k]).numpy()), k
                assert np.array_equal(g[role + "_scale"][e], written[k + "_scale_inv"].float().numpy()), k
    run("export", tmp_path / "k.h5", "-o", tmp_path / "same")
    a, b = tensors(d), tensors(tmp_path / "same")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(raw(a[k]), raw(b[k])), k
    calib = capture_nl(tmp_path, d, "calib.h5")
    assert max(layer_error(tmp_path / "k.h5", calib).values()) <= 1e-5
    run("compress", tmp_path / "k.h5", "--calib", calib, "--groups", 8, "--router", "compact", "--fp8", "-o", tmp_path / "c.h5")
    run("export", tmp_path / "c.h5", "-o", tmp_path / "out")
    t = tensors(tmp_path / "out")
    assert t["model.layers.1.mlp.experts.7.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.1.mlp.experts.8.down_proj.weight" not in t
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(hf(input_ids=torch.tensor([list(range(20))])).logits).all()
    calib2 = capture_nl(tmp_path, tmp_path / "out", "calib2.h5")
    # The exported codes are the compressed checkpoint's own: transformers computes its layers.
    assert max(layer_error(tmp_path / "c.h5", calib2).values()) <= 1e-5


@needs_all
def test_fp8_partial_edge_blocks_follow_the_deepseek_formula(tmp_path):
    """d_ff 24 in 16-row blocks: the last block row is partial. transformers 5.23's loader derives
    12-row blocks here (wrong); the tool uses scale[i // 16, j // 16] as DeepSeek's weight_dequant."""
    needs_exe()
    d, written = fp8_deepseek(tmp_path, moe_intermediate=24, own_quantizer=True)
    run("import", d, "-o", tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "r") as f:
        g = f["moe_layers/model.layers.1.mlp/experts"]
        for e in range(16):
            for role, name in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                k = f"model.layers.1.mlp.experts.{e}.{name}.weight"
                want = fp8_ref_dequantize(written[k], written[k + "_scale_inv"], BLOCK).numpy()
                assert np.array_equal(g[role][e].view(np.uint32), want.view(np.uint32)), k
    run("export", tmp_path / "m.h5", "-o", tmp_path / "same")
    a, b = tensors(d), tensors(tmp_path / "same")
    for k in a:
        assert torch.equal(raw(a[k]), raw(b[k])), k


@needs_all_and_accelerate
def test_fp8_deepseek_v3_compress_exports_fp8_that_transformers_loads(tmp_path):
    needs_exe()
    d, _ = fp8_deepseek(tmp_path)
    t = import_compress_export(tmp_path, d)
    k = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert t[k].dtype == torch.float8_e4m3fn and t[k + "_scale_inv"].shape == (4, 2)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    # transformers on the re-quantized experts == the tool on the same (re-imported) experts ...
    # ... and within the FP8 step of the tool's merged float32 layer: e4m3 keeps 3 mantissa bits
    # (relative step 2^-3, round-off at most 2^-4 per weight, about 2.6 % RMS on Gaussian
    # weights); the block output error is of that order, well under 0.1.
    check_export_against_transformers(tmp_path, hf, tmp_path / "c.h5", bound=0.1)


def e2m1_lut():
    return torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float32)


def mxfp4_encode(w):
    """[E, R, C] -> blocks [E, R, C/32, 16], scales [E, R, C/32] (OCP rule, nearest code)."""
    E, R, C = w.shape
    g = w.reshape(E, R, C // 32, 32).float()
    amax = g.abs().amax(-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=1e-30))) - 2, torch.zeros_like(amax)).clamp(-127, 127)
    x = g / torch.exp2(e)[..., None]
    codes = (x[..., None] - e2m1_lut()).abs().argmin(-1).to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8), (e + 127).to(torch.uint8)


def mxfp4_gpt_oss(tmp, hand_packed):
    """A tiny GPT-OSS whose experts are MXFP4 (hub names); biases bf16, the rest float32."""
    from safetensors.torch import save_file
    E, H, I = 8, 64, 32
    cfg = transformers.GptOssConfig(vocab_size=128, hidden_size=H, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=16, num_hidden_layers=2, intermediate_size=I, num_local_experts=E,
                                    num_experts_per_tok=2, sliding_window=16, max_position_embeddings=128,
                                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        random_gpt_oss(model)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    packed = {}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts."
        for part in ("gate_up_proj", "down_proj"):
            w = sd.pop(p + part).transpose(1, 2).contiguous()  # module [E, in, out] -> disk [E, out, in]
            if hand_packed:
                # Every e2m1 code (both nibbles) and E8M0 exponents over 0 ... 252 (253, 254 overflow 6 * 2^e).
                blocks = torch.randint(0, 256, (*w.shape[:2], w.shape[2] // 32, 16), generator=g, dtype=torch.int32).to(torch.uint8)
                blocks.view(-1)[:256] = torch.arange(256, dtype=torch.int32).to(torch.uint8)
                scales = torch.randint(0, 253, (*w.shape[:2], w.shape[2] // 32), generator=g, dtype=torch.int32).to(torch.uint8)
                scales.view(-1)[:3] = torch.tensor([0, 127, 252], dtype=torch.uint8)
            else:
                blocks, scales = mxfp4_encode(w)
            sd[p + part + "_blocks"], sd[p + part + "_scales"] = blocks, scales
            sd[p + part + "_bias"] = sd[p + part + "_bias"].to(torch.bfloat16)
            packed[p + part] = (blocks, scales)
    d = tmp / ("mx_hand" if hand_packed else "mx")
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    c = cfg.to_dict()
    c["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (d / "config.json").write_text(json.dumps(c, indent=1, default=str))
    (tmp / "text.txt").write_text(TEXT)
    return d, packed


@needs_all
def test_mxfp4_gpt_oss_dequantizes_as_transformers(tmp_path):
    needs_exe()
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    d, packed = mxfp4_gpt_oss(tmp_path, hand_packed=True)
    run("import", d, "-o", tmp_path / "m.h5")
    with h5py.File(tmp_path / "m.h5", "r") as f:
        assert json.loads(f.attrs["history"])[0]["source_encoding"]["format"] == "mxfp4"
        for layer in range(2):
            p = f"model.layers.{layer}.mlp.experts."
            g = f[f"moe_layers/model.layers.{layer}.mlp/experts"]
            gu = convert_moe_packed_tensors(*packed[p + "gate_up_proj"], dtype=torch.float32)  # [E, H, 2I]
            dn = convert_moe_packed_tensors(*packed[p + "down_proj"], dtype=torch.float32)  # [E, I, H]
            assert gu.dtype == torch.float32
            # module layout [E, H, 2I] (even columns gate, odd up) -> the tool's [E, I, H] gate / up.
            for name, want in (("gate", gu[:, :, 0::2].transpose(1, 2)), ("up", gu[:, :, 1::2].transpose(1, 2)),
                               ("down", dn.transpose(1, 2))):
                assert np.array_equal(g[name][()].view(np.uint32), want.contiguous().numpy().view(np.uint32)), (layer, name)


@needs_all_and_accelerate  # transformers 5.25 loads MXFP4 through accelerate too
def test_mxfp4_gpt_oss_compact_compress_exports_mxfp4_that_transformers_loads_with_g_experts(tmp_path):
    needs_exe()
    d, _ = mxfp4_gpt_oss(tmp_path, hand_packed=False)
    t = import_compress_export(tmp_path, d, "--router", "compact")
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts."
        # MXFP4 again, with 4 experts: [G, 2I, H/32, 16] blocks, [G, out, in/32] E8M0 scales.
        assert t[p + "gate_up_proj_blocks"].dtype == torch.uint8 and tuple(t[p + "gate_up_proj_blocks"].shape) == (4, 64, 2, 16)
        assert t[p + "gate_up_proj_scales"].dtype == torch.uint8 and tuple(t[p + "gate_up_proj_scales"].shape) == (4, 64, 2)
        assert tuple(t[p + "down_proj_blocks"].shape) == (4, 64, 1, 16) and tuple(t[p + "down_proj_scales"].shape) == (4, 64, 1)
        assert t[p + "down_proj_bias"].dtype == torch.bfloat16 and tuple(t[p + "down_proj_bias"].shape) == (4, 64)
        assert p + "gate_up_proj" not in t
        assert tuple(t[f"model.layers.{layer}.mlp.router.weight"].shape) == (4, 64)
        assert tuple(t[f"model.layers.{layer}.mlp.router.bias"].shape) == (4,)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4" and config["num_local_experts"] == 4
    hf = transformers.GptOssForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert hf.config.num_local_experts == 4
    for layer in hf.model.layers:
        assert tuple(layer.mlp.router.weight.shape) == (4, 64)
        assert layer.mlp.experts.num_experts == 4
        assert tuple(layer.mlp.experts.down_proj_bias.shape) == (4, 64)
        assert tuple(layer.mlp.experts.gate_up_proj.shape) == (4, 64, 64)  # dequantized on CPU: [G, H, 2I]
    # Within the MXFP4 step: e2m1 keeps 1 mantissa bit (round-off up to 1/6 of a group's
    # largest value; about 12 % RMS on Gaussian weights), so the block error is of that order.
    check_export_against_transformers(tmp_path, hf, tmp_path / "c.h5", bound=0.3)
    # --dtype bf16: dequantized, quantization_config removed, loads as a plain GPT-OSS.
    run("export", tmp_path / "c.h5", "-o", tmp_path / "bf16", "--dtype", "bf16")
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    p = "model.layers.0.mlp.experts."
    assert tensors(tmp_path / "bf16")[p + "gate_up_proj"].dtype == torch.bfloat16
    assert tuple(tensors(tmp_path / "bf16")[p + "gate_up_proj"].shape) == (4, 64, 64)


@needs_all_and_accelerate
def test_fp8_deepseek_v3_pruned_to_g_experts_exports_fp8_that_transformers_loads(tmp_path):
    """n_group 1 (grouped routers are refused by --prune): REAP keeps 4 of 16 experts per layer
    (router rows and selection biases kept); the FP8 export is a stock 4-expert DeepSeek-V3."""
    needs_exe()
    d, _ = fp8_deepseek(tmp_path, n_group=1, topk_group=1)
    t = import_compress_export(tmp_path, d, "--prune", "reap")
    p = "model.layers.1.mlp."
    for e in range(4):
        for name, shape in (("gate_proj", (2, 4)), ("up_proj", (2, 4)), ("down_proj", (4, 2))):
            k = f"{p}experts.{e}.{name}.weight"
            assert t[k].dtype == torch.float8_e4m3fn and t[k + "_scale_inv"].shape == shape, k
    assert not any(k.startswith(f"{p}experts.4.") for k in t)
    assert tuple(t[p + "gate.weight"].shape) == (4, 64) and tuple(t[p + "gate.e_score_correction_bias"].shape) == (4,)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8" and config["n_routed_experts"] == 4
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert hf.config.n_routed_experts == 4
    mlp = hf.model.layers[1].mlp
    assert tuple(mlp.gate.weight.shape) == (4, 64)
    sd = hf.state_dict()
    assert tuple(sd[p + "experts.gate_up_proj"].shape) == (4, 64, 64) and tuple(sd[p + "experts.down_proj"].shape) == (4, 64, 32)
    # Within the FP8 step of the tool's pruned (and refitted) float32 layer; as in the merge test
    # above (e4m3: relative round-off at most 2^-4 per weight), well under 0.1.
    check_export_against_transformers(tmp_path, hf, tmp_path / "c.h5", bound=0.1)


@needs_all_and_accelerate
def test_f8_block_export_of_a_fused_bfloat16_qwen3_moe_loads_in_transformers(tmp_path):
    """`export --dtype f8-block` of a float checkpoint with fused [E, 2I, H] experts: written per
    expert (transformers 5.23 does not dequantize a fused FP8 gate_up_proj + _scale_inv on load);
    transformers' dequantized experts equal the tool's re-import of that folder bit for bit."""
    needs_exe()
    from safetensors.torch import load_file, save_file
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).eval().save_pretrained(tmp_path / "src")
    sd = load_file(str(tmp_path / "src" / "model.safetensors"))
    out = {}
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts."
        out[p + "gate_up_proj"] = torch.stack([torch.cat([sd.pop(f"{p}{e}.gate_proj.weight"), sd.pop(f"{p}{e}.up_proj.weight")])
                                               for e in range(16)]).to(torch.bfloat16)
        out[p + "down_proj"] = torch.stack([sd.pop(f"{p}{e}.down_proj.weight") for e in range(16)]).to(torch.bfloat16)
    out.update(sd)
    d = tmp_path / "fused"
    d.mkdir()
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    run("import", d, "-o", tmp_path / "m.h5")
    run("export", tmp_path / "m.h5", "-o", tmp_path / "fp8", "--dtype", "f8-block")
    t = tensors(tmp_path / "fp8")
    assert t["model.layers.0.mlp.experts.3.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.0.mlp.experts.gate_up_proj" not in t
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(str(tmp_path / "fp8"), dtype=torch.float32).state_dict()
    run("import", tmp_path / "fp8", "-o", tmp_path / "back.h5")
    with h5py.File(tmp_path / "back.h5", "r") as f:
        for layer in range(2):
            g = f[f"moe_layers/model.layers.{layer}.mlp/experts"]
            gu = hf[f"model.layers.{layer}.mlp.experts.gate_up_proj"].numpy()
            assert np.array_equal(g["gate"][()].view(np.uint32), gu[:, :16].view(np.uint32))
            assert np.array_equal(g["up"][()].view(np.uint32), gu[:, 16:].view(np.uint32))
            assert np.array_equal(g["down"][()].view(np.uint32), hf[f"model.layers.{layer}.mlp.experts.down_proj"].numpy().view(np.uint32))


@needs_all_and_accelerate
def test_fp8_qwen3_moe_compact_compress_exports_fp8_that_transformers_loads_with_g_experts(tmp_path):
    """A softmax router in an FP8 folder: `compress --groups 4 --router compact` -> FP8 export with
    4 experts per layer (Qwen3-MoE's per-expert hub layout) that transformers loads with num_experts 4."""
    needs_exe()
    from safetensors.torch import load_file, save_file
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    import types
    from test_families import random_softmax_router
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=16, num_experts_per_tok=4,
        norm_topk_prob=True, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        random_softmax_router(model)
    model.save_pretrained(tmp_path / "src")
    sd = load_file(str(tmp_path / "src" / "model.safetensors"))
    shim = types.SimpleNamespace(quantization_config=transformers.FineGrainedFP8Config(weight_block_size=list(BLOCK)))
    out = {}
    for k, v in sd.items():
        if ".mlp.experts." in k:
            out.update(Fp8Quantize(shim)._quantize_one(k, v))
        else:
            out[k] = v
    d = tmp_path / "fp8"
    d.mkdir()
    save_file(out, str(d / "model.safetensors"), metadata={"format": "pt"})
    c = json.loads((tmp_path / "src" / "config.json").read_text())
    c["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": list(BLOCK),
                                "modules_to_not_convert": ["lm_head", "model.layers.*.self_attn", "model.layers.*.mlp.gate"]}
    (d / "config.json").write_text(json.dumps(c, indent=1))
    (tmp_path / "text.txt").write_text(TEXT)
    t = import_compress_export(tmp_path, d, "--router", "compact")
    for layer in range(2):
        p = f"model.layers.{layer}.mlp."
        for e in range(4):
            for name, shape in (("gate_proj", (1, 2)), ("up_proj", (1, 2)), ("down_proj", (2, 1))):
                k = f"{p}experts.{e}.{name}.weight"
                assert t[k].dtype == torch.float8_e4m3fn and t[k + "_scale_inv"].shape == shape, k
        assert not any(k.startswith(f"{p}experts.4.") for k in t)
        assert tuple(t[p + "gate.weight"].shape) == (4, 32)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts.
    assert config["quantization_config"]["quant_method"] == "fp8" and config["num_local_experts"] == 4
    assert config.get("num_experts", 4) == 4
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert hf.config.num_experts == 4
    sd = hf.state_dict()
    assert tuple(sd["model.layers.0.mlp.experts.gate_up_proj"].shape) == (4, 32, 32)
    assert sd["model.layers.0.mlp.experts.gate_up_proj"].dtype == torch.float32
    # Within the FP8 step of the tool's compact float32 layer (e4m3 round-off, see above).
    check_export_against_transformers(tmp_path, hf, tmp_path / "c.h5", bound=0.1)
