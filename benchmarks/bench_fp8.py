# ruff: noqa: E501
"""FP8 layers of mixed checkpoints on one card: FP8Linear (W8A16: dequantize into scratch + cuBLAS) and
torch._scaled_mm (FP8 tensor cores, sm_89+) against cuBLAS bf16 with the dense weight resident.

    PYTHONPATH=src python benchmarks/bench_fp8.py [--m 1,16,128,2048] [--reps 50] [--json OUT]

First correctness, then timing, in one run on one card. Every method is checked against a float64
reference (e4m3 decoded by hand, scales spread per tensor / row / 128x128 block; the activation
quantization applied with nvfp4_fix.fp8.fake_quantize_fp8, which tests/test_fp8.py holds bit-equal to
compressed-tensors' own forward) with a relative-L2 tolerance: 1e-2 in bf16.
``_scaled_mm`` reproduces the checkpoint's activation quantization only where its scaling does: a
per-tensor or per-row weight scale with static per-tensor or dynamic per-token activations (rowwise
scaling needs sm_90); block weights have no such path here and show "-".
``--device cpu`` runs the same checks and times on the CPU (no _scaled_mm), to try the script anywhere.
Columns (median microseconds of ``--reps`` timed calls after warm-up, CUDA events, eager):
``bf16`` cuBLAS x @ W.T, W dense bf16 resident; ``w8a16`` FP8Linear with activation_mode="bf16";
``w8a8-emul`` FP8Linear with the activation quantization (default); ``scaled_mm`` quantize x to e4m3
exactly as the emulation does, then one torch._scaled_mm.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from nvfp4_fix.fp8 import FP8Linear, fake_quantize_fp8
from nvfp4_fix.schemes import FP8Spec

SHAPES = [
    ("8B qkv (fused)", 6144, 4096),
    ("8B o", 4096, 4096),
    ("8B gate_up (fused)", 28672, 4096),
    ("8B down", 4096, 14336),
    ("27B-like attn q", 6144, 5120),
]
SPECS = [
    FP8Spec("tensor", "static"),
    FP8Spec("channel", "dynamic-token"),
    FP8Spec("block", "dynamic-group", (128, 128), 128),
]


def make_layer(n: int, k: int, spec: FP8Spec, device: str) -> FP8Linear:
    g = torch.Generator().manual_seed(n * 31 + k)
    w = torch.randn(n, k, generator=g) * 0.05
    if spec.weights == "tensor":
        scale = (w.abs().max() / 448).reshape(1)
        full = scale.expand(n, k)
    elif spec.weights == "channel":
        scale = w.abs().amax(1, keepdim=True) / 448
        full = scale.expand(n, k)
    else:
        bn, bk = spec.block or (128, 128)
        rows, cols = math.ceil(n / bn), math.ceil(k / bk)
        pad = torch.zeros(rows * bn, cols * bk)
        pad[:n, :k] = w
        scale = pad.reshape(rows, bn, cols, bk).abs().amax((1, 3)) / 448
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    layer = FP8Linear(
        k,
        n,
        spec,
        scale_shape=tuple(scale.shape),
        input_scale_shape=(1,) if spec.activations == "static" else None,
        dtype=torch.bfloat16,
    )
    layer.weight.data = (w / full).clamp(-448, 448).to(torch.float8_e4m3fn)
    layer.weight_scale.data = scale.float()
    if layer.input_scale is not None:
        layer.input_scale.data = torch.tensor([4.0 / 448])
    return layer.to(device)


def e4m3_f64(t: torch.Tensor) -> torch.Tensor:
    b = t.view(torch.uint8).to(torch.int64)
    sign = 1.0 - 2.0 * ((b >> 7) & 1).double()
    e, m = (b >> 3) & 15, (b & 7).double()
    return sign * torch.where(e == 0, m / 8 * 2.0**-6, torch.pow(2.0, (e - 7).double()) * (1 + m / 8))


def reference(layer: FP8Linear, x: torch.Tensor, quantize: bool) -> torch.Tensor:
    w = e4m3_f64(layer.weight.cpu())
    s = layer.weight_scale.detach().cpu().double()
    n, k = w.shape
    if layer.spec.weights == "block":
        bn, bk = layer.spec.block or (128, 128)
        s = s[torch.arange(n)[:, None] // bn, torch.arange(k)[None, :] // bk]
    w = w * (s.reshape(()) if s.numel() == 1 else s.reshape(n, -1))
    xin = x.cpu().double()
    if quantize and layer.spec.activations != "none":
        xin = fake_quantize_fp8(
            x.cpu(), layer.spec, None if layer.input_scale is None else layer.input_scale.cpu()
        ).double()
    return xin @ w.T


def scaled_mm_path(layer: FP8Linear) -> object | None:
    """x -> torch._scaled_mm output, reproducing the layer's activation quantization, or None."""
    spec = layer.spec
    if not hasattr(torch, "_scaled_mm") or spec.weights == "block":
        return None
    if spec.activations not in ("static", "dynamic-token"):
        return None
    wt = layer.weight.t()  # [K, N] column-major, as _scaled_mm wants its second operand
    ws = layer.weight_scale.float()
    rowwise = spec.weights == "channel" or spec.activations == "dynamic-token"
    if rowwise and torch.cuda.get_device_capability() < (9, 0):
        return None
    w_scale = (
        ws.reshape(1, -1) if spec.weights == "channel" else ws.reshape(1, 1).expand(1, layer.out_features)
    )

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if spec.activations == "static":
            s = layer.input_scale.to(x.dtype).reshape(())
        else:
            s = x2.abs().amax(-1, keepdim=True) / 448
            s = torch.where(s == 0, torch.full_like(s, torch.finfo(s.dtype).eps), s)
        q = (x2 / s).clamp(-448, 448).to(torch.float8_e4m3fn)
        if rowwise:
            a_scale = s.float().reshape(-1, 1).expand(x2.shape[0], 1).contiguous()
            y = torch._scaled_mm(q, wt, scale_a=a_scale, scale_b=w_scale.contiguous(), out_dtype=x.dtype)
        else:
            y = torch._scaled_mm(
                q, wt, scale_a=s.float().reshape(()), scale_b=ws.reshape(()), out_dtype=x.dtype
            )
        return y.reshape(*x.shape[:-1], -1)

    return run


