# ruff: noqa: B023, E501  (lambdas are called at once, inside the loop that binds them)
"""Sweep of the tl.dot GEMM (`triton_mm`) tiles at M = 32 and 64 (and, with --m, any M), the batch sizes between the BM=16
decode tiles (TUNED_SMALL, M <= 16) and the M=128 tiles (TUNED_MID), where the untuned default
measured 2.7-3.4x slower than Humming on an H100 (benchmarks/RESULTS-kernels-humming.md).

    PYTHONPATH=src python benchmarks/sweep_mid_m.py [--m 32,64] [--budget-s 300] [--out results.json]

Per shape and M: every variant is first checked against the float64 reference of the same packed
weight (rel L2 < 1e-2), then timed as bench_kernels.py times (CUDA graph of 10 calls, cold L2 over
weight copies, median of 15 replays); the current default (``triton_ops.mm_config``) is timed in the
same run, and so is the dispatch's own choice (`nvfp4_linear`, which runs dequantize + cuBLAS from
M = 256). Prints the winners as TUNED_M32 / TUNED_M64 entries for kernels/triton_ops.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from bench_kernels import SHAPES, Layer, bench_graph, rel_err

import nvfp4_fix.kernels as K
from nvfp4_fix.codec import dequantize
from nvfp4_fix.kernels import triton_ops as T

EXPERT_SHAPES = [("Qwen3-30B-A3B expert gate_up", 1536, 2048), ("Qwen3-30B-A3B expert down", 2048, 768)]


def variants(m: int, n: int, k: int):
    bms = (16, 32) if m <= 32 else (32, 64) if m <= 64 else (64, 128)
    tiles = (
        (32, 128, 4),
        (32, 256, 4),
        (64, 128, 4),
        (64, 256, 4),
        (128, 64, 4),
        (128, 64, 8),
        (128, 128, 4),
        (128, 128, 8),
    )
    for bm, (bn, bk, warps) in itertools.product(bms, tiles):
        if bk > k:
            continue
        programs = -(-m // bm) * -(-n // bn)
        base = T._split_for(programs, -(-k // bk), T._sms(torch.device("cuda")), target_waves=2.0)
        for split in sorted({base, base * 2}):
            yield {
                "BM": bm,
                "BN": bn,
                "BK": bk,
                "SPLIT": split,
                "num_warps": warps,
                "num_stages": 3,
                "GROUP_M": 8,
            }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--m", default="32,64")
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--out", default="sweep_mid_m.json")
    ap.add_argument("--only", default="", help="comma-separated name prefixes, e.g. '8B' or '8B,70B o'")
    args = ap.parse_args()
    t0 = time.time()
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    shapes = SHAPES["8b"][:4] + EXPERT_SHAPES + SHAPES["70b"]
    if args.only:
        shapes = [s for s in shapes if any(s[0].startswith(p) for p in args.only.split(","))]
    found: dict[str, dict] = {}
    for m in (int(v) for v in args.m.split(",")):
        for name, n, k in shapes:
            if time.time() - t0 > args.budget_s:
                print(f"budget spent: stopped before {name} M={m}", flush=True)
                break
            lay = Layer(n, k, m, with_bf16=False)
            x, wp, ws, mul = lay.qargs(0)
            ref = x.double() @ dequantize(wp, ws, mul, "multiplier", torch.float64).t()
            default = T.mm_config(m, n, k, x.device)
            t_default = bench_graph(lambda i: T.mm(*lay.qargs(i), cfg=default), n_inner=lay.n_inner)
            t_dispatch = bench_graph(lambda i: K.nvfp4_linear(*lay.qargs(i)), n_inner=lay.n_inner)
            results = []
            for cfg in variants(m, n, k):
                try:
                    y = T.mm(x, wp, ws, mul, cfg=cfg)
                    err = rel_err(y, ref)
                    if err > 1e-2:
                        print(f"  WRONG {err:.2e} {cfg}", flush=True)
                        continue
                    results.append(
                        (bench_graph(lambda i: T.mm(*lay.qargs(i), cfg=cfg), n_inner=lay.n_inner), cfg)
                    )
                except Exception as e:  # out of shared memory / registers for this tile
                    print(f"  failed {cfg}: {type(e).__name__}", flush=True)
            results.sort(key=lambda r: r[0])
            best_t, best = results[0]
            print(
                f"{name:32s} M={m:4d} dispatch {t_dispatch:7.1f} us  default tl.dot {t_default:7.1f} us  best {best_t:7.1f} us "
                f"({t_default / best_t:.2f}x) {best}  [{len(results)} variants, {time.time() - t0:.0f} s]",
                flush=True,
            )
            found[f"{m}:{n}x{k}"] = {
                "name": name,
                "m": m,
                "n": n,
                "k": k,
                "default_us": t_default,
                "dispatch_us": t_dispatch,
                "default": default,
                "best_us": best_t,
                "best": best,
                "top3": [(t, c) for t, c in results[:3]],
            }
            lay = None
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(found, f, indent=1)
    for m in sorted({v["m"] for v in found.values()}):
        print(f"TUNED_M{m} = {{")
        for v in found.values():
            if v["m"] == m:
                cfg = {key: val for key, val in v["best"].items() if key != "GROUP_M"}
                print(
                    f"    ({v['n']}, {v['k']}): {cfg},  # {v['name']}: {v['best_us']:.1f} us (default {v['default_us']:.1f})"
                )
        print("}")
    print(f"(total {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
