# ruff: noqa: B023, E501  (lambdas are called at once, inside the loop that binds them)
"""Per-layer NVFP4 linear timings against cuBLAS bf16 and plain-torch dequantize-then-matmul.

    PYTHONPATH=src python benchmarks/bench_kernels.py [--models 8b,70b] [--m 1,4,16,128,2048]
        [--tune] [--out PATH]

Timing: every method is captured in a CUDA graph as 10 back-to-back calls and the graph replayed 15
times (CUDA events, median per call): that is how a decode step runs (graph-captured, no launch gaps),
and it keeps Python launch overhead out of the kernel numbers. Each graph is first replayed for 30 ms,
so each method is timed at its own steady clocks (``--interleave`` instead alternates the cuBLAS and
auto replays; benchmarks/RESULTS.md, session 5, shows what the order does to the ratios). Each call uses the next of several
copies of the weights and activations, enough copies that consecutive calls never find their
weights in the 50 MB L2. The plain-torch dequantize-then-matmul baseline cannot be captured (it builds
a lookup table on the host) and is timed with triton.testing.do_bench (median, L2 flushed each rep).
GB/s counts the bytes a layer must move once: N*K*9/16 (codes + e4m3 scales) for NVFP4, plus the
activations in and out (M*K*2 + M*N*2).
``--tune`` first sweeps, per shape, the GEMV and BM=16 tl.dot configurations at M=1 and the tl.dot
ones at M=16, and prints the winners as TUNED_M1 / TUNED_SMALL for kernels/triton_ops.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time

import torch
import triton
import triton.testing

import nvfp4_fix.kernels as K
from nvfp4_fix.codec import dequantize
from nvfp4_fix.kernels import cuda_mma
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
L2_BYTES = 50 * 2**20


def make_layer(n, k, device="cuda"):
    wp = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    sb = torch.randint(0x30, 0x70, (n, k // 16), dtype=torch.uint8, device=device)  # realistic scales
    return wp, sb.view(torch.float8_e4m3fn), torch.tensor(1.0 / 2688.0, dtype=torch.float32, device=device)


def n_copies(nbytes):
    """Copies of a buffer of ``nbytes`` that together exceed 3x the L2 (a graph must replay them all:
    ``Layer.n_inner``)."""
    return max(1, math.ceil(3 * L2_BYTES / max(nbytes, 1)))


class Layer:
    """Several copies of one layer's packed weights, its bf16 twin and activations."""

    def __init__(self, n, k, m, with_bf16=True):
        self.n, self.k, self.m = n, k, m
        base = make_layer(n, k)
        cq = n_copies(n * k * 9 // 16 + m * k * 2)
        self.q = [base] + [tuple(t.clone() for t in base) for _ in range(cq - 1)]
        self.w16 = []
        if with_bf16:
            w = dequantize(base[0], base[1], base[2], "multiplier", torch.bfloat16)
            cb = n_copies(n * k * 2 + m * k * 2)
            self.w16 = [w] + [w.clone() for _ in range(cb - 1)]
        cx = max(cq, len(self.w16))
        self.x = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) + 0.1 for _ in range(cx)]
        #: calls per captured graph: every copy once, so one replay reads more than the L2 holds
        self.n_inner = max(10, cx)

    def qargs(self, i):
        wp, ws, mul = self.q[i % len(self.q)]
        return self.x[i % len(self.x)], wp, ws, mul


WARM_MS = 30.0


