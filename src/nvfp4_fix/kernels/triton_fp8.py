"""Triton W8A16 kernel for the FP8 layers: y = x @ (e4m3 W * scale).T straight from the 8-bit weight.

One ``tl.dot`` kernel for small M (decode and short prompts): each program loads a [BN, BK] tile of
e4m3 codes, converts it to x's dtype (exact: every e4m3 value is a bf16 and an fp16 number) and
multiplies with tensor cores in fp32. The checkpoint's scale is applied to the fp32 partial sums: once
in the epilogue for per-tensor and per-channel scales, after every K tile for block scales (the tile
then lies inside one block column, ``BK`` divides the block width). Split-K writes fp32 partials
that one ``sum`` adds. Runs on the GPU, and on the CPU under ``TRITON_INTERPRET=1`` for the tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..schemes import FP8Spec
from .device import on_device_of

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Largest M this kernel takes; above it, dequantizing into a bf16 scratch + cuBLAS wins
#: (benchmarks/bench_fp8.py measures both).
MAX_M = 64


@triton.jit
def _fp8_mm_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sr,
    stride_os,
    stride_om,
    scale_rows,
    scale_cols,
    k_per_split,
    PER_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    srow = s_ptr + (offs_n // scale_rows) * stride_sr
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_start = pid_s * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
            mask=n_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        part = tl.dot(x, tl.trans(w.to(x.dtype)))
        if PER_K:
            s = tl.load(srow + k0 // scale_cols, mask=n_ok, other=0.0)
            acc += part * s[None, :]
        else:
            acc += part
    if not PER_K:
        acc = acc * tl.load(srow, mask=n_ok, other=0.0)[None, :]
    out = out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def _geometry(spec: FP8Spec, n: int, k: int) -> tuple[int, int, bool] | None:
    """(rows, columns) one scale covers, and whether the scale changes along K; None if unsupported."""
    if spec.weights == "tensor":
        return n, k, False
    if spec.weights == "channel":
        return 1, k, False
    if spec.block is None:
        return None
    bn, bk = spec.block
    return (bn, bk, True) if bk < k else (bn, bk, False)


def block_k(spec: FP8Spec, k: int) -> int | None:
    """The K tile: 128 where the scale allows, else the largest power of two (>= 16) dividing the
    block width; None where there is none (the caller falls back to the torch path)."""
    geo = _geometry(spec, 1, k)
    if geo is None:
        return None
    if not geo[2]:
        return 128
    for bk in (128, 64, 32, 16):
        if geo[1] % bk == 0:
            return bk
    return None


def supports(x2: torch.Tensor, spec: FP8Spec, k: int) -> bool:
    """Whether the kernel can run this call: fp16/bf16 x, M <= MAX_M, on CUDA sm_89+ (Triton's e4m3
    type) or the CPU interpreter."""
    on_card = x2.is_cuda and torch.cuda.get_device_capability(x2.device) >= (8, 9)
    return (
        (on_card or (_INTERPRET and x2.device.type == "cpu"))
        and x2.dtype in (torch.float16, torch.bfloat16)
        and 0 < x2.shape[0] <= MAX_M
        and block_k(spec, k) is not None
    )


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def fp8_linear(
    x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, spec: FP8Spec, bias: torch.Tensor | None
) -> torch.Tensor:
    """x2 [M, K] (fp16/bf16) @ (W [N, K] e4m3 * scale).T (+ bias) -> [M, N] in x2's dtype."""
    m, k = x2.shape
    n = weight.shape[0]
    geo = _geometry(spec, n, k)
    bk = block_k(spec, k)
    if geo is None or bk is None:
        raise ValueError(f"the Triton FP8 kernel cannot run {spec.describe()} with K={k}")
    rows, cols, per_k = geo
    x2 = x2.contiguous()
    s = scale.detach().to(torch.float32).reshape(-(-n // rows), -1).contiguous()
    bm, bn = 16 if m <= 16 else (32 if m <= 32 else 64), 64
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    k_tiles = triton.cdiv(k, bk)
    split = max(1, min(k_tiles, (2 * _sm_count(x2.device)) // tiles, 16))
    k_per_split = triton.cdiv(k_tiles, split) * bk
    split = triton.cdiv(k, k_per_split)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
    with on_device_of(x2):
        _fp8_mm_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), split)](
            x2, weight, s, part, m, n, k,
            x2.stride(0), weight.stride(0), s.stride(0), part.stride(0), part.stride(1),
            rows, cols, k_per_split,
            PER_K=per_k, BM=bm, BN=bn, BK=bk, num_warps=4,
        )  # fmt: skip
    y = (part[0] if split == 1 else part.sum(0)).to(x2.dtype)
    return y if bias is None else y + bias.to(y.dtype)
