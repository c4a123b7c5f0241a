#!/usr/bin/env python3
"""Time the MC-SMoE authors' weight-matching alignment (the reference for `smoe-bench align`).

Usage:  python3 tools/bench_align_authors.py [--weights DIR] [--layers N] [--experts N]
                                             [--d-model D] [--d-ff F] [--seed S]
                                             [--compare-perms FILE]

What is timed is the method of MC-SMoE (UNITES-Lab/MC-SMoE, mcsmoe/merging/permutation.py,
weight matching with Wo included), reimplemented here for timing: for every MoE layer, every
expert j = 1..E-1 is aligned to expert 0 in turn, on one thread of control as their loop does:

    cost = torch.mm(Wi_0, Wi_j.T) + torch.mm(Wo_0.T, Wo_j)          # [d_ff, d_ff], float32
    _, perm = scipy.optimize.linear_sum_assignment(cost.numpy(), maximize=True)
    Wi_j, Wo_j = Wi_j[perm, :], Wo_j[:, perm]                       # permute the expert

Wi is an expert's first matrix [d_ff, d_model] (smoe-compress's up) and Wo its second
[d_model, d_ff] (down). PyTorch keeps its default threads for the products (all cores), as the
authors' code runs.

Weights: with --weights DIR, the files DIR/layer<L>.f32 that `smoe-bench align` writes (raw
float32 little-endian: the E up matrices [E, d_ff, d_model], then the E down matrices
[E, d_model, d_ff]), so both sides align the same weights; without it, Gaussian weights of
standard deviation 1/sqrt(d_model) from torch's generator seeded with --seed (default 29).
Defaults: 2 layers, 32 experts, d_model 768, d_ff 3072 (Switch-base-32).

Prints one JSON line: {"seconds" (wall), "product_seconds", "solver_seconds", "permute_seconds",
"cpu_seconds" (the process's, all threads, over the same loops), "pairs", "torch_threads",
"torch", "scipy"}, and with --compare-perms FILE (int32 raw, the
permutations of smoe-compress in layer, expert order, expert 0 included) also "same_perms": how
many of the pairs got the same permutation. Exits 3 (with the reason on stderr) when torch,
numpy or scipy cannot be imported.
"""
import json
import sys
import time


def parse(argv):
    opts = {"--weights": None, "--layers": "2", "--experts": "32", "--d-model": "768", "--d-ff": "3072",
            "--seed": "29", "--compare-perms": None}
    i = 1
    while i < len(argv):
        if argv[i] not in opts or i + 1 >= len(argv):
            sys.exit(f"bench_align_authors.py: unknown option or missing value: {argv[i]} (see the usage in the file)")
        opts[argv[i]] = argv[i + 1]
        i += 2
    return opts


def main(argv):
    opts = parse(argv)
    try:
        import numpy as np
        import scipy
        import torch
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:
        print(f"cannot import {e.name}", file=sys.stderr)
        sys.exit(3)
    layers, e, d, f = (int(opts[k]) for k in ("--layers", "--experts", "--d-model", "--d-ff"))
    gen = torch.Generator().manual_seed(int(opts["--seed"]))

    def load(layer):
        """Wi [E, f, d] and Wo [E, d, f] of one layer."""
        if opts["--weights"] is None:
            scale = 1.0 / d ** 0.5
            wi = torch.randn(e, f, d, generator=gen) * scale
            wo = torch.randn(e, d, f, generator=gen) * scale
            return wi, wo
        raw = np.fromfile(f"{opts['--weights']}/layer{layer}.f32", dtype="<f4")
        if raw.size != 2 * e * f * d:
            sys.exit(f"{opts['--weights']}/layer{layer}.f32: {raw.size} values, expected 2 x {e} x {f} x {d}")
        wi = torch.from_numpy(raw[: e * f * d].reshape(e, f, d).copy())
        wo = torch.from_numpy(raw[e * f * d:].reshape(e, d, f).copy())
        return wi, wo

    product = solver = permute = cpu = 0.0
    perms = []
    for layer in range(layers):
        wi_all, wo_all = load(layer)  # outside the timing, as a loaded model is
        wi = [wi_all[j] for j in range(e)]
        wo = [wo_all[j] for j in range(e)]
        perms.append(np.arange(f, dtype=np.int32))
        with torch.no_grad():
            c0 = time.process_time()
            for j in range(1, e):
                t0 = time.perf_counter()
                cost = torch.mm(wi[0], wi[j].t())
                cost += torch.mm(wo[0].t(), wo[j])
                c = cost.cpu().numpy()
                t1 = time.perf_counter()
                _, perm = linear_sum_assignment(c, maximize=True)
                t2 = time.perf_counter()
                p = torch.from_numpy(perm)
                wi[j] = wi[j][p, :]
                wo[j] = wo[j][:, p]
                t3 = time.perf_counter()
                product += t1 - t0
                solver += t2 - t1
                permute += t3 - t2
                perms.append(perm.astype(np.int32))
            cpu += time.process_time() - c0
    doc = {"seconds": product + solver + permute, "product_seconds": product, "solver_seconds": solver,
           "permute_seconds": permute, "cpu_seconds": cpu, "pairs": layers * (e - 1), "torch_threads": torch.get_num_threads(),
           "torch": torch.__version__, "scipy": scipy.__version__}
    if opts["--compare-perms"] is not None:
        ours = np.fromfile(opts["--compare-perms"], dtype="<i4").reshape(layers * e, f)
        mine = np.stack(perms)
        doc["same_perms"] = int(sum(bool((ours[k] == mine[k]).all()) for k in range(layers * e) if k % e != 0))
    print(json.dumps(doc), flush=True)


if __name__ == "__main__":
    main(sys.argv)
