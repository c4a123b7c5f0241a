#!/usr/bin/env python3
"""Which on-disk expert layouts transformers 5.23 loads, and what save_pretrained writes back.

For each family: build a tiny model, write its *internal* state_dict verbatim (fused 3-D experts,
transformers-5 module names) with safetensors.save_file, load it with from_pretrained, compare outputs
with the original, then save_pretrained the loaded model and list the expert tensor names it writes.
"""
import os, sys, json, torch
from safetensors.torch import save_file
from safetensors import safe_open
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tiny

torch.manual_seed(0)
torch.set_num_threads(1)


def run(name):
    cls, cfg = getattr(make_tiny, name)()
    m = cls(cfg).eval()
    out = f"/tmp/smoe_tiny/layout_{name}"
    os.makedirs(out, exist_ok=True)
    sd = {k: v.contiguous().clone() for k, v in m.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, out + "/model.safetensors", metadata={"format": "pt"})
    cfg.save_pretrained(out)
    ids = torch.randint(0, 128, (1, 6))
    kw = dict(decoder_input_ids=ids) if "switch" in name else {}
    m2 = cls.from_pretrained(out)
    with torch.no_grad():
        d = (m(input_ids=ids, **kw).logits - m2(input_ids=ids, **kw).logits).abs().max().item()
    m2.save_pretrained(out + "_resaved")
    with safe_open(out + "_resaved/model.safetensors", "pt") as f:
        names = sorted({".".join(p if not p.isdigit() else "N" for p in k.split(".")) for k in f.keys() if "expert" in k})
    fused_in = sorted({".".join(p if not p.isdigit() else "N" for p in k.split(".")) for k in sd if "expert" in k})
    print(f"{name}: fused/internal names on disk {fused_in}\n   load ok, max|dlogits|={d:.2e}; save_pretrained writes {names}")


if __name__ == "__main__":
    for n in sys.argv[1:] or ["mixtral", "qwen3_moe", "deepseek_v3", "glm4_moe", "minimax_m2", "ernie4_5_moe", "qwen3_5_moe"]:
        try:
            run(n)
        except Exception as e:
            print(f"{n}: FAILED {type(e).__name__}: {e}")