def _replay_ms(g):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def _capture(call, n_inner):
    """call(0..n_inner-1) captured in one graph (warmed up on a side stream first), then replayed for
    WARM_MS: the card's clocks settle to this method's own steady state (right after a cuBLAS GEMM at
    full power they are lower, which biased the next method's first replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(2):
            call(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n_inner):
            call(i)
    for _ in range(min(500, int(WARM_MS / max(_replay_ms(g), 1e-3)))):
        g.replay()
    torch.cuda.synchronize()
    return g


def bench_graphs_interleaved(calls, n_inner=10, reps=15):
    """Median us per call of each call(i) -> one layer call, graph-replayed as n_inner back-to-back
    calls. With several methods their replays alternate (``--interleave``): each replay then starts
    from the clocks the other method left."""
    graphs = [_capture(call, n_inner) for call in calls]
    times = [[] for _ in calls]
    for _ in range(reps):
        for g, ts in zip(graphs, times, strict=True):
            ts.append(_replay_ms(g) * 1e3 / n_inner)
    del graphs
    return [sorted(ts)[len(ts) // 2] for ts in times]


def bench_graph(call, n_inner=10, reps=15):
    """call(i) -> one layer call; returns median us per call of graph-replayed back-to-back calls."""
    return bench_graphs_interleaved([call], n_inner, reps)[0]


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _try(log, what, fn):
    try:
        return fn()
    except Exception as e:  # out of resources, etc.
        log(f"  {what} failed: {type(e).__name__}: {str(e)[:120]}")
        return None


def tune(shapes, log):
    m1, small, mid = {}, {}, {}
    dev = torch.device("cuda")
    for name, n, k in shapes:
        lay = Layer(n, k, 16, with_bf16=False)
        x16 = lay.x[0]
        x1 = x16[:1].contiguous()
        wp, ws, mul = lay.q[0]
        ref1 = K.nvfp4_linear(x1, wp, ws, mul, kernel="reference").float()
        ref16 = K.nvfp4_linear(x16, wp, ws, mul, kernel="reference").float()
        res1, res16 = [], []
        base = T.gemv_config(n, k, dev)["SPLIT"]
        for bn, bkw, deq in itertools.product((8, 16, 32), (32, 64, 128), (0, 2)):
            for split in sorted({max(1, base // 2), base, base * 2}):
                cfg = {"BN": bn, "BKW": bkw, "SPLIT": split, "num_warps": 4, "DEQ": deq, "num_stages": 3}
                y = _try(log, f"gemv {cfg}", lambda cfg=cfg: T.gemv(x1, wp, ws, mul, cfg=cfg))
                if y is None or rel_err(y, ref1) > 1e-2:
                    continue
                t = _try(
                    log,
                    "bench",
                    lambda cfg=cfg: bench_graph(
                        lambda i: T.gemv(lay.qargs(i)[0][:1], *lay.qargs(i)[1:], cfg=cfg), n_inner=lay.n_inner
                    ),
                )
                if t is not None:
                    res1.append((t, "gemv", cfg))
        base = T.mm_config(16, n, k, dev)["SPLIT"]
        for bn, bk, warps, stages in itertools.product((32, 64, 128, 256), (128, 256), (4, 8), (3, 4)):
            if (bn == 256 and warps == 4) or (bn <= 64 and warps == 8):
                continue
            for split in sorted({max(1, base // 2), base * 2}):
                cfg = {"BM": 16, "BN": bn, "BK": bk, "SPLIT": split, "num_warps": warps, "num_stages": stages}
                y = _try(log, f"mm {cfg}", lambda cfg=cfg: T.mm(x16, wp, ws, mul, cfg=cfg))
                if y is None or rel_err(y, ref16) > 1e-2:
                    if y is not None:
                        log(f"  mm {cfg} WRONG {rel_err(y, ref16):.2e}")
                    continue
                t16 = _try(
                    log,
                    "bench",
                    lambda cfg=cfg: bench_graph(lambda i: T.mm(*lay.qargs(i), cfg=cfg), n_inner=lay.n_inner),
                )
                t1 = _try(
                    log,
                    "bench",
                    lambda cfg=cfg: bench_graph(
                        lambda i: T.mm(lay.qargs(i)[0][:1], *lay.qargs(i)[1:], cfg=cfg), n_inner=lay.n_inner
                    ),
                )
                if t16 is not None:
                    res16.append((t16, "mm", cfg))
                if t1 is not None:
                    res1.append((t1, "mm", cfg))
        # M=128: the tl.dot kernel's block shapes and split
        x128 = torch.randn(128, k, device="cuda", dtype=torch.bfloat16) + 0.1
        ref128 = K.nvfp4_linear(x128, wp, ws, mul, kernel="reference").float()
        res128 = []
        base = T.mm_config(128, n, k, dev)["SPLIT"]
        for bm, bn, bk, warps in itertools.product((64, 128), (64, 128), (64, 128), (4, 8)):
            for split in sorted({max(1, base // 2), base, base * 2}):
                cfg = {"BM": bm, "BN": bn, "BK": bk, "SPLIT": split, "num_warps": warps, "num_stages": 3}
                y = _try(log, f"mm {cfg}", lambda cfg=cfg: T.mm(x128, wp, ws, mul, cfg=cfg))
                if y is None or rel_err(y, ref128) > 1e-2:
                    continue
                t = _try(
                    log,
                    "bench",
                    lambda cfg=cfg: bench_graph(
                        lambda i: T.mm(x128, *lay.qargs(i)[1:], cfg=cfg), n_inner=lay.n_inner
                    ),
                )
                if t is not None:
                    res128.append((t, "mm", cfg))
        res128.sort(key=lambda r: r[0])
        for t, kern, cfg in res128[:2]:
            log(f"  {name} M=128 {t:8.1f} us {kern} {cfg}")
        mid[(n, k)] = res128[0][2]
        res1.sort(key=lambda r: r[0])
        res16.sort(key=lambda r: r[0])
        for t, kern, cfg in res1[:4]:
            log(f"  {name} M=1 {t:8.1f} us {kern} {cfg}")
        for t, kern, cfg in res16[:2]:
            log(f"  {name} M=16 {t:8.1f} us {kern} {cfg}")
        best_gemv = min((r for r in res1 if r[1] == "gemv"), key=lambda r: r[0], default=None)
        best_mm1 = min((r for r in res1 if r[1] == "mm"), key=lambda r: r[0], default=None)
        log(
            f"  {name} M=1 best gemv {best_gemv[0] if best_gemv else None} best mm {best_mm1[0] if best_mm1 else None}"
        )
        m1[(n, k)] = (res1[0][1], res1[0][2])
        small[(n, k)] = res16[0][2]
        lay = None
        torch.cuda.empty_cache()
    return m1, small, mid


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="8b,70b")
    ap.add_argument("--m", default="1,4,16,128,2048")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--tune-dequant", action="store_true", help="sweep the dequantize kernel's block shape")
    ap.add_argument("--no-torch-dequant", action="store_true", help="skip the slow plain-torch baseline")
    ap.add_argument("--out", default=None, help="also write the log here")
    ap.add_argument("--json", default=None)
    ap.add_argument("--interleave", action="store_true", help="alternate cuBLAS and auto replays")
    ap.add_argument(
        "--mma-warps", default="", help="also time cuda_mma with these warps per block, e.g. 4,8,16"
    )
    args = ap.parse_args()
    logf = open(args.out, "w") if args.out else None

    def log(s):
        print(s, flush=True)
        if logf:
            logf.write(s + "\n")
            logf.flush()

    props = torch.cuda.get_device_properties(0)
    log(
        f"# device: {torch.cuda.get_device_name()}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
        f"triton {triton.__version__}, cuda {torch.version.cuda}"
    )
    shapes = [s for key in args.models.split(",") for s in SHAPES[key]]
    ms = [int(v) for v in args.m.split(",")]

    if args.tune:
        t0 = time.time()
        m1, small, mid = tune(shapes, log)
        T.TUNED_M1.update(m1)
        T.TUNED_SMALL.update(small)
        T.TUNED_MID.update(mid)
        log("TUNED_M1 = " + repr(m1))
        log("TUNED_SMALL = " + repr(small))
        log("TUNED_MID = " + repr(mid))
        log(f"# tuning took {time.time() - t0:.0f} s")

    if args.tune_dequant:
        best = {}
        for name, n, k in shapes:
            lay = Layer(n, k, 1, with_bf16=False)
            out = torch.empty(
                (min(n, T.scratch_bytes_default() // (2 * k)), k), dtype=torch.bfloat16, device="cuda"
            )
            rows_ = out.shape[0]
            for cfg in ((32, 256, 4), (64, 256, 4), (64, 256, 8), (128, 128, 8), (16, 512, 4), (32, 512, 8)):
                t = _try(
                    log,
                    "dequant",
                    lambda cfg=cfg: bench_graph(
                        lambda i: T.dequantize_rows(
                            *lay.q[i % len(lay.q)], torch.bfloat16, 0, rows_, out=out, cfg=cfg
                        ),
                        n_inner=lay.n_inner,
                    ),
                )
                if t is not None:
                    gbs = rows_ * k * (2 + 9 / 16) / (t * 1e-6) / 1e9
                    log(f"  dequant {name} rows={rows_} {cfg}: {t:.1f} us {gbs:.0f} GB/s")
                    best[cfg] = best.get(cfg, 0.0) + t / rows_ / k
            lay = None
        T.DEQUANT_CFG = min(best, key=best.get)
        log(f"DEQUANT_CFG = {T.DEQUANT_CFG!r}")

    rows = []
    log(
        "| layer | N x K | M | cuBLAS bf16 us | NVFP4 auto us (kernel) | speedup | NVFP4 GB/s | cuda_mma | "
        "triton_gemv | triton_mm | dequant_mm | torch dequant+mm | rel err |"
    )
    log("|" + "---|" * 13)
    for name, n, k in shapes:
        for m in ms:
            lay = Layer(n, k, m)
            x0, wp, ws, mul = lay.qargs(0)
            r = {"layer": name, "N": n, "K": k, "M": m}
            nw = len(lay.w16)
            pair = [
                lambda i: torch.nn.functional.linear(lay.x[i % len(lay.x)], lay.w16[i % nw]),
                lambda i: K.nvfp4_linear(*lay.qargs(i)),
            ]
            if args.interleave:
                r["cublas"], r["auto"] = bench_graphs_interleaved(pair)
            else:
                r["cublas"], r["auto"] = bench_graph(pair[0]), bench_graph(pair[1])
            kern = K.select_kernel(x0, n, k)
            r["kernel"] = kern
            ref = torch.nn.functional.linear(x0.float(), lay.w16[0].float())
            r["err"] = rel_err(K.nvfp4_linear(x0, wp, ws, mul), ref)
            r["cuda_mma"] = None
            if m <= 16 and cuda_mma.supports(x0, n, k):
                r["cuda_mma"] = _try(
                    log,
                    "cuda_mma",
                    lambda: bench_graph(lambda i: cuda_mma.linear(*lay.qargs(i)), n_inner=lay.n_inner),
                )
                for w in [int(v) for v in args.mma_warps.split(",") if v]:
                    t = _try(
                        log,
                        "cuda_mma",
                        lambda w=w: bench_graph(
                            lambda i: cuda_mma.linear(*lay.qargs(i), warps=w), n_inner=lay.n_inner
                        ),
                    )
                    log(
                        f"  cuda_mma {name} M={m} warps={w}: {t} us (default {cuda_mma.warps_for(n, k, x0.device)})"
                    )
            r["gemv"] = (
                _try(log, "gemv", lambda: bench_graph(lambda i: T.gemv(*lay.qargs(i)), n_inner=lay.n_inner))
                if m <= 4
                else None
            )
            r["mm"] = (
                _try(log, "mm", lambda: bench_graph(lambda i: T.mm(*lay.qargs(i)), n_inner=lay.n_inner))
                if m <= 2048
                else None
            )
            r["dequant_mm"] = _try(
                log,
                "dequant_mm",
                lambda: bench_graph(lambda i: T.dequant_mm(*lay.qargs(i)), n_inner=lay.n_inner),
            )
            if not args.no_torch_dequant and m in (1, 2048):
                r["torch_deq"] = (
                    triton.testing.do_bench(
                        lambda: torch.nn.functional.linear(
                            x0, dequantize(wp, ws, mul, "multiplier", torch.bfloat16)
                        ),
                        warmup=5,
                        rep=50,
                        return_mode="median",
                    )
                    * 1e3
                )
            else:
                r["torch_deq"] = None
            nbytes = n * k * 9 / 16 + m * k * 2 + m * n * 2
            r["gbs"] = nbytes / (r["auto"] * 1e-6) / 1e9
            r["speedup"] = r["cublas"] / r["auto"]

            def f(v):
                return "-" if v is None else f"{v:.1f}"

            log(
                f"| {name} | {n}x{k} | {m} | {f(r['cublas'])} | {f(r['auto'])} ({kern}) | {r['speedup']:.2f}x | "
                f"{r['gbs']:.0f} | {f(r['cuda_mma'])} | {f(r['gemv'])} | {f(r['mm'])} | {f(r['dequant_mm'])} | {f(r['torch_deq'])} | "
                f"{r['err']:.1e} |"
            )
            rows.append(r)
            lay = None
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
