#!/usr/bin/env python3
"""Build tiny random MoE models with transformers 5.23 (CPU), save_pretrained, list tensors.

usage: python3 make_tiny.py [family ...] [--out DIR] [--dtype bfloat16|float32] [--forward]
Each builder returns (model_class, config). Default output dir: /tmp/smoe_tiny/<family>.
"""
import sys, os, json, argparse, traceback
import torch
import transformers as T
from safetensors import safe_open

torch.manual_seed(0)
COMMON = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False)


def deepseek_v3():
    # DeepSeek-V3 / Kimi-K2 / Moonlight layout: 64 routed experts, top-8, 8 groups, topk_group 4
    c = T.DeepseekV3Config(**COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=16,
                           n_routed_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
                           routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
                           q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                           head_dim=8)
    return T.DeepseekV3ForCausalLM, c


def deepseek_v2():
    c = T.DeepseekV2Config(**COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=16,
                           n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2, first_k_dense_replace=1,
                           q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                           head_dim=8, topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0)
    return T.DeepseekV2ForCausalLM, c


def glm4_moe():
    c = T.Glm4MoeConfig(**COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=16,
                        n_routed_experts=32, num_experts_per_tok=4, n_shared_experts=1, n_group=1, topk_group=1,
                        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, head_dim=16)
    return T.Glm4MoeForCausalLM, c


def gpt_oss():
    c = T.GptOssConfig(**COMMON, num_hidden_layers=2, intermediate_size=24, num_local_experts=32,
                       num_experts_per_tok=4, head_dim=16, sliding_window=16,
                       layer_types=["sliding_attention", "full_attention"])
    return T.GptOssForCausalLM, c


def llama4_text():
    c = T.Llama4TextConfig(**COMMON, num_hidden_layers=2, intermediate_size=24, intermediate_size_mlp=96,
                           num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=2, head_dim=16,
                           attention_chunk_size=32)
    return T.Llama4ForCausalLM, c


def llama4():
    tc = dict(**COMMON, num_hidden_layers=2, intermediate_size=24, intermediate_size_mlp=96, num_local_experts=16,
              num_experts_per_tok=1, interleave_moe_layer_step=1, head_dim=16, attention_chunk_size=32)
    vc = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
              patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    c = T.Llama4Config(text_config=tc, vision_config=vc)
    return T.Llama4ForConditionalGeneration, c


