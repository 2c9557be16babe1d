# ruff: noqa: B023, E501  (lambdas are called at once, inside the loop that binds them)
"""Timing-only probe (wrong results by design): how much faster would cuda_mma run at M=1 if a
re-laid-out weight word needed fewer decode instructions (FAKEDEC=1: 2.5 integer ops a pair instead
of 3.75) and the activations needed no byte permutes (FAKEDEC=2)? Decides whether the re-layout is
worth building.

    PYTHONPATH=src python3 benchmarks/probe_decode_cost.py
"""

from __future__ import annotations

import torch
from bench_kernels import SHAPES, Layer, bench_graph

from nvfp4_fix.kernels import cuda_mma

print(f"# {torch.cuda.get_device_name()}")
print("| layer | N x K | cuBLAS us | default us | FAKEDEC=1 | =2 | =3 | load only |")
print("|---|---|---|---|---|---|---|---|")
for name, n, k in SHAPES["8b"] + SHAPES["70b"]:
    lay = Layer(n, k, 1)
    nw, nx = len(lay.w16), len(lay.x)
    cub = bench_graph(lambda i: torch.nn.functional.linear(lay.x[i % nx], lay.w16[i % nw]))
    row = [bench_graph(lambda i: cuda_mma.linear(*lay.qargs(i)))]
    for v in ({"FAKEDEC": 1}, {"FAKEDEC": 2}, {"FAKEDEC": 3}, {"LOADONLY": 1}):
        var = {**cuda_mma.VARIANT, **v}
        row.append(bench_graph(lambda i, var=var: cuda_mma.linear(*lay.qargs(i), variant=var)))
    print(
        f"| {name} | {n}x{k} | {cub:.1f} | " + " | ".join(f"{t:.1f} ({cub / t:.2f}x)" for t in row) + " |",
        flush=True,
    )
    lay = None
    torch.cuda.empty_cache()
