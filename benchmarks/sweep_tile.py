# ruff: noqa: B023, E501  (lambdas are called at once, inside the loop that binds them)
"""cuda_tile's variant families against the dispatch (without cuda_tile), Humming and cuBLAS bf16.

    PYTHONPATH=src python3 benchmarks/sweep_tile.py [--m 17,24,32,40,48] [--all-shapes] [--humming]
        [--budget-s 300] [--out sweep_tile.json]

1. Correctness: the plans and the swept families against the float64 product of the same packed weight
   (odd N, K not a power of two, M not a multiple of the tile, per-row multipliers, bias, fp16, split K, each
   case twice so the split counters were reset), output poisoned first; tolerance rel L2 1e-2.
2. Timing as bench_kernels.py (CUDA graph over weight copies > 3x the L2, median of 15 replays, the methods'
   replays interleaved): cuBLAS bf16, ``auto`` (the dispatch with Humming and cuda_tile off), Humming (with
   ``--humming``, if ``humming-kernels`` imports; its own re-laid-out copy), ``tile_plan``'s variant and the
   (BM, WG, RT) families for that M at depth 2 (and 1, and twice the K splits, for the first).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_kernels import SHAPES, Layer, bench_graphs_interleaved, make_layer, rel_err

import nvfp4_fix.kernels as K
from nvfp4_fix import settings
from nvfp4_fix.codec import dequantize
from nvfp4_fix.kernels import cuda_tile

EXPERTS = [("Qwen3-30B-A3B expert gate_up", 1536, 2048), ("Qwen3-30B-A3B expert down", 2048, 768)]
TOL = 1e-2

#: (BM, WG, RT) families by the largest M they are timed at
FAMILIES = {
    16: [(16, 2, 2), (32, 2, 1), (32, 2, 2), (32, 1, 2)],
    24: [(24, 1, 2), (16, 2, 2), (32, 2, 1), (32, 1, 2)],
    32: [(32, 2, 1), (32, 2, 2), (32, 1, 2), (64, 2, 1)],
    48: [(48, 2, 1), (48, 1, 2), (64, 2, 1), (32, 2, 1)],
    64: [(64, 2, 1), (64, 2, 2), (64, 1, 1), (48, 1, 2)],
    512: [(64, 2, 1), (64, 2, 2), (128, 2, 1), (128, 1, 1)],
}
CASES = [  # (M, N, K, dtype, variant or None for tile_plan, splits, per-row mul, bias)
    (9, 1000, 384, torch.float16, None, None, True, True),
    (17, 28672, 4096, torch.bfloat16, None, None, False, False),
    (21, 6144, 4096, torch.bfloat16, {"BM": 24, "WG": 1, "RT": 2}, None, True, False),
    (16, 4096, 4096, torch.bfloat16, {"BM": 16, "WG": 2, "RT": 2}, 2, False, False),
    (33, 1544, 1152, torch.bfloat16, {"BM": 32, "WG": 1, "RT": 2}, 2, True, True),
    (45, 4104, 2048, torch.float16, {"BM": 48, "WG": 2, "RT": 1}, 2, False, True),
    (64, 6144, 4096, torch.float16, {"BM": 64, "WG": 2, "RT": 2}, None, False, False),
    (100, 4096, 14336, torch.bfloat16, {"BM": 64, "WG": 2, "RT": 1, "DEPTH": 1}, 4, False, True),
    (100, 2048, 768, torch.bfloat16, {"BM": 48, "WG": 1, "RT": 2}, None, False, False),
    (200, 2048, 768, torch.bfloat16, {"BM": 128, "WG": 2, "RT": 1}, 2, False, False),
    (512, 3000, 1024, torch.float16, {"BM": 128, "WG": 1, "RT": 1, "XST": 3}, None, True, False),
]


def ref64(x, wp, ws, mul, bias=None):
    one = torch.ones((), dtype=torch.float32, device=wp.device)
    w = dequantize(wp, ws, one, "multiplier", torch.float64) * mul.double().view(-1, 1)
    y = x.double() @ w.t()
    return y + bias.double() if bias is not None else y


def check(x, wp, ws, mul, bias=None, **kw):
    y = torch.full((x.shape[0], wp.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    cuda_tile.linear(x, wp, ws, mul, bias, out=y, **kw)
    return rel_err(y, ref64(x, wp, ws, mul, bias))


def correctness(log) -> bool:
    ok = True
    for m, n, k, dt, var, splits, per_row, with_bias in CASES:
        wp, ws, mul = make_layer(n, k)
        if per_row:
            mul = (torch.rand(n, device="cuda") + 0.5) / 2688.0
        bias = torch.randn(n, device="cuda", dtype=dt) if with_bias else None
        x = torch.randn(m, k, dtype=dt, device="cuda")
        try:
            errs = [check(x, wp, ws, mul, bias, variant=var, splits=splits) for _ in range(2)]
        except Exception as e:  # noqa: BLE001
            log(f"  FAILED M={m} N={n} K={k} {dt} {var} splits={splits}: {type(e).__name__}: {e}")
            ok = False
            continue
        good = max(errs) < TOL
        ok &= good
        log(
            f"  {'ok' if good else 'WRONG'} M={m} N={n} K={k} {dt} {var} splits={splits} per_row={per_row} bias={with_bias}: {errs[0]:.2e} / {errs[1]:.2e}"
        )
    return ok


def candidates(m, n, k, sms):
    """(label, variant, K splits): tile_plan's variant, then the families for this M."""
    out = [("plan", cuda_tile.tile_plan(m), None)]
    fams = next(v for top, v in FAMILIES.items() if m <= top)
    for i, (bm, wg, rt) in enumerate(fams):
        var = {"BM": bm, "WG": wg, "RT": rt, "DEPTH": 2}
        s = cuda_tile.splits_for(m, n, k, sms, var)
        out.append((f"BM{bm} WG{wg} RT{rt}", var, s))
        if i == 0:
            out.append((f"BM{bm} WG{wg} RT{rt} D1", {**var, "DEPTH": 1}, s))
            if 2 * s <= k // 128 // 4:
                out.append((f"BM{bm} WG{wg} RT{rt} s{2 * s}", var, 2 * s))
    return out


