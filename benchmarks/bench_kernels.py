"""Per-layer NVFP4 linear timings against cuBLAS bf16 and plain-torch dequantize-then-matmul.

    PYTHONPATH=src python benchmarks/bench_kernels.py [--models 8b,70b] [--m 1,4,16,128,2048]
        [--tune] [--quick] [--out results.md]

Timing: triton.testing.do_bench, median, which zeroes a 256 MB buffer before every repetition (so
the L2 never holds the weights from the previous run); activations also rotate among 8 copies.
GB/s counts the bytes a layer must move once: N*K*9/16 (codes + e4m3 scales) for NVFP4, N*K*2 for
bf16, plus activations in and out (M*K*2 + M*N*2).
``--tune`` sweeps the GEMV (M=1) and small-M tl.dot (M=16) configurations per shape first and prints
the winners as Python dicts for GEMV_TUNED / MM_SMALL_TUNED in kernels/triton_ops.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import triton
import triton.testing

import nvfp4_fix.kernels as K
from nvfp4_fix.codec import dequantize
from nvfp4_fix.kernels import triton_ops as T

SHAPES = {
    "8b": [
        ("8B qkv", 6144, 4096),
        ("8B o", 4096, 4096),
        ("8B gate_up", 28672, 4096),
        ("8B down", 4096, 14336),
        ("8B lm_head", 128256, 4096),
    ],
    "70b": [
        ("70B qkv", 10240, 8192),
        ("70B o", 8192, 8192),
        ("70B gate_up", 57344, 8192),
        ("70B down", 8192, 28672),
    ],
}


def make_layer(n, k, device="cuda"):
    wp = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    sb = torch.randint(0x30, 0x70, (n, k // 16), dtype=torch.uint8, device=device)  # realistic scales
    ws = sb.view(torch.float8_e4m3fn)
    mul = torch.tensor(1.0 / 2688.0, dtype=torch.float32, device=device)
    return wp, ws, mul


def bench(fn, rep=100, warmup=20):
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") * 1e3  # us


class Rot:
    """Cycle through several activation copies."""

    def __init__(self, m, k, n_copies=8):
        self.xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) + 0.1 for _ in range(n_copies)]
        self.i = 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.xs)
        return self.xs[self.i]


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def tune(shapes, log):
    gemv_best, mm_best = {}, {}
    for name, n, k in shapes:
        wp, ws, mul = make_layer(n, k)
        rot = Rot(1, k)
        ref = T.mm(rot.xs[0], wp, ws, mul)
        results = []
        for bn, bkw, warps, deq in itertools.product((8, 16, 32), (32, 64, 128), (4,), (0, 1)):
            base = T.gemv_config(n, k, torch.device("cuda"))
            for split in sorted({max(1, base["SPLIT"] // 2), base["SPLIT"] * 2}):
                cfg = {"BN": bn, "BKW": bkw, "SPLIT": split, "num_warps": warps, "DEQ": deq, "num_stages": 3}
                try:
                    y = T.gemv(rot.xs[0], wp, ws, mul, cfg=cfg)
                    if rel_err(y, ref) > 1e-2:
                        log(f"  gemv {cfg} WRONG err={rel_err(y, ref):.2e}")
                        continue
                    t = bench(lambda cfg=cfg: T.gemv(rot(), wp, ws, mul, cfg=cfg), rep=25, warmup=5)
                except Exception as e:  # out of resources etc.
                    log(f"  gemv {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
                    continue
                results.append((t, cfg))
        results.sort(key=lambda r: r[0])
        for t, cfg in results[:3]:
            log(f"  {name} gemv M=1 {t:8.1f} us {cfg}")
        gemv_best[(n, k)] = results[0][1]

        rot16 = Rot(16, k)
        ref16 = T.mm(rot16.xs[0], wp, ws, mul, cfg={"BM": 16, "BN": 64, "BK": 128, "SPLIT": 1, "num_warps": 4})
        results = []
        for bn, bk, warps, stages in itertools.product((32, 64, 128), (128, 256), (4, 8), (3, 4)):
            base = T.mm_config(16, n, k, torch.device("cuda"))
            for split in sorted({max(1, base["SPLIT"] // 2), base["SPLIT"], base["SPLIT"] * 2}):
                cfg = {"BM": 16, "BN": bn, "BK": bk, "SPLIT": split, "num_warps": warps, "num_stages": stages}
                try:
                    y = T.mm(rot16.xs[0], wp, ws, mul, cfg=cfg)
                    if rel_err(y, ref16) > 1e-2:
                        log(f"  mm {cfg} WRONG")
                        continue
                    t = bench(lambda cfg=cfg: T.mm(rot16(), wp, ws, mul, cfg=cfg), rep=25, warmup=5)
                except Exception as e:
                    log(f"  mm {cfg} failed: {type(e).__name__}: {str(e)[:100]}")
                    continue
                results.append((t, cfg))
        results.sort(key=lambda r: r[0])
        for t, cfg in results[:3]:
            log(f"  {name} mm M=16 {t:8.1f} us {cfg}")
        mm_best[(n, k)] = results[0][1]
        del wp, ws
        torch.cuda.empty_cache()
    return gemv_best, mm_best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--m", default="1,4,16,128,2048")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--no-torch-dequant", action="store_true", help="skip the slow plain-torch baseline")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logf = open(args.out + ".log", "w") if args.out else None

    def log(s):
        print(s, flush=True)
        if logf:
            logf.write(s + "\n")
            logf.flush()

    dev = torch.cuda.get_device_name()
    log(f"# device: {dev}, torch {torch.__version__}, triton {triton.__version__}, "
        f"cuda {torch.version.cuda}, sms {torch.cuda.get_device_properties(0).multi_processor_count}")
    shapes = [s for key in args.models.split(",") for s in SHAPES[key]]
    ms = [int(v) for v in args.m.split(",")]

    if args.tune:
        t0 = time.time()
        gb, mb = tune(shapes, log)
        T.GEMV_TUNED.update(gb)
        T.MM_SMALL_TUNED.update(mb)
        log("GEMV_TUNED = " + repr(gb))
        log("MM_SMALL_TUNED = " + repr(mb))
        log(f"# tuning took {time.time() - t0:.0f} s")

    rows = []
    header = ("| layer | N x K | M | cuBLAS bf16 us | auto (kernel) us | speedup | GB/s | triton_gemv us | "
              "triton_mm us | dequant_mm us | torch dequant+mm us | err |")
    log(header)
    log("|" + "---|" * 12)
    for name, n, k in shapes:
        wp, ws, mul = make_layer(n, k)
        w_bf16 = dequantize(wp, ws, mul, "multiplier", torch.bfloat16)
        for m in ms:
            rot = Rot(m, k)
            x0 = rot.xs[0]
            r = {"layer": name, "N": n, "K": k, "M": m}
            r["cublas"] = bench(lambda: torch.nn.functional.linear(rot(), w_bf16))
            kern = K.select_kernel(x0, n, k)
            r["kernel"] = kern
            r["auto"] = bench(lambda: K.nvfp4_linear(rot(), wp, ws, mul))
            y = K.nvfp4_linear(x0, wp, ws, mul)
            ref = torch.nn.functional.linear(x0.float(), w_bf16.float()) if m <= 2048 else None
            r["err"] = rel_err(y, ref)
            r["gemv"] = bench(lambda: T.gemv(rot(), wp, ws, mul)) if m <= 4 else None
            r["mm"] = bench(lambda: T.mm(rot(), wp, ws, mul))
            r["dequant_mm"] = bench(lambda: T.dequant_mm(rot(), wp, ws, mul))
            if not args.no_torch_dequant and m in (1, 2048):
                r["torch_deq"] = bench(
                    lambda: torch.nn.functional.linear(rot(), dequantize(wp, ws, mul, "multiplier", torch.bfloat16)),
                    rep=50, warmup=5)
            else:
                r["torch_deq"] = None
            nbytes = n * k * 9 / 16 + m * k * 2 + m * n * 2
            r["gbs"] = nbytes / (r["auto"] * 1e-6) / 1e9
            r["speedup"] = r["cublas"] / r["auto"]

            def f(v):
                return "-" if v is None else f"{v:.1f}"

            log(f"| {name} | {n}x{k} | {m} | {f(r['cublas'])} | {f(r['auto'])} ({kern}) | {r['speedup']:.2f}x | "
                f"{r['gbs']:.0f} | {f(r['gemv'])} | {f(r['mm'])} | {f(r['dequant_mm'])} | {f(r['torch_deq'])} | "
                f"{r['err']:.1e} |")
            rows.append(r)
        del wp, ws, w_bf16
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
