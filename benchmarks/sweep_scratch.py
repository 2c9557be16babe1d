# ruff: noqa: B023, E501  (lambdas are called at once, inside the loop that binds them)
"""Prefill (dequantize-then-cuBLAS) against cuBLAS bf16 for several scratch sizes.

    PYTHONPATH=src python benchmarks/sweep_scratch.py [--models 8b,70b] [--m 512,2048] [--mb 8,16,32,256]

A scratch chunk small enough to stay in the 50 MB L2 is written by the dequantize kernel and read back
by cuBLAS without a round trip to memory; a chunk too small leaves cuBLAS too few tiles per call.
cuBLAS is timed before and after each layer's sweep (same graph-replay method as bench_kernels.py)
so its own drift shows in the table.
"""

from __future__ import annotations

import argparse

import torch
import triton
from bench_kernels import SHAPES, Layer, bench_graph, rel_err

from nvfp4_fix.kernels import triton_ops as T


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--m", default="512,2048")
    ap.add_argument("--mb", default="8,12,16,24,32,48,64,256")
    args = ap.parse_args()
    sizes = [int(v) for v in args.mb.split(",")]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(
        "| layer | N x K | M | cuBLAS us (before/after) | "
        + " | ".join(f"{s} MB" for s in sizes)
        + " | best x cuBLAS |"
    )
    print("|" + "---|" * (5 + len(sizes)))
    for name, n, k in [s for key in args.models.split(",") for s in SHAPES[key]]:
        for m in [int(v) for v in args.m.split(",")]:
            lay = Layer(n, k, m)
            nw = len(lay.w16)

            def cublas():
                return bench_graph(
                    lambda i: torch.nn.functional.linear(lay.x[i % len(lay.x)], lay.w16[i % nw]),
                    n_inner=lay.n_inner,
                )

            before = cublas()
            ref = torch.nn.functional.linear(lay.x[0].float(), lay.w16[0].float())
            times = []
            for mb in sizes:
                nbytes = mb << 20
                err = rel_err(T.dequant_mm(*lay.qargs(0), scratch_bytes=nbytes), ref)
                if err > 1e-2:
                    raise SystemExit(f"{name} M={m} scratch {mb} MB: rel err {err:.2e}")
                times.append(
                    bench_graph(
                        lambda i: T.dequant_mm(*lay.qargs(i), scratch_bytes=nbytes), n_inner=lay.n_inner
                    )
                )
            after = cublas()
            base = min(before, after)
            cells = " | ".join(f"{t:.1f}" for t in times)
            print(
                f"| {name} | {n}x{k} | {m} | {before:.1f} / {after:.1f} | {cells} | {base / min(times):.2f}x |",
                flush=True,
            )
            lay = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
