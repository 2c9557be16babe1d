# ruff: noqa: B023, E501  (lambdas are called at once, inside the loop that binds them)
"""cuda_wgmma (the sm_90a wgmma GEMM) against the dispatch, Humming and cuBLAS bf16 from 9 to 512 token rows.

    PYTHONPATH=src python3 benchmarks/sweep_wgmma.py [--m 16,32,64,128,256,512] [--budget-s 300] [--out sweep_wgmma.json]

1. Which descriptor byte offsets (LBO / SBO) the card reads as written (both tried, on random data).
2. Correctness: every plan and variant family against the float64 product of the same packed weight
   (odd N, K not a power of two, M not a multiple of the tile, per-row multipliers, bias, fp16, split K),
   output poisoned first; tolerance rel L2 1e-2.
3. Timing as bench_kernels.py (CUDA graph over weight copies > 3x the L2, median of 15 replays, the methods'
   replays interleaved): cuBLAS bf16, ``auto`` (the dispatch, Humming off), Humming (if
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


def correctness(desc, log) -> set[int]:
    """The KINDs whose every case passed."""
    failed = set()
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
        (16, 4096, 4096, torch.bfloat16, {"KIND": 1, "BM": 16, "WG": 2, "RT": 2}, 2, False, False),
        (9, 1000, 384, torch.float16, {"KIND": 1, "BM": 32, "WG": 2, "RT": 1}, None, True, True),
        (33, 1544, 1152, torch.bfloat16, {"KIND": 1, "BM": 32, "WG": 1, "RT": 2}, 2, True, True),
        (64, 6144, 4096, torch.float16, {"KIND": 1, "BM": 64, "WG": 2, "RT": 2}, None, False, False),
        (
            100,
            4096,
            14336,
            torch.bfloat16,
            {"KIND": 1, "BM": 64, "WG": 2, "RT": 1, "DEPTH": 1},
            4,
            False,
            True,
        ),
        (200, 2048, 768, torch.bfloat16, {"KIND": 1, "BM": 128, "WG": 2, "RT": 1}, 2, False, False),
        (21, 6144, 4096, torch.bfloat16, {"KIND": 1, "BM": 24, "WG": 1, "RT": 2}, None, True, False),
        (45, 4104, 2048, torch.float16, {"KIND": 1, "BM": 48, "WG": 2, "RT": 1}, 2, False, True),
        (100, 2048, 768, torch.bfloat16, {"KIND": 1, "BM": 48, "WG": 1, "RT": 2}, None, False, False),
        (
            512,
            3000,
            1024,
            torch.float16,
            {"KIND": 1, "BM": 128, "WG": 1, "RT": 1, "XST": 3},
            None,
            True,
            False,
        ),
    ]
    for m, n, k, dt, var, splits, per_row, with_bias in cases:
        wp, ws, mul = make_layer(n, k)
        if per_row:
            mul = (torch.rand(n, device="cuda") + 0.5) / 2688.0
        bias = torch.randn(n, device="cuda", dtype=dt) if with_bias else None
        x = torch.randn(m, k, dtype=dt, device="cuda")
        v = {**desc, **(var or {})}
        kind = v.get("KIND", 0)
        try:
            err = check(x, wp, ws, mul, bias, variant=v, splits=splits)
            again = check(x, wp, ws, mul, bias, variant=v, splits=splits)  # the counters were reset
        except Exception as e:  # noqa: BLE001
            log(f"  FAILED M={m} N={n} K={k} {dt} {var} splits={splits}: {type(e).__name__}: {e}")
            failed.add(kind)
            continue
        good = err < TOL and again < TOL
        if not good:
            failed.add(kind)
        log(
            f"  {'ok' if good else 'WRONG'} M={m} N={n} K={k} {dt} {var} splits={splits} per_row={per_row} bias={with_bias}: {err:.2e} / {again:.2e}"
        )
    return {0, 1} - failed


def old_auto(*args):
    """The dispatch with Humming off (it never picks cuda_wgmma)."""
    with settings.override(humming=False):
        return K.nvfp4_linear(*args)


#: the mma.sync kernel's (BM, WG, RT) families per M range
MMA_FAMILIES = {
    16: [(16, 2, 2), (32, 2, 1), (32, 2, 2), (32, 1, 2)],
    24: [(24, 1, 2), (16, 2, 2), (32, 2, 1), (32, 1, 2)],
    32: [(32, 2, 1), (32, 2, 2), (32, 1, 2), (64, 2, 1)],
    48: [(48, 2, 1), (48, 1, 2), (64, 2, 1), (32, 2, 1)],
    64: [(64, 2, 1), (64, 2, 2), (64, 1, 1), (32, 2, 2)],
    512: [(64, 2, 1), (64, 2, 2), (128, 2, 1), (128, 1, 1)],
}


def candidates(m, n, k, sms, desc, kinds):
    """(label, variant, K splits) of the KINDs that passed: the wgmma plan, then the mma.sync kernel's
    families at depth 2 (and 1 for the first), each with the split count splits_for gives it, the first
    also with twice that."""
    out = []
    if 0 in kinds:
        plan, splits = cuda_wgmma.plan_for(m, n, k, sms)
        out.append(("wgmma", {**desc, **plan, "KIND": 0}, splits))
    if 1 not in kinds:
        return out
    fams = next(v for top, v in MMA_FAMILIES.items() if m <= top)
    for i, (bm, wg, rt) in enumerate(fams):
        var = {"KIND": 1, "BM": bm, "WG": wg, "RT": rt, "DEPTH": 2}
        s = cuda_wgmma.splits_for(m, n, k, sms, var)
        out.append((f"mma BM{bm} WG{wg} RT{rt}", var, s))
        if i == 0:
            out.append((f"mma BM{bm} WG{wg} RT{rt} D1", {**var, "DEPTH": 1}, s))
            if 2 * s <= k // 128 // 4:
                out.append((f"mma BM{bm} WG{wg} RT{rt} s{2 * s}", var, 2 * s))
    return out


DIAG = {
    "plan": {},
    "late loads": {"LATE_LOADS": 1},
    "no proxy fence": {"PROXY_FENCE": 0},
    "no wgmma": {"WGMMA_OFF": 1},
    "no wgmma, no proxy fence": {"WGMMA_OFF": 1, "PROXY_FENCE": 0},
    "no wgmma, late loads": {"WGMMA_OFF": 1, "LATE_LOADS": 1},
}


def diagnose(desc, log):
    """Where a chunk's time goes: the plan against itself without the proxy fence, without the tensor work,
    with the global loads after the fences (timing only; these variants' results are not used)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    log("| layer | M | " + " | ".join(f"{k} us" for k in DIAG) + " | us per chunk (plan) |")
    log("|---|---|" + "---|" * len(DIAG) + "---|")
    for name, n, k in (SHAPES["8b"][1], SHAPES["8b"][2]):
        for m in (16, 128):
            lay = Layer(n, k, m, with_bf16=False)
            plan, splits = cuda_wgmma.plan_for(m, n, k, sms)
            calls = [lambda i, v={**desc, **plan, **d}: cuda_wgmma.linear(*lay.qargs(i), variant=v, splits=splits)
                     for d in DIAG.values()]  # fmt: skip
            try:
                ts = bench_graphs_interleaved(calls, lay.n_inner)
            except Exception as e:  # noqa: BLE001
                log(f"  {name} M={m}: FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            ctas = -(-m // plan["BM"]) * -(-n // (64 * plan["WG"])) * splits
            waves = -(-ctas // sms)  # one block per SM (registers)
            per_chunk = ts[0] / (waves * (k // 128 // splits))
            log(f"| {name} | {m} | " + " | ".join(f"{t:.1f}" for t in ts) + f" | {per_chunk:.2f} |")
            lay = None
            torch.cuda.empty_cache()


def timing(m_list, desc, deadline, log, humming, kinds, all_shapes=False):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    shapes = SHAPES["8b"][:4] + SHAPES["70b"] + EXPERT
    if all_shapes:
        shapes = SHAPES["8b"] + SHAPES["70b"] + EXPERT + [("Qwen3-30B-A3B expert down", 2048, 768)]
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
            for label, var, s in candidates(m, n, k, sms, desc, kinds):
                calls[label] = lambda i, var=var, s=s: cuda_wgmma.linear(*lay.qargs(i), variant=var, splits=s)
            with settings.override(humming=False):
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
                f"| {name} | {m} | {t['cuBLAS']:.1f} | {t['auto']:.1f} ({auto_kernel}) | {hum:.1f} | {t.get('wgmma', float('nan')):.1f} | "
                f"{wg[best]:.1f} ({best}) | {t['cuBLAS'] / wg[best]:.2f}x | {hum / wg[best]:.2f} | {t['auto'] / wg[best]:.2f} |"
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
    ap.add_argument("--diag", action="store_true", help="time the wgmma kernel's diagnostic variants first")
    ap.add_argument("--kinds", default="0,1", help="the KINDs to time (0: wgmma, 1: mma.sync)")
    ap.add_argument("--all-shapes", action="store_true", help="add the 8B lm_head and the expert down shape")
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
    kinds = correctness(desc, log) & {int(v) for v in args.kinds.split(",")}
    log(f"correctness: KINDs passing {sorted(kinds)} ({time.time() - t0:.0f} s)")
    if not kinds:
        return 1  # timing a wrong kernel says nothing
    if args.diag and 0 in kinds:
        diagnose(desc, log)
    humming_ok = False
    if args.humming:
        try:
            import humming  # noqa: F401

            humming_ok = True
        except ImportError:
            log("humming-kernels does not import: no Humming column")
    log(
        "| layer | M | cuBLAS us | auto us (kernel) | Humming us | wgmma plan us | best us (variant) | cuBLAS / best | Humming / best | auto / best |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|")
    rows = timing(
        [int(v) for v in args.m.split(",")], desc, t0 + args.budget_s, log, humming_ok, kinds, args.all_shapes
    )
    with open(args.out, "w") as f:
        json.dump({"desc": desc, "kinds_correct": sorted(kinds), "rows": rows}, f, indent=1)
    log(f"(total {time.time() - t0:.0f} s)")
    return 0 if kinds else 1


if __name__ == "__main__":
    raise SystemExit(main())
