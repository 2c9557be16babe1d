# ruff: noqa: B023, E501  (lambdas are called at once, inside the loop that binds them)
"""This package's NVFP4 dispatch against Humming, cuBLAS bf16 and dequantize-then-matmul, side by side.

    pip install humming-kernels==0.1.20   # (cuda-bindings, jinja2, filelock come with a CUDA image)
    PYTHONPATH=src python benchmarks/bench_humming.py [--m 1,2,...] [--out DIR] [--reps 10] [--budget-s 330]
        [--shapes expert,70B]

One run, one card: first correctness of every backend against a float64 decoding of the weight (odd N,
K not a multiple of 128, bf16 and fp16, memory poisoned with NaN first), then the transformed copy
Humming keeps (bytes resident and the peak while building, against the checkpoint's bytes), then the
timing table. Timing: each method captured in a CUDA graph as back-to-back calls over all its weight
copies, which together exceed 4x the L2 (at least 10 calls; bench_kernels.py's _capture: warmed, replayed
30 ms before timing), median of ``--reps`` replays, so every call reads its weights from HBM. (Until
session 14 a graph held 10 calls: the Qwen3-30B-A3B expert shapes then cycled through 17 / 9 MB that the
L2 holds, and ``ours`` read the copies ``dq+mm`` had just read.)
Columns: ``ours`` = ``kernels.nvfp4_linear`` with Humming off (this package's kernels), ``humming`` =
Humming alone, ``auto`` and ``auto+H`` = the package as a model runs it: an ``NVFP4Linear`` holding the
weight (its own copy), called with the default settings (Humming off) and with ``settings.humming`` on
(kernels/table.py decides, falling back per weight), ``cublas`` = bf16 x @ W.T with the dense weight
resident, ``dq+mm`` = our Triton dequantization of the whole weight into bf16 then cuBLAS, every call.
``--budget-s``: shapes whose timing would start past it, and the correctness pass, are skipped (logged).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
from bench_kernels import bench_graphs_interleaved, make_layer

import nvfp4_fix.kernels as K
from nvfp4_fix import settings
from nvfp4_fix.codec import E2M1_VALUES
from nvfp4_fix.kernels import humming as H
from nvfp4_fix.kernels import table as TB
from nvfp4_fix.layer import NVFP4Linear

SHAPES = [
    ("8B qkv (fused)", 6144, 4096),
    ("8B o", 4096, 4096),
    ("8B gate_up (fused)", 28672, 4096),
    ("8B down", 4096, 14336),
    ("8B lm_head", 128256, 4096),
    ("70B qkv (fused)", 10240, 8192),
    ("70B o", 8192, 8192),
    ("70B gate_up (fused)", 57344, 8192),
    ("70B down", 8192, 28672),
    ("Qwen3-30B-A3B expert gate_up", 1536, 2048),
    ("Qwen3-30B-A3B expert down", 2048, 768),
]
M_ALL = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
METHODS = ("ours", "humming", "auto", "auto+H", "cublas", "dq+mm")
LAYER_SETTINGS = {"auto": {"humming": False}, "auto+H": {"humming": True}}


def as_layer(wp, ws, mul):
    """An NVFP4Linear (compressed-tensors names) holding its own copy of this weight."""
    n, k = wp.shape[0], 2 * wp.shape[1]
    layer = NVFP4Linear(k, n, device="meta")
    sd = {
        "weight_packed": wp.clone(),
        "weight_scale": ws.clone(),
        "weight_global_scale": (1.0 / mul).reshape(1),
    }
    layer.load_state_dict(sd, assign=True)
    return layer


def picked(kernel, layer):
    """What ran for this layer: the selection, or the fallback where Humming refused its weight."""
    if kernel != "humming":
        return kernel
    plan = H.plan_for(layer.weight_packed, layer.weight_scale, layer.weight_mul, torch.bfloat16)
    return "humming" if isinstance(plan, H.Plan) else "ours (Humming refused)"


def prepare_humming(layer, dtype):
    """Build the layer's Humming plan now (never during a capture), as its first eager call would."""
    H.plan_for(layer.weight_packed, layer.weight_scale, layer.weight_mul, dtype)


