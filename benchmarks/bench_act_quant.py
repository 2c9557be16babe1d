"""W4A4 activation fake-quantization: the fused Triton kernel against the torch reference ops.

    PYTHONPATH=src python benchmarks/bench_act_quant.py

Both timed as CUDA-graph replays of 10 calls (bench_kernels.bench_graph), bf16 activations.
"""

from __future__ import annotations

import torch
from bench_kernels import bench_graph

from nvfp4_fix.kernels import act_quant
from nvfp4_fix.layer import fake_quantize_activations


def main() -> None:
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| M x K | torch ops us | fused us | speedup | same bits |")
    print("|---|---|---|---|---|")
    for m, k in [(1, 4096), (1, 14336), (16, 4096), (2048, 4096), (2048, 14336)]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        g = (448.0 * 6.0 / x.float().abs().amax()).reshape(1)
        ref = bench_graph(lambda i, x=x, g=g: fake_quantize_activations(x, g))
        fused = bench_graph(lambda i, x=x, g=g: act_quant.fake_quantize(x, g))
        same = torch.equal(act_quant.fake_quantize(x, g), fake_quantize_activations(x, g))
        print(f"| {m} x {k} | {ref:.1f} | {fused:.1f} | {ref / fused:.1f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
