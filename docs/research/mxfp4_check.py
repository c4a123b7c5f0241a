#!/usr/bin/env python3
"""Pin the GPT-OSS MXFP4 on-disk layout against transformers 5.23's own dequantizer (CPU only).

1. builds `*_blocks` [E, R, G, 16] uint8 and `*_scales` [E, R, G] uint8 by hand from a known float tensor,
2. dequantizes with transformers.integrations.mxfp4.convert_moe_packed_tensors and with a tiny
   independent reference (numpy-style) decoder, and checks they are identical,
3. writes a tiny GPT-OSS checkpoint whose experts are MXFP4 (hub naming) and loads it on CPU with
   Mxfp4Config(dequantize=True), checking the loaded gate_up_proj / down_proj equal the reference.
"""
import json, os, torch
from safetensors.torch import save_file, load_file
import transformers as T
from transformers.integrations.mxfp4 import convert_moe_packed_tensors, FP4_VALUES

torch.manual_seed(0)
LUT = torch.tensor(FP4_VALUES, dtype=torch.float32)  # index = 4-bit code: bit3 sign, bits2..1 exp, bit0 mantissa


def encode_mxfp4(w):
    """w: [E, R, C] float (C = input dim, multiple of 32) -> blocks [E, R, C/32, 16] u8, scales [E, R, C/32] u8.
    Reference quantizer (OCP MX): per group of 32 consecutive input elements, shared exponent
    e = floor(log2(amax)) - 2 (e2m1 max exponent is 2, i.e. 6.0 = 1.5*2^2), scale byte = e + 127,
    element = nearest e2m1 value of x / 2^e (ties -> lower code index here; saturate at +-6)."""
    E, R, C = w.shape
    g = w.reshape(E, R, C // 32, 32).float()
    amax = g.abs().amax(-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=1e-30))) - 2, torch.zeros_like(amax))
    e = e.clamp(-127, 127)
    x = g / torch.exp2(e)[..., None]
    # nearest code among the 16 values
    codes = (x[..., None] - LUT).abs().argmin(-1).to(torch.uint8)
    lo, hi = codes[..., 0::2], codes[..., 1::2]  # element 2j -> low nibble, element 2j+1 -> high nibble
    blocks = (lo | (hi << 4)).to(torch.uint8)
    scales = (e + 127).to(torch.uint8)
    return blocks, scales


def decode_reference(blocks, scales):
    """Independent decoder -> [E, R, C] float32 in the on-disk (row = output) orientation."""
    E, R, G, B = blocks.shape
    lo = (blocks & 0x0F).long()
    hi = (blocks >> 4).long()
    vals = torch.stack([LUT[lo], LUT[hi]], -1).reshape(E, R, G, 32)  # low nibble first
    vals = vals * torch.exp2(scales.float() - 127)[..., None]
    return vals.reshape(E, R, G * 32)


def main():
    E, H, I = 4, 96, 32  # hidden 96 -> 3 groups per gate_up row; I 32 -> 1 group per down row
    w_gu = torch.randn(E, 2 * I, H)  # on-disk orientation: rows = 2I outputs (interleaved gate/up), cols = H inputs
    w_dn = torch.randn(E, H, I)
    gu_b, gu_s = encode_mxfp4(w_gu)
    dn_b, dn_s = encode_mxfp4(w_dn)
    print("gate_up_proj_blocks", tuple(gu_b.shape), gu_b.dtype, " gate_up_proj_scales", tuple(gu_s.shape), gu_s.dtype)
    print("down_proj_blocks", tuple(dn_b.shape), " down_proj_scales", tuple(dn_s.shape))

    ref_gu = decode_reference(gu_b, gu_s)
    ref_dn = decode_reference(dn_b, dn_s)
    for dt in (torch.float32, torch.bfloat16):
        hf_gu = convert_moe_packed_tensors(gu_b, gu_s, dtype=dt)
        hf_dn = convert_moe_packed_tensors(dn_b, dn_s, dtype=dt)
        print(f"transformers dequant dtype={dt}: gate_up {tuple(hf_gu.shape)} (== [E, H, 2I], transposed), "
              f"down {tuple(hf_dn.shape)} (== [E, I, H])")
        assert torch.equal(hf_gu.float(), ref_gu.transpose(1, 2).to(dt).float()), "gate_up mismatch"
        assert torch.equal(hf_dn.float(), ref_dn.transpose(1, 2).to(dt).float()), "down mismatch"
    print("reference decoder == transformers convert_moe_packed_tensors (fp32 and bf16): OK")
    # one explicit byte, to document nibble order
    b = torch.tensor([[[[0x2F] + [0] * 15]]], dtype=torch.uint8)  # low nibble 0xF (-6.0), high 0x2 (+1.0)
    s = torch.tensor([[[128]]], dtype=torch.uint8)  # 2^(128-127) = 2
    d = convert_moe_packed_tensors(b, s, dtype=torch.float32)
    print("byte 0x2F with scale byte 128 -> elements[0:2] =", d[0, 0:2, 0].tolist(), "(low nibble first: -12, then 2)")
    rel = (ref_gu - w_gu).norm() / w_gu.norm()
    print(f"reference quantizer relative error on N(0,1): {rel:.3f}")

    # --- 3. a tiny MXFP4 GPT-OSS checkpoint, hub naming, loaded on CPU with dequantize=True
    out = "/tmp/smoe_tiny/gpt_oss_mxfp4"
    cfg = T.GptOssConfig(vocab_size=128, hidden_size=H, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_hidden_layers=1, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2,
                         layer_types=["full_attention"], tie_word_embeddings=False)
    model = T.GptOssForCausalLM(cfg).to(torch.bfloat16)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    p = "model.layers.0.mlp.experts."
    for k in ("gate_up_proj", "down_proj"):
        del sd[p + k]
    sd[p + "gate_up_proj_blocks"], sd[p + "gate_up_proj_scales"] = gu_b, gu_s
    sd[p + "down_proj_blocks"], sd[p + "down_proj_scales"] = dn_b, dn_s
    os.makedirs(out, exist_ok=True)
    save_file(sd, out + "/model.safetensors", metadata={"format": "pt"})
    c = cfg.to_dict()
    c["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    json.dump(c, open(out + "/config.json", "w"), indent=1, default=str)
    m = T.GptOssForCausalLM.from_pretrained(out, quantization_config=T.Mxfp4Config(dequantize=True),
                                            dtype=torch.bfloat16)
    ex = m.model.layers[0].mlp.experts
    print("loaded (dequantize=True, CPU):", type(ex).__name__, "gate_up_proj", tuple(ex.gate_up_proj.shape),
          ex.gate_up_proj.dtype, "down_proj", tuple(ex.down_proj.shape))
    assert torch.equal(ex.gate_up_proj.float(), ref_gu.transpose(1, 2).bfloat16().float())
    assert torch.equal(ex.down_proj.float(), ref_dn.transpose(1, 2).bfloat16().float())
    print("loaded tensors == reference decode (transposed): OK")
    with torch.no_grad():
        print("forward ok:", tuple(m(input_ids=torch.randint(0, 128, (1, 5))).logits.shape))
    m.save_pretrained(out + "_resaved")
    from safetensors import safe_open
    with safe_open(out + "_resaved/model.safetensors", "pt") as f:
        ks = [(k, f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys() if "experts" in k]
    print("save_pretrained after dequantize=True writes:", ks)
    print("resaved config has quantization_config:", "quantization_config" in json.load(open(out + "_resaved/config.json")))


if __name__ == "__main__":
    main()
