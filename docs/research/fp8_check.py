#!/usr/bin/env python3
"""Pin transformers 5.23's fine-grained (block-scaled) FP8 format on CPU.

1. Quantize with transformers' own reference quantizer (integrations.finegrained_fp8.Fp8Quantize) and
   with an independent formula; check bit equality.
2. Dequantize with transformers' Fp8Dequantize and with the independent formula
   (w = fp8.float() * scale_inv expanded over 128x128 / BxB blocks, then cast once).
3. Write a tiny DeepSeek-V3 checkpoint in the hub's FP8 layout (per-expert fp8 weights + weight_scale_inv,
   router / norms / embeddings / lm_head unquantized) and load it on CPU (no GPU -> automatic dequantize=True);
   check every loaded tensor equals the independent dequantization.
4. Partial edge blocks: what transformers does when a dimension is not a multiple of the block.
"""
import json, os, types, torch
from safetensors import safe_open
from safetensors.torch import save_file
import transformers as T
from transformers.integrations.finegrained_fp8 import Fp8Quantize, Fp8Dequantize

torch.manual_seed(0)
FP8 = torch.float8_e4m3fn
FMAX = torch.finfo(FP8).max  # 448.0
BLOCK = (16, 16)  # the real checkpoints use (128, 128); the math is identical


def shim(block):
    q = types.SimpleNamespace(quantization_config=T.FineGrainedFP8Config(weight_block_size=block))
    return q


def ref_quantize(w, block):
    """Independent reference: per (bm x bn) tile, scale = 448 / amax (1 if amax == 0),
    q = clamp(w * scale, -448, 448) cast to e4m3fn (round-to-nearest-even), scale_inv = 1 / scale (fp32)."""
    rows, cols = w.shape[-2:]
    bm, bn = block
    assert rows % bm == 0 and cols % bn == 0
    t = w.float().reshape(*w.shape[:-2], rows // bm, bm, cols // bn, bn)
    amax = t.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, FMAX / torch.where(amax > 0, amax, torch.ones_like(amax)), torch.ones_like(amax))
    q = torch.clamp(t * scale[..., :, None, :, None], -FMAX, FMAX).to(FP8).reshape(w.shape)
    return q, (1.0 / scale).float()


def ref_dequantize(q, s, block, dtype):
    """Independent reference with ceil-sized scale grids: expand each scale over its block, crop the
    partial edge blocks, multiply in float32, cast once to the target dtype."""
    rows, cols = q.shape[-2:]
    bm, bn = block
    full = s.float().repeat_interleave(bm, dim=-2)[..., :rows, :].repeat_interleave(bn, dim=-1)[..., :cols]
    return (q.float() * full).to(dtype)


def e4m3fn_decode(b):
    """Byte -> value for float8_e4m3fn (what the Swift importer implements): sign = bit 7, exponent = bits 6..3
    (bias 7), mantissa = bits 2..0; exponent 0 -> subnormal m/8 * 2^-6; 0x7F / 0xFF = NaN; no infinities."""
    sgn = -1.0 if b & 0x80 else 1.0
    e, m = (b >> 3) & 0xF, b & 0x7
    if e == 0xF and m == 0x7:
        return float("nan")
    if e == 0:
        return sgn * (m / 8.0) * 2.0 ** -6
    return sgn * (1 + m / 8.0) * 2.0 ** (e - 7)


def step0():
    codes = torch.arange(256, dtype=torch.uint8)
    t = codes.view(FP8).float()
    ok = all((torch.isnan(t[i]).item() and e4m3fn_decode(i) != e4m3fn_decode(i)) or t[i].item() == e4m3fn_decode(i)
             for i in range(256))
    print("float8_e4m3fn byte decode formula matches torch for all 256 codes:", ok,
          " max:", e4m3fn_decode(0x7E), " min subnormal:", e4m3fn_decode(0x01))


def step1_2():
    w = torch.randn(48, 64) * 0.05
    w[:16, :16] = 0  # an all-zero block -> scale_inv 1
    out = Fp8Quantize(shim(BLOCK))._quantize_one("x.weight", w)
    q, s = out["x.weight"], out["x.weight_scale_inv"]
    rq, rs = ref_quantize(w, BLOCK)
    print("quantize: weight", q.dtype, tuple(q.shape), " weight_scale_inv", s.dtype, tuple(s.shape))
    print("  transformers Fp8Quantize == reference (bits):", torch.equal(q.view(torch.uint8), rq.view(torch.uint8)),
          " scales equal:", torch.equal(s, rs), " zero-block scale_inv:", s[0, 0].item())
    amax = w.reshape(3, 16, 4, 16).abs().amax((1, 3))
    nz = amax > 0
    print("  scale_inv == amax/448 exactly?", torch.equal(s[nz], (amax / FMAX)[nz]),
          " max rel diff:", ((s - amax / FMAX).abs() / s)[nz].max().item(), "(stored value is 1/(448/amax) in fp32)")
    deq = Fp8Dequantize(shim(BLOCK))
    for dt in (torch.float32, torch.bfloat16):
        hf = deq._dequantize_one(q, s, output_dtype=dt)
        print(f"  dequant to {dt}: transformers == reference(f32 multiply, then cast):",
              torch.equal(hf, ref_dequantize(q, s, BLOCK, dt)),
              " == multiply done in the target dtype?",
              torch.equal(hf, q.to(dt) * ref_dequantize(torch.ones(q.shape).to(FP8), s, BLOCK, torch.float32).to(dt)))
    print("  relative error of the round trip:", ((ref_dequantize(q, s, BLOCK, torch.float32) - w).norm() / w.norm()).item())
    # default output dtype when the caller gives none (direct use): scales are fp32 -> float32
    print("  default output dtype (no target param):", deq._dequantize_one(q, s).dtype)


