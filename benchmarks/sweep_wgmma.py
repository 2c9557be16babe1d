# ruff: noqa: B023, E501  (lambdas are called at once, inside the loop that binds them)
"""cuda_wgmma (the sm_90a wgmma GEMM) against the dispatch, Humming and cuBLAS bf16 from 9 to 512 token rows.

    PYTHONPATH=src python3 benchmarks/sweep_wgmma.py [--m 16,32,64,128,256,512] [--budget-s 300] [--out sweep_wgmma.json]

1. Which descriptor byte offsets (LBO / SBO) the card reads as written (both tried, on random data).
2. Correctness: every plan and variant family against the float64 product of the same packed weight
   (odd N, K not a power of two, M not a multiple of the tile, per-row multipliers, bias, fp16, split K),
   output poisoned first; tolerance rel L2 1e-2.
3. Timing as bench_kernels.py (CUDA graph over weight copies > 3x the L2, median of 15 replays, the methods'
   replays interleaved): cuBLAS bf16, ``auto`` (the dispatch without cuda_wgmma, Humming off), Humming (if
   ``--humming`` and ``humming-kernels`` imports; its own re-laid-out copy) and cuda_wgmma's plan and variants.
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
from nvfp4_fix.kernels import cuda_wgmma

EXPERT = [("Qwen3-30B-A3B expert gate_up", 1536, 2048)]
TOL = 1e-2


def ref64(x, wp, ws, mul, bias=None):
    one = torch.ones((), dtype=torch.float32, device=wp.device)
    w = dequantize(wp, ws, one, "multiplier", torch.float64) * mul.double().view(-1, 1)
    y = x.double() @ w.t()
    return y + bias.double() if bias is not None else y


def check(x, wp, ws, mul, bias=None, **kw):
    y = torch.full((x.shape[0], wp.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    cuda_wgmma.linear(x, wp, ws, mul, bias, out=y, **kw)
    return rel_err(y, ref64(x, wp, ws, mul, bias))


def descriptor(log) -> dict[str, int]:
    wp, ws, mul = make_layer(256, 512)
    x = torch.randn(64, 512, dtype=torch.bfloat16, device="cuda")
    found = None
    for lbo, sbo in ((128, 256), (256, 128)):
        var = {"DESC_LBO": lbo, "DESC_SBO": sbo, "BM": 64, "WG": 1}
        try:
            err = check(x, wp, ws, mul, variant=var, splits=1)
        except Exception as e:  # noqa: BLE001
            log(f"descriptor LBO={lbo} SBO={sbo}: FAILED {type(e).__name__}: {e}")
            continue
        log(f"descriptor LBO={lbo} SBO={sbo}: rel err {err:.3e}")
        if err < TOL and found is None:
            found = {"DESC_LBO": lbo, "DESC_SBO": sbo}
    return found


def correctness(desc, log) -> bool:
    ok = True
    cases = [  # (M, N, K, dtype, variant, splits, per-row mul, bias)
        (64, 256, 512, torch.bfloat16, {"BM": 64, "WG": 2}, 1, False, False),
        (9, 1000, 384, torch.bfloat16, None, None, False, False),
        (16, 4096, 4096, torch.bfloat16, None, None, False, False),
        (33, 1544, 1152, torch.float16, None, None, True, True),
        (64, 6144, 4096, torch.bfloat16, None, None, False, False),
        (100, 4096, 14336, torch.bfloat16, None, None, True, False),
        (128, 520, 2048, torch.float16, {"BM": 128, "WG": 2}, 4, False, True),
        (200, 2048, 768, torch.bfloat16, {"BM": 64, "WG": 1, "DEPTH": 3}, 2, False, False),
        (256, 8192, 8192, torch.bfloat16, None, None, False, False),
        (300, 3000, 1024, torch.float16, {"BM": 128, "WG": 2, "DEPTH": 1}, 3, True, True),
        (512, 4096, 4096, torch.bfloat16, None, None, False, False),
        (17, 28672, 4096, torch.bfloat16, {"BM": 32, "WG": 2}, None, False, False),
        (40, 2048, 4096, torch.bfloat16, {"BM": 64, "WG": 1}, 8, False, False),
    ]
    for m, n, k, dt, var, splits, per_row, with_bias in cases:
        wp, ws, mul = make_layer(n, k)
        if per_row:
            mul = (torch.rand(n, device="cuda") + 0.5) / 2688.0
        bias = torch.randn(n, device="cuda", dtype=dt) if with_bias else None
        x = torch.randn(m, k, dtype=dt, device="cuda")
        v = {**desc, **(var or {})}
        try:
            err = check(x, wp, ws, mul, bias, variant=v, splits=splits)
            again = check(x, wp, ws, mul, bias, variant=v, splits=splits)  # the counters were reset
        except Exception as e:  # noqa: BLE001
            log(f"  FAILED M={m} N={n} K={k} {dt} {var} splits={splits}: {type(e).__name__}: {e}")
            ok = False
            continue
        good = err < TOL and again < TOL
        ok &= good
        log(
            f"  {'ok' if good else 'WRONG'} M={m} N={n} K={k} {dt} {var} splits={splits} per_row={per_row} bias={with_bias}: {err:.2e} / {again:.2e}"
        )
    return ok


def old_auto(*args):
    """The dispatch without cuda_wgmma (and Humming off): the kernels it replaces."""
    with settings.override(humming=False, cuda_wgmma=False):
        return K.nvfp4_linear(*args)


def candidates(m, n, k, sms, desc):
    plan, splits = cuda_wgmma.plan_for(m, n, k, sms)
    out = [("plan", {**desc, **plan}, splits)]
    bms = (32, 64) if m <= 32 else (64, 128)
    for bm in bms:
        for wg in (1, 2) if bm <= 64 else (2,):  # one warpgroup holding 128 rows' activations spills
            for depth in (1, 2, 3):
                var = {**desc, "BM": bm, "WG": wg, "DEPTH": depth}
                if (bm, wg, depth) == (plan["BM"], plan["WG"], 2):
                    continue
                _, s = cuda_wgmma.plan_for(m, n, k, sms)
                out.append((f"BM{bm} WG{wg} D{depth}", var, s))
    for s in {max(1, splits // 2), splits * 2}:
        if s != splits and s <= k // 128 // 4:
            out.append((f"plan s{s}", {**desc, **plan}, s))
    return out


def timing(m_list, desc, deadline, log, humming):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    shapes = SHAPES["8b"][:4] + SHAPES["70b"] + EXPERT
    for m in m_list:
        for name, n, k in shapes:
            if time.time() > deadline:
                log(f"budget spent: stopped before {name} M={m}")
                return rows
            lay = Layer(n, k, m)
            nw, nx = len(lay.w16), len(lay.x)
            calls = {
                "cuBLAS": lambda i: torch.nn.functional.linear(lay.x[i % nx], lay.w16[i % nw]),
                "auto": lambda i: old_auto(*lay.qargs(i)),
            }
            if humming:
                from nvfp4_fix.kernels import humming as H

                for wp, ws, mul in lay.q:
                    H.plan_for(wp, ws, mul, torch.bfloat16)
                calls["Humming"] = lambda i: K.nvfp4_linear(*lay.qargs(i), kernel="humming")
            for label, var, s in candidates(m, n, k, sms, desc):
                calls[label] = lambda i, var=var, s=s: cuda_wgmma.linear(*lay.qargs(i), variant=var, splits=s)
            with settings.override(humming=False, cuda_wgmma=False):
                auto_kernel = K.select_kernel(lay.x[0], n, k)
                try:
                    ts = bench_graphs_interleaved(list(calls.values()), lay.n_inner)
                except Exception as e:  # noqa: BLE001
                    log(f"  {name} M={m}: FAILED {type(e).__name__}: {str(e)[:300]}")
                    continue
            t = dict(zip(calls, ts, strict=True))
            wg = {key: v for key, v in t.items() if key not in ("cuBLAS", "auto", "Humming")}
            best = min(wg, key=wg.get)
            hum = t.get("Humming", float("nan"))
            row = {"name": name, "m": m, "n": n, "k": k, "auto_kernel": auto_kernel, **t, "best": best}
            rows.append(row)
            log(
                f"| {name} | {m} | {t['cuBLAS']:.1f} | {t['auto']:.1f} ({auto_kernel}) | {hum:.1f} | {t['plan']:.1f} | "
                f"{wg[best]:.1f} ({best}) | {t['cuBLAS'] / t['plan']:.2f}x | {hum / t['plan']:.2f} | {t['auto'] / t['plan']:.2f} |"
            )
            log("    " + " ".join(f"{key}={v:.1f}" for key, v in sorted(wg.items(), key=lambda kv: kv[1])))
            lay = None
            if humming:
                H.clear()
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--m", default="16,32,64,128,256,512")
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--out", default="sweep_wgmma.json")
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
    desc = descriptor(log)
    if desc is None:
        log("no descriptor layout gives the right product: stopping")
        return 1
    log(f"descriptor: {desc}")
    ok = correctness(desc, log)
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
    log(
        "| layer | M | cuBLAS us | auto us (kernel) | Humming us | wgmma plan us | wgmma best us | plan x cuBLAS | Humming / plan | auto / plan |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|")
    rows = timing([int(v) for v in args.m.split(",")], desc, t0 + args.budget_s, log, humming_ok)
    with open(args.out, "w") as f:
        json.dump({"desc": desc, "correct": ok, "rows": rows}, f, indent=1)
    log(f"(total {time.time() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
