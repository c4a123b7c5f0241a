#!/usr/bin/env python3
"""Collapse make_tiny_output.txt: expert numbers -> {e}, keep layer numbers, dedupe (shape kept)."""
import re, sys
fam = None
seen = set()
for line in open(sys.argv[1] if len(sys.argv) > 1 else "make_tiny_output.txt"):
    line = line.rstrip()
    if line.startswith("### "):
        fam = line; seen = set(); print(line); continue
    if line.startswith("config.json") or line.startswith("first MoE") or line.startswith("forward") or line.startswith("reload"):
        print(line); continue
    m = re.match(r"\s+(\S+) (\S+) (\[.*\])$", line)
    if not m:
        continue
    name, dt, shape = m.groups()
    if not re.search(r"(mlp|feed_forward|block_sparse_moe)\.", name):
        continue
    name = re.sub(r"experts\.(expert_)?\d+\.", lambda mm: "experts." + (mm.group(1) or "") + "{e}.", name)
    key = (name, shape)
    if key in seen:
        continue
    seen.add(key)
    print(f"    {name} {dt} {shape}")