def step3():
    out = "/tmp/smoe_tiny/deepseek_v3_fp8"
    cfg = T.DeepseekV3Config(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                             num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=16,
                             num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
                             q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                             head_dim=16, tie_word_embeddings=False)
    T.DeepseekV3ForCausalLM(cfg).save_pretrained(out + "_bf", safe_serialization=True)
    with safe_open(out + "_bf/model.safetensors", "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    qd, ref = {}, {}
    for k, v in sd.items():
        quantize = (v.ndim == 2 and k.endswith(".weight") and "norm" not in k and not k.endswith("mlp.gate.weight")
                    and "embed_tokens" not in k and not k.startswith("lm_head"))
        if quantize:
            r = Fp8Quantize(shim(BLOCK))._quantize_one(k, v)
            qd.update(r)
            ref[k] = (r[k], r[k[:-len("weight")] + "weight_scale_inv"])
        else:
            qd[k] = v.to(torch.bfloat16) if v.dtype == torch.float32 and "e_score_correction_bias" not in k else v
    os.makedirs(out, exist_ok=True)
    save_file(qd, out + "/model.safetensors", metadata={"format": "pt"})
    c = cfg.to_dict()
    c["dtype"] = "bfloat16"  # as the hub DeepSeek-V3 config (torch_dtype bfloat16)
    c["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": list(BLOCK)}
    json.dump(c, open(out + "/config.json", "w"), indent=1, default=str)
    ex = [k for k in qd if "experts.0.gate_proj" in k]
    print("hub-style FP8 tensors for one expert:", [(k, str(qd[k].dtype), tuple(qd[k].shape)) for k in sorted(ex)])
    for dt in (torch.float32, torch.bfloat16):
        m = T.DeepseekV3ForCausalLM.from_pretrained(out, dtype=dt)  # CPU: quantizer switches to dequantize=True
        msd = m.state_dict()
        ok = True
        E = cfg.n_routed_experts
        for li in (1,):
            p = f"model.layers.{li}.mlp.experts."
            gu = msd[p + "gate_up_proj"]
            dn = msd[p + "down_proj"]
            for e in range(E):
                g = ref_dequantize(*ref[f"{p}{e}.gate_proj.weight"], BLOCK, dt)
                u = ref_dequantize(*ref[f"{p}{e}.up_proj.weight"], BLOCK, dt)
                d = ref_dequantize(*ref[f"{p}{e}.down_proj.weight"], BLOCK, dt)
                ok &= torch.equal(gu[e], torch.cat([g, u], 0)) and torch.equal(dn[e], d)
        k = "model.layers.1.self_attn.q_b_proj.weight"
        ok &= torch.equal(msd[k], ref_dequantize(*ref[k], BLOCK, dt))
        print(f"load dtype={dt}: loaded module types: experts={type(m.model.layers[1].mlp.experts).__name__}, "
              f"q_b_proj={type(m.model.layers[1].self_attn.q_b_proj).__name__}; gate_up_proj {gu.dtype} {tuple(gu.shape)}; "
              f"all equal reference: {ok}; dtypes in model: {sorted({str(v.dtype) for v in msd.values()})}")
    with torch.no_grad():
        print("forward ok:", tuple(m(input_ids=torch.randint(0, 128, (1, 5))).logits.shape))
    try:
        m.save_pretrained(out + "_resaved")
    except Exception as e:
        print(f"save_pretrained of the FP8-dequantized model FAILS in 5.23: {type(e).__name__}: {e}")
        return
    with safe_open(out + "_resaved/model.safetensors", "pt") as f:
        ks = sorted((k, f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()
                    if "layers.1.mlp.experts.0." in k or "layers.1.self_attn.q_b" in k)
    rc = json.load(open(out + "_resaved/config.json"))
    print("save_pretrained of the dequantized model writes:", ks, " quantization_config kept:", "quantization_config" in rc)


def step4():
    deq = Fp8Dequantize(shim(BLOCK))
    for rows, cols in ((24, 64), (40, 64)):
        w = torch.randn(rows, cols)
        r = Fp8Quantize(shim(BLOCK))._quantize_one("x.weight", w)
        print(f"[{rows},{cols}] Fp8Quantize with block 16: returns dtype {r['x.weight'].dtype}, keys {sorted(r)} "
              "(non-divisible shapes are left unquantized)")
        # a checkpoint quantized elsewhere (DeepSeek's own tools) has ceil-sized grids:
        s = torch.rand((rows + 15) // 16, (cols + 15) // 16) + 0.5
        q = (torch.randn(rows, cols) * 100).clamp(-448, 448).to(FP8)
        try:
            hf = deq._dequantize_one(q, s, output_dtype=torch.float32)
            print(f"  Fp8Dequantize on ceil grid {tuple(s.shape)}: derives block {(rows // s.shape[0], cols // s.shape[1])}; "
                  f"equals correct 16-block dequant: {torch.equal(hf, ref_dequantize(q, s, BLOCK, torch.float32))}")
        except ValueError as e:
            print(f"  Fp8Dequantize on ceil grid {tuple(s.shape)}: ValueError: {e}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    step0()
    step1_2()
    step3()
    step4()