def ref_f64(x, wp, ws, mul):
    tab = torch.tensor(E2M1_VALUES, dtype=torch.float64, device=wp.device)
    codes = torch.stack((wp & 15, wp >> 4), dim=-1).reshape(wp.shape[0], -1).long()
    w = tab[codes] * ws.to(torch.float64).repeat_interleave(16, dim=1) * mul.double()
    return x.double() @ w.T


def poison():
    """Fill the caching allocator's free memory with NaN so an output a kernel leaves unwritten shows."""
    free = torch.cuda.mem_get_info()[0]
    blob = torch.full((int(free * 0.25) // 2,), float("nan"), dtype=torch.bfloat16, device="cuda")
    del blob


def correctness(log):
    both = (torch.bfloat16, torch.float16)
    cases = [(m, n, k, (torch.bfloat16,)) for (_, n, k) in SHAPES for m in (1, 16, 300)]
    cases += [(m, n, k, both) for m in (1, 64) for (n, k) in ((4096, 4096), (28672, 4096))]
    # odd N, K not a multiple of 128
    cases += [(m, 1000, 1520, both) for m in (1, 7, 64, 300)] + [(m, 333, 2064, both) for m in (3, 129)]
    worst = {}
    for m, n, k, dtypes in cases:
        wp, ws, mul = make_layer(n, k)
        layer = as_layer(wp, ws, mul)
        for dtype in dtypes:
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            ref = ref_f64(x, wp, ws, mul)
            for name in METHODS:
                if name == "humming" and (reason := H.shape_refusal(n, k)) is not None:
                    log(f"  humming {m}x{n}x{k} {dtype}: refused up front ({reason})")
                    continue
                poison()
                try:
                    y = run_method(name, x, wp, ws, mul, None, layer)
                except Exception as err:
                    log(f"  {name} {m}x{n}x{k} {dtype}: FAILED {type(err).__name__}: {str(err)[:200]}")
                    worst[name] = float("inf")
                    continue
                err = (
                    float((y.double() - ref).norm() / ref.norm()) if torch.isfinite(y).all() else float("inf")
                )
                y.fill_(float("nan"))  # the next method's output likely lands in this block
                del y
                worst[name] = max(worst.get(name, 0.0), err)
                if not err < 1e-2:
                    log(f"  {name} {m}x{n}x{k} {dtype}: rel err {err:.3e} (tolerance 1e-2)")
        del wp, ws, mul, layer
        H.clear()
    torch.cuda.empty_cache()
    log(
        f"correctness, {len(cases)} cases (bf16; fp16 on 10 of them), worst relative error vs float64 (tolerance 1e-2): "
        + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
    )
    return worst


def run_method(name, x, wp, ws, mul, w16, layer=None):
    if name == "ours":
        with settings.override(humming=False):
            return K.nvfp4_linear(x, wp, ws, mul)
    if name == "humming":
        return K.nvfp4_linear(x, wp, ws, mul, kernel="humming")
    if name in LAYER_SETTINGS:
        with settings.override(**LAYER_SETTINGS[name]):
            return layer(x)
    if name == "cublas":
        w16 = K.dequantize_weight(wp, ws, mul, x.dtype) if w16 is None else w16
        return x @ w16.T
    if name == "dq+mm":
        return x @ K.dequantize_weight(wp, ws, mul, x.dtype).T
    raise ValueError(name)


def memory(log):
    rows = []
    for label, n, k in SHAPES:
        wp, ws, mul = make_layer(n, k)
        ckpt = wp.numel() + ws.numel()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        plan = H.plan_for(wp, ws, mul, torch.bfloat16)
        torch.cuda.synchronize()
        if isinstance(plan, str):
            log(f"  {label}: Humming refused: {plan}")
            continue
        resident = torch.cuda.memory_allocated() - before
        peak = torch.cuda.max_memory_allocated() - before
        rows.append((label, n, k, ckpt, plan.resident_bytes, resident, peak))
        del plan
        H.clear()
        del wp, ws, mul
    log("\nHumming's transformed copy (bf16 plan) against the checkpoint's bytes (codes + e4m3 scales):")
    log(
        "| layer | N x K | checkpoint MiB | Humming tensors MiB | resident after build MiB | peak during build MiB |"
    )
    log("|---|---|---|---|---|---|")
    for label, n, k, ckpt, held, res, peak in rows:
        mib = 2**20
        log(
            f"| {label} | {n}x{k} | {ckpt / mib:.1f} | {held / mib:.1f} ({held / ckpt:.3f}x) | {res / mib:.1f} ({res / ckpt:.3f}x) | {peak / mib:.1f} ({peak / ckpt:.3f}x) |"
        )
    return rows


def timing(m_list, reps, log, deadline):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    results = []
    for label, n, k in SHAPES:
        if time.time() > deadline:
            log(f"# {label}: skipped (--budget-s spent)")
            continue
        qbytes = n * k * 9 // 16
        copies = max(1, min(256, math.ceil(4.5 * l2 / qbytes)))
        q = [make_layer(n, k) for _ in range(copies)]
        layers = [as_layer(*c) for c in q]
        w16_0 = K.dequantize_weight(*q[0], torch.bfloat16)
        c16 = max(1, min(64, math.ceil(4.5 * l2 / (n * k * 2))))
        w16 = [w16_0] + [w16_0.clone() for _ in range(c16 - 1)]
        n_inner = max(10, copies, c16)
        t0 = time.time()
        xw = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        for wp, ws, mul in q:  # every copy's Humming plan exists before any capture
            H.plan_for(wp, ws, mul, torch.bfloat16)
            K.nvfp4_linear(xw, wp, ws, mul, kernel="humming")
        for layer in layers:
            prepare_humming(layer, torch.bfloat16)
        log(
            f"# {label}: {copies} NVFP4 copies, {c16} bf16 copies, Humming plans built in {time.time() - t0:.1f} s"
        )
        for m in m_list:
            xs = [torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for _ in range(2)]

            def call(name):
                return lambda i: run_method(name, xs[i % 2], *q[i % copies], w16[i % c16], layers[i % copies])

            with settings.override(humming=True):
                auto_kernel = K.select_kernel(xs[0], n, k)
            with settings.override(humming=False):
                our_kernel = K.select_kernel(xs[0], n, k)
            try:
                # one replay reads every copy: > 4.5x the L2 for each method, so none starts warm from
                # the method before it (with 10 calls a graph the expert shapes' 10 copies fit the L2)
                ts = bench_graphs_interleaved([call(name) for name in METHODS], n_inner, reps)
            except Exception as err:
                log(f"  {label} M={m}: FAILED {type(err).__name__}: {str(err)[:200]}")
                continue
            row = dict(zip(METHODS, ts, strict=True))
            row.update(shape=label, n=n, k=k, m=m, ours_kernel=our_kernel, auto_kernel=auto_kernel)
            row["auto+H_kernel"] = picked(auto_kernel, layers[0])
            results.append(row)
            log(
                f"  {label:30s} M={m:5d} "
                + " ".join(f"{name} {row[name]:9.1f}" for name in METHODS)
                + f"  [{our_kernel} / {auto_kernel}]"
            )
        q = layers = w16 = w16_0 = None  # free this shape before the next
        H.clear()
        torch.cuda.empty_cache()
    return results


def report(results, log):
    def r_(a, b):
        return f"{a / b:.2f}x"

    log(
        "\n| layer | M | ours us | Humming us | auto us | auto+H us | cuBLAS bf16 us | dq+mm us | ours/cuBLAS | Humming/cuBLAS "
        "| auto/cuBLAS | auto+H/cuBLAS | auto / best | auto+H / best | auto picks | auto+H picks |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        best = min(r["ours"], r["humming"])
        log(
            f"| {r['shape']} | {r['m']} | {r['ours']:.1f} | {r['humming']:.1f} | {r['auto']:.1f} | {r['auto+H']:.1f} | "
            f"{r['cublas']:.1f} | {r['dq+mm']:.1f} | {r_(r['cublas'], r['ours'])} | {r_(r['cublas'], r['humming'])} | "
            f"{r_(r['cublas'], r['auto'])} | {r_(r['cublas'], r['auto+H'])} | {best / r['auto']:.2f} | {best / r['auto+H']:.2f} | "
            f"{r['ours_kernel']} | {r['auto+H_kernel']} |"
        )
    log("\nTargets of issue 18 (speed ratios, higher is better; best = the faster of ours and Humming):")
    for col in ("auto", "auto+H"):
        if not results:
            break
        w = min(results, key=lambda r: min(r["ours"], r["humming"]) / r[col])
        n_miss = sum(min(r["ours"], r["humming"]) / r[col] < 0.95 for r in results)
        log(
            f"- [{col}] every M >= 0.95x best: worst {min(w['ours'], w['humming']) / w[col]:.3f} ({w['shape']}, M={w['m']}); "
            f"{n_miss} of {len(results)} points below 0.95"
        )
        for r in (r for r in results if r["m"] == 1 and r["shape"].startswith("8B")):
            log(f"- [{col}] M=1 >= 2.8x cuBLAS, {r['shape']}: {r_(r['cublas'], r[col])}")
        big = [r for r in results if r["m"] >= 1024]
        if big:
            w = min(big, key=lambda r: r["cublas"] / r[col])
            ratios = sorted(r["cublas"] / r[col] for r in big)
            log(
                f"- [{col}] M >= 1024 >= 0.95x cuBLAS: worst {r_(w['cublas'], w[col])} ({w['shape']}, M={w['m']}), "
                f"median {ratios[len(ratios) // 2]:.2f}x, {sum(v >= 0.95 for v in ratios)} of {len(ratios)} points met"
            )
    log("\nours / Humming time per (shape class, M) (> 1: Humming faster), for kernels/table.py:")
    for cls in ("tiny", "small", "medium", "big", "large"):
        line = []
        for m in sorted({r["m"] for r in results}):
            rs = [r for r in results if r["m"] == m and TB.shape_class(r["n"], r["k"]) == cls]
            if rs:
                ratios = sorted(r["ours"] / r["humming"] for r in rs)
                line.append(f"M={m}: {ratios[0]:.2f}-{ratios[-1]:.2f}")
        if line:
            log(f"  {cls}: " + "; ".join(line))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default=",".join(map(str, M_ALL)))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument(
        "--shapes", default="", help="only the layers whose label contains one of these (comma-separated)"
    )
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip what would start past this (seconds)")
    args = ap.parse_args()
    if args.shapes:  # memory, timing and the correctness cases all read SHAPES
        SHAPES[:] = [s for s in SHAPES if any(p and p in s[0] for p in args.shapes.split(","))]
    lines = []

    def log(s=""):
        print(s, flush=True)
        lines.append(s)

    import humming

    prop = torch.cuda.get_device_properties(0)
    log(
        f"card: {torch.cuda.get_device_name(0)} (sm_{prop.major}{prop.minor}, {prop.multi_processor_count} SMs, L2 {prop.L2_cache_size / 2**20:.0f} MiB); "
        f"torch {torch.__version__}, humming-kernels {humming.__version__}; command: {' '.join(sys.argv)}"
    )
    log(
        f"settings in force (the auto columns set humming=False / True): {dataclasses.asdict(settings.current())}"
    )
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)

    def save(results):
        with open(os.path.join(args.out, "bench_humming.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "bench_humming.json"), "w") as f:
            json.dump(results, f)

    memory(log)
    log(f"(memory took {time.time() - t0:.0f} s, including Humming's first compiles)")
    results = timing([int(v) for v in args.m.split(",")], args.reps, log, t0 + args.budget_s - 45)
    report(results, log)
    save(results)
    log(f"(timing done at {time.time() - t0:.0f} s)")
    if args.skip_correctness:
        pass
    elif time.time() - t0 > args.budget_s - 40:
        log("correctness: skipped (--budget-s spent)")
    else:
        correctness(log)
    log(f"\n(total {time.time() - t0:.0f} s)")
    save(results)


if __name__ == "__main__":
    main()
