# ruff: noqa: B023, E501  (lambdas are called at once, inside the loop that binds them)
"""Sweep of the cuda_mma decode GEMM at M = 1..8 (8B incl. the lm_head, 70B and Qwen3-30B-A3B attention shapes) and 9..64 (NT = ceil(M / 8) mma column tiles of 8 tokens),
against the dispatch's current kernel for that M (the tl.dot GEMM) and cuBLAS bf16, same run.

    PYTHONPATH=src python3 benchmarks/sweep_mma_mid.py [--m 1,16,32,64] [--budget-s 240] [--out sweep.json]

Variants are the (RT, DEPTH, XPRE, MINB) combinations that compile for sm_90 without register
spills (NVRTC --ptxas-options=-v, checked on the CPU), each with 1, 2 or 4 warps side by side over N
(WN, from 9 rows) and 4 or 8 warps a block (2, 4, 8 at M = 1). Every variant is first
checked against the float64 reference of the same packed weight (rel L2 < 1e-2), then timed as
bench_kernels.py times (CUDA graph of 10 calls, cold L2 over weight copies, median of 15 replays).
Prints a markdown table and the winners as CUDA_MMA_TUNED entries for kernels/cuda_mma.py.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_kernels import SHAPES, Layer, bench_graph, rel_err

import nvfp4_fix.kernels as K
from nvfp4_fix.codec import dequantize
from nvfp4_fix.kernels import cuda_mma
from nvfp4_fix.kernels import triton_ops as T

EXPERT_SHAPES = [("Qwen3-30B-A3B expert gate_up", 1536, 2048), ("Qwen3-30B-A3B expert down", 2048, 768)]
#: Qwen3-30B-A3B attention (32 query heads, 4 KV heads of 128, hidden 2048): run by cuda_mma at decode
MOE_ATTENTION_SHAPES = [("Qwen3-30B-A3B qkv", 5120, 2048), ("Qwen3-30B-A3B o", 2048, 4096)]

#: (RT, DEPTH, XPRE, MINB) per NT that compile without spills for sm_90 (bf16)
SPILL_FREE = {
    # M = 1 (the decode GEMV): more rows per block and deeper loads for the small 8B layers
    1: [
        (1, 2, 1, 2),
        (1, 3, 0, 2),
        (1, 4, 0, 2),
        (1, 1, 0, 3),
        (2, 1, 0, 2),
        (2, 2, 0, 1),
        (2, 3, 0, 1),
        (4, 1, 0, 1),
        (4, 2, 0, 1),
    ],
    2: [
        (1, 2, 0, 2),
        (1, 3, 0, 2),
        (1, 1, 0, 2),
        (2, 1, 0, 2),
        (2, 2, 0, 1),
        (2, 3, 0, 1),
        (1, 2, 1, 1),
        (2, 2, 1, 1),
        (4, 1, 0, 1),
    ],
    4: [
        (1, 1, 0, 1),
        (1, 2, 0, 1),
        (1, 3, 0, 1),
        (2, 1, 0, 1),
        (2, 2, 0, 1),
        (2, 3, 0, 1),
        (4, 1, 0, 1),
        (1, 1, 1, 1),
        (2, 1, 1, 1),
    ],
    8: [(1, 1, 0, 1), (1, 2, 0, 1), (1, 3, 0, 1), (2, 1, 0, 1), (2, 2, 0, 1)],
}


#: warps side by side over N (sharing each activation chunk through L1), tried from 9 rows
WN_CHOICES = (1, 2, 4)


def variants(m: int):
    nt = -(-m // 8)
    for rt, depth, xpre, minb in SPILL_FREE[nt]:
        for wn in (1,) if nt == 1 else WN_CHOICES:
            for warps in (2, 4, 8) if nt == 1 else (4, 8):
                yield {"RT": rt, "DEPTH": depth, "XPRE": xpre, "MINB": minb, "LOADONLY": 0, "WN": wn}, warps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--m", default="1,16,32,64")
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--out", default="sweep_mma_mid.json")
    ap.add_argument("--only", default="", help="comma-separated layer-name prefixes, e.g. '8B gate_up,70B'")
    args = ap.parse_args()
    t0 = time.time()
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}", flush=True)
    shapes = SHAPES["8b"] + EXPERT_SHAPES + MOE_ATTENTION_SHAPES + SHAPES["70b"]
    if args.only:
        shapes = [s for s in shapes if any(s[0].startswith(p) for p in args.only.split(","))]
    found = []
    print(
        "| layer | N x K | M | cuBLAS us | tl.dot us | dispatch us | cuda_mma best us | x tl.dot | x cuBLAS | variant | warps |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in (int(v) for v in args.m.split(",")):
        for name, n, k in shapes:
            if m <= 8 and "expert" in name:
                continue  # decode experts run kernels/moe_decode.py or cuda_moe.py, not cuda_mma
            if time.time() - t0 > args.budget_s:
                print(f"budget spent: stopped before {name} M={m}", flush=True)
                break
            lay = Layer(n, k, m)
            x, wp, ws, mul = lay.qargs(0)
            ref = x.double() @ dequantize(wp, ws, mul, "multiplier", torch.float64).t()
            nw, nx = len(lay.w16), len(lay.x)
            t_cublas = bench_graph(
                lambda i: torch.nn.functional.linear(lay.x[i % nx], lay.w16[i % nw]), n_inner=lay.n_inner
            )
            t_tldot = bench_graph(lambda i: T.mm(*lay.qargs(i)), n_inner=lay.n_inner)
            t_dispatch = bench_graph(lambda i: K.nvfp4_linear(*lay.qargs(i)), n_inner=lay.n_inner)
            results = []
            complete = True
            for var, warps in variants(m):
                if time.time() - t0 > args.budget_s:
                    complete = False  # the variants tried so far are reported; apply_mma_sweep skips them
                    break
                try:
                    err = rel_err(cuda_mma.linear(x, wp, ws, mul, warps=warps, variant=var), ref)
                except Exception as e:  # noqa: BLE001 - a variant that does not launch is reported, not fatal
                    print(f"  failed {var} w{warps}: {type(e).__name__}: {e}", flush=True)
                    continue
                if not err < 1e-2:
                    print(f"  WRONG {err:.2e} {var} w{warps}", flush=True)
                    continue
                t = bench_graph(
                    lambda i: cuda_mma.linear(*lay.qargs(i), warps=warps, variant=var), n_inner=lay.n_inner
                )
                results.append((t, var, warps))
            if not results:  # out of budget before the first variant, or none launched (printed above)
                continue
            results.sort(key=lambda r: r[0])
            best_t, best, best_w = results[0]
            tag = "RT={RT} D={DEPTH} X={XPRE} B={MINB} WN={WN}".format(**best)
            print(
                f"| {name} | {n}x{k} | {m} | {t_cublas:.1f} | {t_tldot:.1f} | {t_dispatch:.1f} | {best_t:.1f} | "
                f"{t_tldot / best_t:.2f}x | {t_cublas / best_t:.2f}x | {tag} | {best_w} |",
                flush=True,
            )
            print(
                "  "
                + " ".join(
                    f"{t:.1f}@R{v['RT']}D{v['DEPTH']}X{v['XPRE']}B{v['MINB']}N{v['WN']}w{w}"
                    for t, v, w in results[:12]
                ),
                flush=True,
            )
            found.append(
                {
                    "name": name,
                    "m": m,
                    "n": n,
                    "k": k,
                    "cublas_us": t_cublas,
                    "tldot_us": t_tldot,
                    "dispatch_us": t_dispatch,
                    "best_us": best_t,
                    "best": best,
                    "warps": best_w,
                    "complete": complete,
                    "all": [(t, v, w) for t, v, w in results],
                }
            )
            lay = None
            torch.cuda.empty_cache()
            with open(args.out, "w") as f:
                json.dump(found, f, indent=1)
    print("CUDA_MMA_TUNED = {")
    for v in found:
        b = v["best"]
        var = {key: b[key] for key in ("RT", "DEPTH", "XPRE", "MINB", "WN")}
        print(
            f"    ({v['m']}, {v['n']}, {v['k']}): ({var}, {v['warps']}),  # {v['name']} {v['best_us']:.1f} us, tl.dot {v['tldot_us']:.1f}"
        )
    print("}")
    print(f"(total {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
