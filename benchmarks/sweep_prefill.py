# ruff: noqa: B023, E501  (lambdas are called at once, inside the loop that binds them)
"""Large-M sweep of the in-kernel-dequantize tl.dot GEMM (`triton_mm`) against cuBLAS bf16 and
dequantize-then-cuBLAS (`dequant_mm`), same card, same run.

    PYTHONPATH=src python benchmarks/sweep_prefill.py [--layers "8B down,70B o"] [--m 2048]

Variants: tile shapes (BM tokens x BN weight rows x BK), warps and stages. Every variant is checked
against the dense float32 product first. Session 5 also tried the weight tile as wgmma's A operand
from registers and Triton's warp specialization of the K loop: see RESULTS.md, "Session 5".
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from bench_kernels import SHAPES, Layer, bench_graph, rel_err

from nvfp4_fix.kernels import triton_ops as T


def variants():
    tiles = ((128, 128, 64), (128, 256, 64), (256, 128, 64), (128, 128, 128), (256, 64, 64))
    for (bm, bn, bk), warps, stages in itertools.product(tiles, (4, 8), (3, 4)):
        if bm * bn >= 256 * 128 and warps == 4:
            continue
        yield {"BM": bm, "BN": bn, "BK": bk, "SPLIT": 1, "num_warps": warps, "num_stages": stages}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="8B qkv,8B down,8B gate_up,70B o")
    ap.add_argument("--m", default="2048")
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()
    shapes = {name: (n, k) for key in SHAPES for name, n, k in SHAPES[key]}
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}",
        flush=True,
    )
    broken: set[str] = set()
    for name in args.layers.split(","):
        n, k = shapes[name]
        for m in [int(v) for v in args.m.split(",")]:
            lay = Layer(n, k, m)
            nw = len(lay.w16)
            cublas = bench_graph(
                lambda i: torch.nn.functional.linear(lay.x[i % len(lay.x)], lay.w16[i % nw]),
                n_inner=lay.n_inner,
            )
            dmm = bench_graph(lambda i: T.dequant_mm(*lay.qargs(i)), n_inner=lay.n_inner)
            ref = torch.nn.functional.linear(lay.x[0].float(), lay.w16[0].float())
            res = []
            for cfg in variants():
                key = repr(sorted(cfg.items()))
                if key in broken:
                    continue
                try:
                    err = rel_err(T.mm(*lay.qargs(0), cfg=cfg), ref)
                    if err > 1e-2:
                        print(f"  WRONG {err:.2e} {cfg}", flush=True)
                        broken.add(key)
                        continue
                    res.append(
                        (bench_graph(lambda i: T.mm(*lay.qargs(i), cfg=cfg), n_inner=lay.n_inner), cfg)
                    )
                except Exception as e:  # compile failures, out of shared memory
                    print(f"  failed {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                    broken.add(key)
            res.sort(key=lambda r: r[0])
            print(
                f"## {name} {n}x{k} M={m}: cuBLAS {cublas:.1f} us, dequant_mm {dmm:.1f} us ({cublas / dmm:.2f}x)",
                flush=True,
            )
            for t, cfg in res[: args.top]:
                print(f"  {t:8.1f} us {cublas / t:.2f}x {cfg}", flush=True)
            lay = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
