"""Sweep cuda_mma compile variants and warps per block on the Llama-3 8B/70B decode shapes.

    PYTHONPATH=src python3 benchmarks/sweep_cuda_mma.py [--m 1,4,8]

Prints, per shape and M, cuBLAS bf16 and the best (variant, warps) with its time, after checking
every variant against a float64 reference (relative L2 < 1e-2).
"""

from __future__ import annotations

import argparse
import itertools

import torch
from bench_kernels import SHAPES, Layer, bench_graph, rel_err

from nvfp4_fix.codec import dequantize
from nvfp4_fix.kernels import cuda_mma

VARIANTS = [
    {"DEPTH": d, "XPRE": x, "LOADONLY": 0, "RT": 1, "MINB": b}
    for d, x, b in [
        (2, 1, 1),
        (2, 0, 1),
        (2, 1, 2),
        (2, 0, 2),
        (2, 0, 3),
        (1, 1, 3),
        (3, 0, 2),
        (3, 0, 1),
        (3, 1, 1),
        (4, 0, 1),
        (4, 0, 2),
    ]
]
# Diagnostic: the same loads with no decode or mma (wrong results): the access pattern's bandwidth.
LOAD_ONLY = [{"DEPTH": 2, "XPRE": 0, "LOADONLY": 1, "RT": 1, "MINB": b} for b in (1, 3)]


def sweep(name: str, n: int, k: int, m: int, warps: list[int], load_only: bool) -> None:
    lay = Layer(n, k, m)
    x0, wp, ws, mul = lay.qargs(0)
    ref = x0.double() @ dequantize(wp, ws, mul, "multiplier", torch.float64).t()
    nw, nx = len(lay.w16), len(lay.x)
    cub = bench_graph(
        lambda i: torch.nn.functional.linear(lay.x[i % nx], lay.w16[i % nw]), n_inner=lay.n_inner
    )
    default = bench_graph(lambda i: cuda_mma.linear(*lay.qargs(i)), n_inner=lay.n_inner)
    results = []
    for v, w in itertools.product(VARIANTS, warps):
        err = rel_err(cuda_mma.linear(x0, wp, ws, mul, warps=w, variant=v), ref)
        assert err < 1e-2, (name, m, v, w, err)
        t = bench_graph(
            lambda i, v=v, w=w: cuda_mma.linear(*lay.qargs(i), warps=w, variant=v), n_inner=lay.n_inner
        )
        results.append((t, v, w))
    t, v, w = min(results, key=lambda r: r[0])
    if load_only:
        lo = [
            (
                bench_graph(
                    lambda i, v=v, w=w: cuda_mma.linear(*lay.qargs(i), warps=w, variant=v),
                    n_inner=lay.n_inner,
                ),
                v,
                w,
            )
            for v, w in itertools.product(LOAD_ONLY, warps)
        ]
        print("  load only: " + " ".join(f"{r[0]:.1f}@B{r[1]['MINB']}w{r[2]}" for r in lo))
    vs = ",".join(f"{a}={b}" for a, b in v.items())
    print(f"| {name} | {n}x{k} | {m} | {cub:.1f} | {t:.1f} | {cub / t:.2f}x | {vs} | {w} | {default:.1f} |")
    tags = [f"{r[0]:.1f}@D{r[1]['DEPTH']}X{r[1]['XPRE']}B{r[1]['MINB']}w{r[2]}" for r in results]
    print("  " + " ".join(tags), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,4,8")
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--load-only", action="store_true", help="also time the loads alone (diagnostic)")
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}")
    print("| layer | N x K | M | cuBLAS us | best us | x cuBLAS | variant | warps | default us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, n, k in [s for key in args.models.split(",") for s in SHAPES[key]]:
        for m in [int(v) for v in args.m.split(",")]:
            sweep(name, n, k, m, [int(a) for a in args.warps.split(",")], args.load_only)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