def timing(m_list, shapes, deadline, log, humming):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for m in m_list:
        for name, n, k in shapes:
            if time.time() > deadline:
                log(f"budget spent: stopped before {name} M={m}")
                return rows
            lay = Layer(n, k, m)
            nw, nx = len(lay.w16), len(lay.x)
            with settings.override(humming=False, cuda_tile=False):
                auto_kernel = K.select_kernel(lay.x[0], n, k)

            def before(i):
                with settings.override(humming=False, cuda_tile=False):
                    return K.nvfp4_linear(*lay.qargs(i))

            calls = {
                "cuBLAS": lambda i: torch.nn.functional.linear(lay.x[i % nx], lay.w16[i % nw]),
                "auto": before,
            }
            if humming:
                from nvfp4_fix.kernels import humming as H

                for wp, ws, mul in lay.q:
                    H.plan_for(wp, ws, mul, torch.bfloat16)
                calls["Humming"] = lambda i: K.nvfp4_linear(*lay.qargs(i), kernel="humming")
            for label, var, s in candidates(m, n, k, sms):
                calls[label] = lambda i, var=var, s=s: cuda_tile.linear(*lay.qargs(i), variant=var, splits=s)
            try:
                ts = bench_graphs_interleaved(list(calls.values()), lay.n_inner)
            except Exception as e:  # noqa: BLE001
                log(f"  {name} M={m}: FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            t = dict(zip(calls, ts, strict=True))
            tile = {key: v for key, v in t.items() if key not in ("cuBLAS", "auto", "Humming")}
            best = min(tile, key=tile.get)
            hum = t.get("Humming", float("nan"))
            rows.append({"name": name, "m": m, "n": n, "k": k, "auto_kernel": auto_kernel, **t, "best": best})
            log(
                f"| {name} | {m} | {t['cuBLAS']:.1f} | {t['auto']:.1f} ({auto_kernel}) | {hum:.1f} | {t['plan']:.1f} | "
                f"{tile[best]:.1f} ({best}) | {t['auto'] / t['plan']:.2f} | {t['auto'] / tile[best]:.2f} |"
            )
            log("    " + " ".join(f"{key}={v:.1f}" for key, v in sorted(tile.items(), key=lambda kv: kv[1])))
            lay = None
            if humming:
                H.clear()
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--m", default="17,24,32,40,48")
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--out", default="sweep_tile.json")
    ap.add_argument("--all-shapes", action="store_true", help="the 8B lm_head and the expert down too")
    ap.add_argument(
        "--humming", action="store_true", help="time Humming too (its first compiles take minutes)"
    )
    args = ap.parse_args()
    t0 = time.time()
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    ok = correctness(log)
    log(f"correctness: {'all passed' if ok else 'FAILURES'} ({time.time() - t0:.0f} s)")
    if not ok:
        return 1  # timing a wrong kernel says nothing
    humming_ok = False
    if args.humming:
        try:
            import humming  # noqa: F401

            humming_ok = True
        except ImportError:
            log("humming-kernels does not import: no Humming column")
    shapes = SHAPES["8b"][:4] + SHAPES["70b"] + EXPERTS[:1]
    if args.all_shapes:
        shapes = SHAPES["8b"] + SHAPES["70b"] + EXPERTS
    log(
        "| layer | M | cuBLAS us | auto us (kernel) | Humming us | plan us | best us (variant) | auto / plan | auto / best |"
    )
    log("|---|---|---|---|---|---|---|---|---|")
    rows = timing([int(v) for v in args.m.split(",")], shapes, t0 + args.budget_s, log, humming_ok)
    with open(args.out, "w") as f:
        json.dump({"correct": ok, "rows": rows}, f, indent=1)
    log(f"(total {time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