def time_us(fn: object, x: torch.Tensor, reps: int) -> float:
    for _ in range(5):
        fn(x)
    times = []
    for _ in range(reps):
        if x.is_cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(x)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1000)
        else:
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def run_layer(layer: FP8Linear, mode: str) -> object:
    def call(x: torch.Tensor) -> torch.Tensor:
        layer.activation_mode = mode
        return layer(x)

    return call


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--m", default="1,16,128,2048")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", type=int, default=len(SHAPES), help="only the first N shapes")
    args = p.parse_args()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("bench_fp8: no CUDA device (use --device cpu to try the script)", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name() if dev.startswith("cuda") else "CPU"
    cap = "".join(map(str, torch.cuda.get_device_capability())) if dev.startswith("cuda") else "-"
    print(f"# {card} (sm_{cap}), torch {torch.__version__}")
    rows = []
    failures = []
    for name, n, k in SHAPES[: args.shapes]:
        for spec in SPECS:
            layer = make_layer(n, k, spec, dev)
            dense = layer.dequantized_weight(torch.bfloat16)
            mm = scaled_mm_path(layer) if dev.startswith("cuda") else None
            for m in [int(v) for v in args.m.split(",")]:
                x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).bfloat16().to(dev)
                methods = {
                    "bf16": (lambda x, d=dense: x @ d.T, False),
                    "w8a16": (run_layer(layer, "bf16"), False),
                    "w8a8-emul": (run_layer(layer, "quantize"), True),
                }
                if mm is not None:
                    methods["scaled_mm"] = (mm, True)
                row = {"shape": name, "n": n, "k": k, "m": m, "spec": spec.describe()}
                for label, (fn, quant) in methods.items():
                    ref = reference(layer, x, quant)
                    y = fn(x).double().cpu()
                    err = float((y - ref).norm() / ref.norm())
                    if not err < 1e-2:
                        failures.append(f"{name} {spec.describe()} M={m} {label}: rel err {err:.3g}")
                    row[label] = time_us(fn, x, args.reps)
                    row[label + "_err"] = err
                rows.append(row)
            del layer, dense
            torch.cuda.empty_cache()
    print(
        "| shape | FP8 kind | M | bf16 us | w8a16 us | w8a8-emul us | scaled_mm us | w8a16 speed vs bf16 | scaled_mm speed vs bf16 |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        sm = r.get("scaled_mm")
        sm_us = "-" if sm is None else f"{sm:.1f}"
        sm_speed = "-" if sm is None else f"{r['bf16'] / sm:.2f}x"
        print(
            f"| {r['shape']} | {r['spec']} | {r['m']} | {r['bf16']:.1f} | {r['w8a16']:.1f} | {r['w8a8-emul']:.1f} | "
            f"{sm_us} | {r['bf16'] / r['w8a16']:.2f}x | {sm_speed} |"
        )
    for f in failures:
        print("FAILED:", f)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": card, "rows": rows, "failures": failures}, fh, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
