# ruff: noqa: B023, E501  (lambdas are called at once, inside the loop that binds them)
"""The dispatch with and without ``cuda_tile`` on the layers it takes (issue 18), same run, cold L2.

    PYTHONPATH=src python3 benchmarks/bench_tile_dispatch.py [--m 16,17,24,32,40,48,49,64]

Per layer and M: what ``auto`` runs now and before (``settings.cuda_tile`` off), their times (CUDA graph over
weight copies > 3x the L2, median of 15 replays, interleaved, as bench_kernels.py), cuBLAS bf16, and the
relative error of the new choice against the float64 product.
"""

from __future__ import annotations

import argparse

import torch
from bench_kernels import SHAPES, Layer, bench_graphs_interleaved, rel_err

import nvfp4_fix.kernels as K
from nvfp4_fix import settings
from nvfp4_fix.codec import dequantize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--m", default="16,17,24,32,40,48,49,64")
    args = ap.parse_args()
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(
        "| layer | M | auto now (kernel) us | auto before (kernel) us | cuBLAS us | before / now | rel err now |"
    )
    print("|---|---|---|---|---|---|---|")
    shapes = [s for s in SHAPES["8b"] + SHAPES["70b"] if s[1] >= 16384]
    for name, n, k in shapes:
        for m in (int(v) for v in args.m.split(",")):
            lay = Layer(n, k, m)
            nw, nx = len(lay.w16), len(lay.x)
            with settings.override(humming=False):
                now = K.select_kernel(lay.x[0], n, k)
                with settings.override(cuda_tile=False):
                    before = K.select_kernel(lay.x[0], n, k)

                def old(i):
                    with settings.override(cuda_tile=False):
                        return K.nvfp4_linear(*lay.qargs(i))

                calls = [
                    lambda i: K.nvfp4_linear(*lay.qargs(i)),
                    old,
                    lambda i: torch.nn.functional.linear(lay.x[i % nx], lay.w16[i % nw]),
                ]
                t_now, t_before, t_cublas = bench_graphs_interleaved(calls, lay.n_inner)
                x, wp, ws, mul = lay.qargs(0)
                ref = x.double() @ dequantize(wp, ws, mul, "multiplier", torch.float64).t()
                err = rel_err(K.nvfp4_linear(x, wp, ws, mul), ref)
            print(
                f"| {name} | {m} | {t_now:.1f} ({now}) | {t_before:.1f} ({before}) | {t_cublas:.1f} | "
                f"{t_before / t_now:.2f} | {err:.1e} |",
                flush=True,
            )
            lay = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
