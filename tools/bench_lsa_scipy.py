#!/usr/bin/env python3
"""Time SciPy's linear sum assignment on one cost matrix (the reference for `smoe-bench assignment`).

Usage:  python3 tools/bench_lsa_scipy.py FILE N [--minimize]

FILE holds a square N x N cost matrix: raw float32 little-endian, row-major (any name), or a
`.npy` file. The script loads it, converts it to float64 (outside the timing, so SciPy is not
charged for the conversion), and times only

    scipy.optimize.linear_sum_assignment(C, maximize=True)

with time.perf_counter (maximize=False with --minimize). It prints one JSON line

    {"seconds": <solver wall time>, "objective": <sum of C[i, col[i]] in float64>, "n": N}

where the objective is summed in float64 from the float32 costs, exactly as smoe-compress's
`AssignmentResult.objective`. Needs only numpy and scipy.
"""
import json
import sys
import time

import numpy as np
from scipy.optimize import linear_sum_assignment


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    flags = [a for a in argv[1:] if a.startswith("--")]
    if len(args) != 2 or any(f != "--minimize" for f in flags):
        sys.exit("usage: bench_lsa_scipy.py FILE N [--minimize]")
    path, n = args[0], int(args[1])
    if path.endswith(".npy"):
        c32 = np.load(path)
    else:
        c32 = np.fromfile(path, dtype="<f4")
    if c32.size != n * n:
        sys.exit(f"{path}: {c32.size} values, expected {n} x {n} = {n * n}")
    c32 = c32.reshape(n, n).astype(np.float32, copy=False)
    c = c32.astype(np.float64)
    maximize = "--minimize" not in flags
    t0 = time.perf_counter()
    rows, cols = linear_sum_assignment(c, maximize=maximize)
    seconds = time.perf_counter() - t0
    objective = float(c32[rows, cols].astype(np.float64).sum())
    print(json.dumps({"seconds": seconds, "objective": objective, "n": n}), flush=True)


if __name__ == "__main__":
    main(sys.argv)
