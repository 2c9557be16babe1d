# ruff: noqa: E501, B023  (the closures run inside the iteration that binds them)
"""Decode attention (one query token over a static KV cache), Llama-3-8B shape, batch 1: the Triton
split-KV kernel (kernels/decode_attention.py) at several block sizes, warps and split counts, against
SDPA as transformers calls it (K/V repeated to every query head, bool mask over the whole cache) and
SDPA with the query heads folded (the ``pack_gqa`` path). Times are medians of CUDA-graph replays.

    PYTHONPATH=src python3 benchmarks/bench_decode_attention.py [--lengths 512,2432,8448] [--sweep]

The cache holds ``length`` positions of which the first ``length - 384`` are filled (the rest is
masked, as in a generation with 256 new tokens); "ideal" is the filled K/V bytes at 3.0 TB/s.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import bench_graph  # noqa: E402
from llama8b import card_name, versions  # noqa: E402

from nvfp4_fix.kernels import decode_attention as DA  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="512,2432,8448")
    ap.add_argument("--sweep", action="store_true", help="block size x warps x programs per SM")
    args = ap.parse_args()
    print(f"# {card_name()}; {versions()}")
    h, hkv, d = 32, 8, 128
    dt = torch.bfloat16
    print("| cache L | filled | variant | us | vs ideal | max abs err vs fp64 |")
    print("|---:|---:|---|---:|---:|---:|")
    for length in map(int, args.lengths.split(",")):
        filled = max(1, length - 384)
        torch.manual_seed(length)
        q = torch.randn(1, h, 1, d, device="cuda", dtype=dt)
        k = torch.randn(1, hkv, length, d, device="cuda", dtype=dt)
        v = torch.randn(1, hkv, length, d, device="cuda", dtype=dt)
        mask = torch.zeros(1, 1, 1, length, dtype=torch.bool, device="cuda")
        mask[..., :filled] = True
        scale = d**-0.5
        kr, vr = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
        ref = F.scaled_dot_product_attention(
            q.double(), kr[..., :filled, :].double(), vr[..., :filled, :].double(), scale=scale
        ).transpose(1, 2)
        ideal = 2 * hkv * filled * d * 2 / 3.0e12 * 1e6

        def row(name: str, fn, out) -> None:
            us = bench_graph(lambda i: fn(), n_inner=20, reps=30)
            err = (out().double() - ref).abs().max().item()
            print(f"| {length} | {filled} | {name} | {us:.1f} | {ideal / us:.2f} | {err:.1e} |", flush=True)

        def sdpa_repeat():
            kk, vv = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale).transpose(1, 2)

        def sdpa_folded():
            o = F.scaled_dot_product_attention(
                q.reshape(1, hkv, h // hkv, d), k, v, attn_mask=mask, scale=scale
            )
            return o.reshape(1, h, 1, d).transpose(1, 2)

        row("sdpa, repeat_kv (transformers)", sdpa_repeat, sdpa_repeat)
        row("sdpa, heads folded (pack_gqa)", sdpa_folded, sdpa_folded)
        default = lambda: DA.decode_attention(q, k, v, mask, scale)  # noqa: E731
        row(
            f"triton split-KV (default: block {DA.block_size(length, q.device)}, {DA.NUM_WARPS} warps, {DA.PROGRAMS_PER_SM}/SM)",
            default,
            default,
        )
        if args.sweep:
            for bn, warps, per_sm in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 4)):
                fn = lambda bn=bn, warps=warps, per_sm=per_sm: DA.decode_attention(  # noqa: E731
                    q, k, v, mask, scale, block_n=bn, num_warps=warps, programs_per_sm=per_sm
                )
                try:
                    row(f"triton block {bn}, {warps} warps, {per_sm}/SM", fn, fn)
                except Exception as e:  # noqa: BLE001 - out of resources for a config
                    print(
                        f"| {length} | {filled} | block {bn}, {warps} warps, {per_sm}/SM | failed: {type(e).__name__} | | |"
                    )


if __name__ == "__main__":
    main()