def qwen3_next():
    c = T.Qwen3NextConfig(**COMMON, num_hidden_layers=4, intermediate_size=96, moe_intermediate_size=16,
                          shared_expert_intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                          norm_topk_prob=True, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
                          linear_key_head_dim=16, linear_value_head_dim=16, decoder_sparse_step=1, mlp_only_layers=[3],
                          layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"])
    return T.Qwen3NextForCausalLM, c


def qwen3_5_moe_text():
    c = T.Qwen3_5MoeTextConfig(**COMMON, num_hidden_layers=2, moe_intermediate_size=16,
                               shared_expert_intermediate_size=32, num_experts=16, num_experts_per_tok=4, head_dim=16,
                               linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                               linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"])
    return T.Qwen3_5MoeForCausalLM, c


def qwen3_5_moe():
    tc = dict(**COMMON, num_hidden_layers=2, moe_intermediate_size=16, shared_expert_intermediate_size=32,
              num_experts=16, num_experts_per_tok=4, head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2,
              linear_key_head_dim=16, linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"])
    vc = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
    c = T.Qwen3_5MoeConfig(text_config=tc, vision_config=vc)
    return T.Qwen3_5MoeForConditionalGeneration, c


def minimax_m2():
    c = T.MiniMaxM2Config(**COMMON, num_hidden_layers=2, intermediate_size=16, num_local_experts=16,
                          num_experts_per_tok=4, head_dim=16, rotary_dim=8)
    return T.MiniMaxM2ForCausalLM, c


def ernie4_5_moe():
    c = T.Ernie4_5_MoeConfig(**COMMON, num_hidden_layers=3, intermediate_size=96, moe_intermediate_size=16,
                             moe_num_experts=16, moe_k=4, moe_num_shared_experts=1, moe_layer_start_index=1,
                             moe_layer_end_index=2, moe_layer_interval=1, head_dim=16)
    return T.Ernie4_5_MoeForCausalLM, c


def mixtral():
    c = T.MixtralConfig(**COMMON, num_hidden_layers=2, intermediate_size=16, num_local_experts=8,
                        num_experts_per_tok=2, head_dim=16)
    return T.MixtralForCausalLM, c


def qwen2_moe():
    c = T.Qwen2MoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=16,
                         shared_expert_intermediate_size=32, num_experts=16, num_experts_per_tok=4)
    return T.Qwen2MoeForCausalLM, c


def qwen3_moe():
    c = T.Qwen3MoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=96, moe_intermediate_size=16,
                         num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, head_dim=16)
    return T.Qwen3MoeForCausalLM, c


def olmoe():
    c = T.OlmoeConfig(**COMMON, num_hidden_layers=2, intermediate_size=16, num_experts=16, num_experts_per_tok=4)
    return T.OlmoeForCausalLM, c


def switch_transformers():
    c = T.SwitchTransformersConfig(vocab_size=128, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2,
                                   expert_capacity=8)
    return T.SwitchTransformersForConditionalGeneration, c


FAMILIES = [deepseek_v3, deepseek_v2, glm4_moe, gpt_oss, llama4_text, llama4, qwen3_next, qwen3_5_moe_text,
            qwen3_5_moe, minimax_m2, ernie4_5_moe, mixtral, qwen2_moe, qwen3_moe, olmoe, switch_transformers]

MOE_KEYS = ("expert", "top", "group", "scaling", "norm", "scoring", "dense", "mlp_only", "sparse", "moe", "shared",
            "act", "swiglu", "limit", "alpha", "intermediate", "router", "interleave", "num_hidden_layers",
            "layer_types", "model_type", "architectures", "dtype", "capacity")


def moe_config_view(d):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k.endswith("_config"):
            sub = moe_config_view(v)
            if sub:
                out[k] = sub
        elif any(s in k for s in MOE_KEYS):
            out[k] = v
    return out


def build(name, out_root, dtype, forward):
    fn = globals()[name]
    cls, cfg = fn()
    model = cls(cfg).eval().to(dtype)
    out = os.path.join(out_root, name)
    model.save_pretrained(out)
    keys = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(out, f), "pt") as s:
                for k in s.keys():
                    sl = s.get_slice(k)
                    keys[k] = (sl.get_dtype(), sl.get_shape())
    print(f"### {name}: {cls.__name__}  ->  {out}")
    saved_cfg = json.load(open(os.path.join(out, "config.json")))
    print("config.json (MoE-relevant keys):", json.dumps(moe_config_view(saved_cfg), sort_keys=True))
    # module tree of the first MoE-bearing layer
    for mn, m in model.named_modules():
        if any(mn.endswith(s) for s in (".mlp", ".block_sparse_moe", ".feed_forward", ".feed_forward.moe")) and \
                any("expert" in n for n, _ in m.named_modules()):
            print(f"first MoE block module: {mn}  ({type(m).__name__})")
            for sn, sm in m.named_modules():
                if sn:
                    params = {pn: tuple(p.shape) for pn, p in sm.named_parameters(recurse=False)}
                    bufs = {bn: tuple(b.shape) for bn, b in sm.named_buffers(recurse=False)}
                    print(f"    {sn}: {type(sm).__name__} params={params} buffers={bufs}")
            break
    print("tensors (name dtype shape):")
    for k in sorted(keys, key=lambda s: [int(t) if t.isdigit() else t for t in s.split('.')]):
        d, s = keys[k]
        print(f"    {k} {d} {s}")
    if forward:
        ids = torch.randint(0, 128, (1, 7))
        with torch.no_grad():
            if "switch" in name:
                o = model(input_ids=ids, decoder_input_ids=ids)
            else:
                o = model(input_ids=ids)
        print("forward ok, logits", tuple(o.logits.shape))
        # reload round trip
        m2 = cls.from_pretrained(out, dtype=dtype)
        with torch.no_grad():
            o2 = m2(input_ids=ids, decoder_input_ids=ids) if "switch" in name else m2(input_ids=ids)
        print("reload max |diff|", (o.logits - o2.logits).abs().max().item())
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("families", nargs="*")
    ap.add_argument("--out", default="/tmp/smoe_tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--forward", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    names = a.families or [f.__name__ for f in FAMILIES]
    for n in names:
        try:
            build(n, a.out, getattr(torch, a.dtype), a.forward)
        except Exception as e:
            print(f"### {n}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
        print()
