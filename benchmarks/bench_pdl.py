"""Programmatic dependent launch (``settings.pdl``) on a chain of this package's decode kernels alone.

32 "layers" of four NVFP4 linears at M = 1 with the 8B shape's weight traffic (4096 -> 14336 -> 4096 ->
6144 -> 4096: half of gate/up, down, q/k/v, an o-sized one), each linear reading the previous one's
output directly, so every launch boundary is one of ours. One CUDA graph per setting; replays timed
(median of 20, after 3 warm-up replays), pdl off and on in the same run, outputs compared bit for bit.

Usage (H100): python benchmarks/bench_pdl.py [--layers 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nvfp4_fix import settings  # noqa: E402
from nvfp4_fix.kernels import cuda_mma  # noqa: E402

CHAIN = ((14336, 4096), (4096, 14336), (6144, 4096), (4096, 6144))


def weight(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g, device="cuda")
    scales = (0.5 + torch.rand(n, k // 16, generator=g, device="cuda")).to(torch.float8_e4m3fn)
    # E2M1 codes uniform: rms ~2.9, scales ~1.0: outputs keep unit scale layer after layer
    return codes, scales, torch.tensor([1 / (3.05 * k**0.5)], device="cuda")


def chain(weights: list, x: torch.Tensor) -> torch.Tensor:
    for w in weights:
        x = cuda_mma.linear(x, *w)
    return x


def timed_graph(weights: list, x: torch.Tensor, pdl: bool) -> tuple[float, torch.Tensor]:
    with settings.override(pdl=pdl):
        chain(weights, x)  # compile and plan outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(weights, x)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), out.clone()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    g = torch.Generator("cuda").manual_seed(0)
    weights = [weight(n, k, g) for _ in range(args.layers) for n, k in CHAIN]
    nbytes = sum(w[0].numel() + w[1].numel() for w in weights)
    x = torch.randn(1, 4096, generator=g, device="cuda").to(torch.bfloat16)
    card = torch.cuda.get_device_name()
    rows = {pdl: timed_graph(weights, x, pdl) for pdl in (False, True, False, True)}
    off, on = rows[False], rows[True]
    same = torch.equal(off[1], on[1]) and bool(off[1].isfinite().all())
    print(f"| {card}: {len(weights)} cuda_mma launches, M = 1 | ms a replay | GB/s | launches' us each |")
    print("|---|---:|---:|---:|")
    for label, (ms, _) in (("plain launches", off), ("PDL (settings.pdl)", on)):
        print(f"| {label} | {ms:.3f} | {nbytes / ms / 1e6:.0f} | {1000 * ms / len(weights):.2f} |")
    rms = off[1].float().pow(2).mean().sqrt()
    print(f"outputs finite and equal bit for bit: {same} (output rms {rms:.3f})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
