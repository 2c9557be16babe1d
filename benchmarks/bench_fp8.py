# ruff: noqa: E501
"""FP8 layers of mixed checkpoints on one card: FP8Linear's paths against cuBLAS bf16 with the dense
weight resident, each checked against a float64 reference before it is timed.

    PYTHONPATH=src python benchmarks/bench_fp8.py [--m 1,16,64,128,2048] [--reps 50] [--out T.md] [--json J]
    PYTHONPATH=src python benchmarks/bench_fp8.py --device cpu --tiny     # the script's smoke test

Reference: e4m3 decoded from its bits, scales spread per tensor / row / 128x128 block, float64 products
on the device; the activation quantization applied with nvfp4_fix.fp8.fake_quantize_fp8 (which
tests/test_fp8.py holds bit-equal to compressed-tensors' own forward). Tolerance: relative L2 1e-2 (bf16).
Columns (median microseconds of ``--reps`` calls after warm-up; CUDA events on a GPU; eager):

* ``bf16``: x @ W.T, W dense bf16 resident (cuBLAS).
* ``w8a16``: FP8Linear, activation_mode="bf16" (what it runs: Triton kernel for M <= 64, chunked
  dequantize + cuBLAS above); ``w8a16 torch``: the chunked dequantize + cuBLAS path at every M.
* ``w8a8 emul``: the checkpoint's activation quantization emulated (fake-quantize + W8A16;
  settings.fp8_scaled_mm off); ``w8a8``: FP8Linear's default, torch._scaled_mm on FP8 tensor cores
  where its scaling reproduces the quantization (``path`` says which ran), else the emulation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from nvfp4_fix import fp8_cuda, settings
from nvfp4_fix.fp8 import FP8Linear
from nvfp4_fix.schemes import FP8Spec

SHAPES = [
    ("8B qkv (fused)", 6144, 4096),
    ("8B o", 4096, 4096),
    ("8B gate_up (fused)", 28672, 4096),
    ("8B down", 4096, 14336),
    ("27B-like attn q", 5120, 5120),
]
TINY = [("tiny", 256, 512)]
SPECS = [
    FP8Spec("tensor", "static"),
    FP8Spec("channel", "dynamic-token"),
    FP8Spec("block", "dynamic-group", (128, 128), 128),
]


def make_layer(n: int, k: int, spec: FP8Spec, device: str) -> FP8Linear:
    """N(0, 0.05) weights quantized with the spec's scales (amax / 448), built on ``device``."""
    g = torch.Generator(device).manual_seed(n * 31 + k)
    w = torch.randn(n, k, generator=g, device=device) * 0.05
    if spec.weights == "tensor":
        scale = (w.abs().max() / 448).reshape(1)
        full = scale.reshape(1, 1)
    elif spec.weights == "channel":
        scale = w.abs().amax(1, keepdim=True) / 448
        full = scale
    else:
        bn, bk = spec.block or (128, 128)
        rows, cols = math.ceil(n / bn), math.ceil(k / bk)
        pad = torch.zeros(rows * bn, cols * bk, device=device)
        pad[:n, :k] = w
        scale = pad.reshape(rows, bn, cols, bk).abs().amax((1, 3)) / 448
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    layer = FP8Linear(k, n, spec, scale_shape=tuple(scale.shape),
                      input_scale_shape=(1,) if spec.activations == "static" else None, device=device)  # fmt: skip
    layer.weight.data.copy_((w / full).clamp(-448, 448).to(torch.float8_e4m3fn))
    layer.weight_scale.data.copy_(scale)
    if layer.input_scale is not None:
        layer.input_scale.data.fill_(4.0 / 448)
    return layer


def e4m3_f64(t: torch.Tensor) -> torch.Tensor:
    b = t.view(torch.uint8).to(torch.int64)
    sign = 1.0 - 2.0 * ((b >> 7) & 1).double()
    e, m = (b >> 3) & 15, (b & 7).double()
    return sign * torch.where(e == 0, m / 8 * 2.0**-6, torch.pow(2.0, (e - 7).double()) * (1 + m / 8))


def reference_weight(layer: FP8Linear) -> torch.Tensor:
    w = e4m3_f64(layer.weight.detach())
    s = layer.weight_scale.detach().double()
    n, k = w.shape
    if layer.spec.weights == "block":
        bn, bk = layer.spec.block or (128, 128)
        s = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return w * (s.reshape(()) if s.numel() == 1 else s.reshape(n, -1))


