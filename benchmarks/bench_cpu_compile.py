"""Where torch.compile pays on the CPU: the packed GEMV (M = 1) eager against compiled (and the first
call's compile time), and the chunked dequantize + matmul, per layer shape. Prints a markdown table.

    PYTHONPATH=src python benchmarks/bench_cpu_compile.py [--repeats 20]

The shapes: the demo model's layers (256 x 256, 688 x 256, 256 x 688) and 2048 / 4096-wide layers of
real models. The result decides ``settings.cpu_compile_min_weights``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from nvfp4_fix import settings
from nvfp4_fix.codec import quantize
from nvfp4_fix.kernels import cpu

SHAPES = [(256, 256), (688, 256), (256, 688), (2048, 2048), (4096, 4096), (14336, 4096)]


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    cpu_name = platform.processor() or platform.machine()
    print(f"CPU: {cpu_name}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| N x K | eager GEMV ms | compiled GEMV ms | first compiled call s | chunked ms |")
    print("|---|---:|---:|---:|---:|")
    for n, k in SHAPES:
        wp, ws, g = quantize(torch.randn(n, k) * 0.02, "multiplier")
        mul = g.reshape(())
        x = torch.randn(1, k, dtype=torch.bfloat16)
        with settings.override(cpu_compile=False):
            eager = timed(lambda: cpu.gemv_compiled(x, wp, ws, mul), args.repeats)  # noqa: B023
            chunked = timed(lambda: cpu.linear_chunked(x, wp, ws, mul), args.repeats)  # noqa: B023
        with settings.override(cpu_compile=True):
            t = time.perf_counter()
            cpu.gemv_compiled(x, wp, ws, mul, force_compile=True)
            first = time.perf_counter() - t
            compiled = timed(lambda: cpu.gemv_compiled(x, wp, ws, mul, force_compile=True), args.repeats)  # noqa: B023
        print(f"| {n} x {k} | {eager:.3f} | {compiled:.3f} | {first:.1f} | {chunked:.3f} |", flush=True)


if __name__ == "__main__":
    main()
