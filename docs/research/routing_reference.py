#!/usr/bin/env python3
"""Reference formulas (written independently, float32) for every family's router and expert, checked
against transformers 5.23's own modules on random inputs. The formulas here are the spec in families.md.

Each router reference returns (indices [T,k] as a set per row, weights [T,k] aligned with indices).
Ties: random float inputs, so no ties; torch.topk's tie order on CPU is implementation-defined.
"""
import sys, os, torch
import torch.nn.functional as F
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_tiny

torch.manual_seed(0)
torch.set_num_threads(1)
T_TOK = 33


# ---------------- reference routers ----------------
def softmax_topk(z, k, normalize):                       # mixtral (always), qwen2/3 moe, olmoe, qwen3_next (norm_topk_prob), qwen3_5 (always)
    p = torch.softmax(z, -1)
    w, i = torch.topk(p, k, -1)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    return i, w


def deepseek_v3_router(z, bias, k, n_group, topk_group, norm, scale):   # deepseek_v3, glm4_moe (+ kimi_k2, moonlight)
    E = z.shape[-1]
    s = torch.sigmoid(z)                                   # affinity
    c = s + bias                                           # selection score (bias for selection ONLY)
    g = c.view(-1, n_group, E // n_group).topk(2, -1).values.sum(-1)   # group score = sum of its top-2 biased scores
    gi = g.topk(topk_group, -1).indices
    gmask = torch.zeros_like(g).scatter_(1, gi, 1.0).bool()
    emask = gmask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    i = c.masked_fill(~emask, float("-inf")).topk(k, -1).indices
    w = s.gather(1, i)                                     # weights from UNbiased sigmoid
    if norm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return i, w * scale


def minimax_m2_router(z, bias, k):                         # sigmoid + bias for selection, always normalized, no scale
    s = torch.sigmoid(z)
    i = (s + bias).topk(k, -1).indices
    w = s.gather(1, i)
    return i, w / w.sum(-1, keepdim=True)


def ernie_router(z, bias, k, norm_min):                    # softmax, bias added for selection only, always normalized
    p = torch.softmax(z, -1)
    i = (p + bias.reshape(-1)).topk(k, -1).indices
    w = p.gather(1, i)
    return i, w / w.sum(-1, keepdim=True).clamp(min=norm_min)


def gpt_oss_router(x, W, b, k):                            # logits WITH router bias; top-k of logits, softmax over the k
    z = x @ W.t() + b
    v, i = z.topk(k, -1)
    return i, torch.softmax(v, -1)


def llama4_router(z, k):                                   # top-k of logits; weight = sigmoid(logit); it scales the expert INPUT
    v, i = z.topk(k, -1)
    return i, torch.sigmoid(v)


def deepseek_v2_router(z, k, method, n_group, topk_group, scale):   # softmax; greedy or group_limited_greedy (group score = max); NO normalisation in 5.23
    p = torch.softmax(z, -1)
    E = z.shape[-1]
    if method == "group_limited_greedy":
        g = p.view(-1, n_group, E // n_group).max(-1).values
        gi = g.topk(topk_group, -1).indices
        gmask = torch.zeros_like(g).scatter_(1, gi, 1.0).bool()
        p = p.masked_fill(~gmask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E), 0.0)
    w, i = p.topk(k, -1)
    return i, w * scale


# ---------------- reference experts ----------------
def glu_expert(x, Wg, Wu, Wd, act=F.silu):                 # Wg, Wu: [I, H]; Wd: [H, I] (nn.Linear convention)
    return (act(x @ Wg.t()) * (x @ Wu.t())) @ Wd.t()


def gpt_oss_expert(x, gate_up, gate_up_bias, down, down_bias, alpha=1.702, limit=7.0):
    # gate_up: [H, 2I] (x @ W convention), columns interleaved: gate = even columns, up = odd columns
    h = x @ gate_up + gate_up_bias
    g, u = h[..., 0::2], h[..., 1::2]
    g = g.clamp(max=limit)                                 # gate: upper clamp only
    u = u.clamp(-limit, limit)                             # up: both sides
    y = (u + 1) * (g * torch.sigmoid(alpha * g))
    return y @ down + down_bias                            # down: [I, H]


def llama4_expert(x, gate_up, down):                       # gate_up [H, 2I]: first I columns gate, last I columns up (halves)
    I = down.shape[0]
    h = x @ gate_up
    return (h[..., I:] * F.silu(h[..., :I])) @ down


def same_sets(i1, i2):
    return torch.equal(i1.sort(-1).values, i2.sort(-1).values)


def check(name, ok):
    print(f"{name:48s} {'OK' if ok else 'MISMATCH'}")
    return ok


def aligned(i_ref, w_ref, i_hf, w_hf, tol=1e-6):
    """compare weights after sorting both by expert index"""
    a = w_ref.gather(1, i_ref.argsort(-1)); b = w_hf.float().gather(1, i_hf.argsort(-1))
    return same_sets(i_ref, i_hf) and torch.allclose(a, b, atol=tol, rtol=1e-5)


def main():
    allok = True
    # deepseek_v3 / glm4_moe
    for fam in ("deepseek_v3", "glm4_moe"):
        cls, cfg = getattr(make_tiny, fam)()
        m = cls(cfg).eval()
        blk = m.model.layers[1].mlp
        with torch.no_grad():
            blk.gate.weight.normal_(0, 0.3); blk.gate.e_score_correction_bias.normal_(0, 0.1)
            x = torch.randn(T_TOK, cfg.hidden_size)
            z, w_hf, i_hf = blk.gate(x)
            i, w = deepseek_v3_router(x @ blk.gate.weight.t(), blk.gate.e_score_correction_bias, cfg.num_experts_per_tok,
                                      cfg.n_group, cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor)
            allok &= check(f"{fam} router (grouped sigmoid, bias, scale)", aligned(i, w, i_hf, w_hf))
            # whole block: routed + shared
            y_hf = blk(x[None])[0]
            ge = blk.experts
            I = cfg.moe_intermediate_size
            y = torch.zeros_like(x)
            for t in range(T_TOK):
                for j in range(i.shape[1]):
                    e = i[t, j]
                    y[t] += w[t, j] * glu_expert(x[t], ge.gate_up_proj[e, :I], ge.gate_up_proj[e, I:], ge.down_proj[e])
            sh = blk.shared_experts
            y += glu_expert(x, sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
            allok &= check(f"{fam} block = sum w*expert + shared", torch.allclose(y, y_hf, atol=1e-5))
    # minimax_m2
    cls, cfg = make_tiny.minimax_m2(); m = cls(cfg).eval(); blk = m.model.layers[0].mlp
    with torch.no_grad():
        blk.gate.weight.normal_(0, 0.3); blk.e_score_correction_bias.normal_(0, 0.1)
        x = torch.randn(T_TOK, cfg.hidden_size)
        _, w_hf, i_hf = blk.gate(x, blk.e_score_correction_bias)
        i, w = minimax_m2_router(x @ blk.gate.weight.t(), blk.e_score_correction_bias, cfg.num_experts_per_tok)
        allok &= check("minimax_m2 router (sigmoid, bias, normalized)", aligned(i, w, i_hf, w_hf))
    # ernie
    cls, cfg = make_tiny.ernie4_5_moe(); m = cls(cfg).eval(); blk = m.model.layers[1].mlp
    with torch.no_grad():
        blk.gate.weight.normal_(0, 0.3); blk.gate.moe_statics.e_score_correction_bias.normal_(0, 0.05)
        x = torch.randn(T_TOK, cfg.hidden_size)
        _, w_hf, i_hf = blk.gate(x)
        i, w = ernie_router(x @ blk.gate.weight.t(), blk.gate.moe_statics.e_score_correction_bias, cfg.moe_k, cfg.moe_norm_min)
        allok &= check("ernie4_5_moe router (softmax, bias select, norm)", aligned(i, w, i_hf, w_hf))
    # gpt_oss
    cls, cfg = make_tiny.gpt_oss(); m = cls(cfg).eval(); blk = m.model.layers[0].mlp
    with torch.no_grad():
        for p in blk.parameters(): p.normal_(0, 0.3)
        x = torch.randn(T_TOK, cfg.hidden_size)
        _, w_hf, i_hf = blk.router(x)
        i, w = gpt_oss_router(x, blk.router.weight, blk.router.bias, cfg.num_experts_per_tok)
        allok &= check("gpt_oss router (bias, topk logits, softmax k)", aligned(i, w, i_hf, w_hf))
        y_hf, _ = blk(x[None]); y_hf = y_hf[0]
        ex = blk.experts
        y = torch.zeros_like(x)
        for t in range(T_TOK):
            for j in range(i.shape[1]):
                e = i[t, j]
                y[t] += w[t, j] * gpt_oss_expert(x[t], ex.gate_up_proj[e], ex.gate_up_proj_bias[e], ex.down_proj[e], ex.down_proj_bias[e],
                                                 cfg.swiglu_alpha, cfg.swiglu_limit)
        allok &= check("gpt_oss block (clamped swiglu, interleaved, biases)", torch.allclose(y, y_hf, atol=1e-4))
    # llama4
    cls, cfg = make_tiny.llama4_text(); m = cls(cfg).eval(); blk = m.model.layers[1].feed_forward
    with torch.no_grad():
        for p in blk.parameters(): p.normal_(0, 0.3)
        x = torch.randn(T_TOK, cfg.hidden_size)
        y_hf, logits = blk(x)
        z = x @ blk.router.weight.t()
        i, w = llama4_router(z, cfg.num_experts_per_tok)
        ex = blk.experts
        y = glu_expert(x, blk.shared_expert.gate_proj.weight, blk.shared_expert.up_proj.weight, blk.shared_expert.down_proj.weight)
        for t in range(T_TOK):
            for j in range(i.shape[1]):
                e = i[t, j]
                y[t] += llama4_expert(w[t, j] * x[t], ex.gate_up_proj[e], ex.down_proj[e])   # weight scales the INPUT
        allok &= check("llama4 block (sigmoid(logit) * input, + shared)", torch.allclose(y, y_hf, atol=1e-4))
        y_wrong = glu_expert(x, blk.shared_expert.gate_proj.weight, blk.shared_expert.up_proj.weight, blk.shared_expert.down_proj.weight)
        for t in range(T_TOK):
            for j in range(i.shape[1]):
                e = i[t, j]
                y_wrong[t] += w[t, j] * llama4_expert(x[t], ex.gate_up_proj[e], ex.down_proj[e])
        print(f"{'   (output-scaling instead would differ by':48s} {(y_wrong - y_hf).abs().max().item():.3e})")
    # qwen3_next / qwen3_5_moe (shared expert with sigmoid gate)
    for fam in ("qwen3_next", "qwen3_5_moe_text"):
        cls, cfg = getattr(make_tiny, fam)(); m = cls(cfg).eval(); blk = m.model.layers[0].mlp
        with torch.no_grad():
            for p in blk.parameters(): p.normal_(0, 0.3)
            x = torch.randn(T_TOK, cfg.hidden_size)
            _, w_hf, i_hf = blk.gate(x)
            norm = getattr(cfg, "norm_topk_prob", True) if fam == "qwen3_next" else True
            i, w = softmax_topk(x @ blk.gate.weight.t(), cfg.num_experts_per_tok, norm)
            allok &= check(f"{fam} router (softmax top-k, norm)", aligned(i, w, i_hf, w_hf))
            y_hf = blk(x[None])[0]
            ex = blk.experts; I = cfg.moe_intermediate_size
            y = torch.zeros_like(x)
            for t in range(T_TOK):
                for j in range(i.shape[1]):
                    e = i[t, j]
                    y[t] += w[t, j] * glu_expert(x[t], ex.gate_up_proj[e, :I], ex.gate_up_proj[e, I:], ex.down_proj[e])
            sh = blk.shared_expert
            y += torch.sigmoid(x @ blk.shared_expert_gate.weight.t()) * glu_expert(x, sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
            allok &= check(f"{fam} block (+ sigmoid(x.g) * shared)", torch.allclose(y, y_hf, atol=1e-4))
    # deepseek_v2 (5.23 ignores norm_topk_prob)
    cls, cfg = make_tiny.deepseek_v2(); cfg.norm_topk_prob = True; m = cls(cfg).eval(); blk = m.model.layers[1].mlp
    with torch.no_grad():
        blk.gate.weight.normal_(0, 0.3)
        x = torch.randn(T_TOK, cfg.hidden_size)
        _, w_hf, i_hf = blk.gate(x)
        i, w = deepseek_v2_router(x @ blk.gate.weight.t(), cfg.num_experts_per_tok, "greedy", None, None, cfg.routed_scaling_factor)
        allok &= check("deepseek_v2 router greedy (norm_topk_prob=True ignored)", aligned(i, w, i_hf, w_hf))
    print("ALL OK" if allok else "SOME MISMATCH")


if __name__ == "__main__":
    main()