@contextlib.contextmanager
def torch_w8a16():
    """FP8Linear without the Triton kernel: its chunked dequantize + cuBLAS path at every M."""
    saved, fp8_cuda._triton = fp8_cuda._triton, None
    try:
        yield
    finally:
        fp8_cuda._triton = saved


def method(layer: FP8Linear, mode: str, scaled_mm: bool = True, triton: bool = True):  # noqa: ANN201
    def call(x: torch.Tensor) -> torch.Tensor:
        layer.activation_mode = mode
        with settings.override(fp8_scaled_mm=scaled_mm), (contextlib.nullcontext() if triton else torch_w8a16()):
            return layer(x)

    return call


def w8a8_path(layer: FP8Linear, x: torch.Tensor) -> str:
    if fp8_cuda.scaled_mm_scaling(layer.spec, x, layer.out_features) is not None:
        return "_scaled_mm"
    return "emulation"


def time_us(fn, x: torch.Tensor, reps: int) -> float:  # noqa: ANN001
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", default="1,16,64,128,2048")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None, help="write the markdown table here too")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", type=int, default=len(SHAPES), help="only the first N shapes")
    p.add_argument("--tiny", action="store_true", help="one 256 x 512 layer, M = 1 and 16, 3 reps")
    args = p.parse_args()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("bench_fp8: no CUDA device (use --device cpu --tiny to try the script)", file=sys.stderr)
        return 2
    shapes, ms, reps = (TINY, [1, 16], 3) if args.tiny else (SHAPES[: args.shapes], [int(v) for v in args.m.split(",")], args.reps)
    cuda = dev.startswith("cuda")
    card = torch.cuda.get_device_name() if cuda else "CPU"
    cap = "".join(map(str, torch.cuda.get_device_capability())) if cuda else "-"
    head = f"# FP8Linear on {card} (sm_{cap}), torch {torch.__version__}"
    print(head, flush=True)
    rows, failures = [], []
    for name, n, k in shapes:
        for spec in SPECS:
            layer = make_layer(n, k, spec, dev)
            dense = layer.dequantized_weight(torch.bfloat16)
            w64 = reference_weight(layer)
            for m in ms:
                x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).bfloat16().to(dev)
                with torch.no_grad():
                    refs = {False: x.double() @ w64.T, True: layer.prepare_input(x).double() @ w64.T}
                methods = {
                    "bf16": (lambda x, d=dense: x @ d.T, False),
                    "w8a16": (method(layer, "bf16"), False),
                    "w8a16 torch": (method(layer, "bf16", triton=False), False),
                    "w8a8 emul": (method(layer, "quantize", scaled_mm=False), True),
                    "w8a8": (method(layer, "quantize"), True),
                }
                row = {"shape": name, "n": n, "k": k, "m": m, "spec": spec.describe(), "path": w8a8_path(layer, x) if cuda else "emulation"}
                for label, (fn, quant) in methods.items():
                    with torch.no_grad():
                        y = fn(x)
                        err = float((y.double() - refs[quant]).norm() / refs[quant].norm())
                        row[label] = time_us(fn, x, reps)
                    row[label + "_err"] = err
                    if not err < 1e-2:
                        failures.append(f"{name} {spec.describe()} M={m} {label}: rel err {err:.3g}")
                rows.append(row)
                print(f"  {name} {spec.describe()} M={m}: " + ", ".join(f"{lb} {row[lb]:.1f} us" for lb in methods), flush=True)
            del layer, dense, w64
            if cuda:
                torch.cuda.empty_cache()
    lines = [head, "", "Median us per call (eager); speed = bf16 time / method time. Every cell passed a float64 check (rel L2 < 1e-2) unless listed under FAILED.", "",
             "| shape | FP8 kind | M | bf16 us | w8a16 us | w8a16 torch us | w8a8 emul us | w8a8 us (path) | w8a16 vs bf16 | w8a8 vs bf16 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['spec']} | {r['m']} | {r['bf16']:.1f} | {r['w8a16']:.1f} | {r['w8a16 torch']:.1f} | "
            f"{r['w8a8 emul']:.1f} | {r['w8a8']:.1f} ({r['path']}) | {r['bf16'] / r['w8a16']:.2f}x | {r['bf16'] / r['w8a8']:.2f}x |"
        )
    lines += [f"FAILED: {f}" for f in failures]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": card, "rows": rows, "failures": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
