"""Triton W8A16 kernels for the FP8 layers: y = x @ (e4m3 W * scale).T from the 8-bit weight.

* ``fp8_linear``, small M (decode and short prompts): one ``tl.dot`` kernel; each program loads a
  [BN, BK] tile of e4m3 codes, converts it to x's dtype (exact: every e4m3 value is a bf16 and an fp16
  number) and multiplies with tensor cores in fp32. The checkpoint's scale is applied to the fp32
  partial sums: once in the epilogue for per-tensor and per-channel scales, after every K tile for
  block scales (the tile then lies inside one block column, ``BK`` divides the block width). Split-K
  writes fp32 partials that one ``sum`` adds. Needs Triton's e4m3 type (sm_89+).
* ``dequant_mm``, larger M: ``dequantize_rows`` writes float32(code) * scale, rounded once to x's dtype
  (the value ``fp8.dequantize_fp8`` gives), for a chunk of rows into a scratch of at most
  ``settings.scratch_mb``; cuBLAS multiplies each chunk. The codes are decoded from their bits with
  integer ops, so it runs on any CUDA card.

Both run on the GPU, and on the CPU under ``TRITON_INTERPRET=1`` for the tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..schemes import FP8Spec
from .device import device_index, on_device_of, sm_count
from .triton_dequant import _e4m3_to_f32
from .triton_ops import scratch_bytes_default, scratch_matmul

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Largest M the tl.dot kernel takes; above it, dequantizing into a bf16 scratch + cuBLAS. On an H100
#: (benchmarks/RESULTS-fp8.md, whose "other" column is the path the dispatch did not take) the tl.dot
#: kernel won at M = 128 on every shape and FP8 kind (1.05-1.68x) and dequantize + cuBLAS at M = 2048.
MAX_M = 128
#: (BN, BK, num_warps) of the dequantize kernel (untuned; benchmarks/bench_fp8.py --sweep-dequant).
DEQUANT_CFG: tuple[int, int, int] = (16, 512, 4)


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


@triton.jit
def _fp8_dequant_kernel(
    w_ptr,  # [N, K] e4m3 codes read as uint8
    s_ptr,  # [R, C] float32
    out_ptr,  # [rows, K]
    row0,
    rows,
    K,
    stride_wn,
    stride_sr,
    stride_on,
    scale_rows,
    scale_cols,
    GATHER: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """out[r, :] = float32(W[row0 + r, :]) * scale, rounded once to out's dtype. Unless GATHER, the
    tile lies inside one column of scales (BK divides scale_cols, or the scale is one column)."""
    k0 = tl.program_id(1) * BK
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = k0 + tl.arange(0, BK)
    ok = (rn < rows)[:, None] & (rk < K)[None, :]
    wn = (row0 + rn).to(tl.int64)
    b = tl.load(w_ptr + wn[:, None] * stride_wn + rk[None, :], mask=ok, other=0).to(tl.int32)
    v = _e4m3_to_f32(b)
    v = tl.where((b & 0x7F) == 0x7F, float("nan"), v)
    srow = s_ptr + (wn // scale_rows) * stride_sr
    if GATHER:
        s = tl.load(srow[:, None] + (rk // scale_cols)[None, :], mask=ok, other=0.0)
    else:
        s = tl.load(srow + k0 // scale_cols, mask=rn < rows, other=0.0)[:, None]
    out = out_ptr + rn.to(tl.int64)[:, None] * stride_on + rk[None, :]
    tl.store(out, (v * s).to(out_ptr.dtype.element_ty), mask=ok)


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
    return sm_count(device_index(device))


def fp8_linear(
    x2: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, spec: FP8Spec, bias: torch.Tensor | None
) -> torch.Tensor:
    """x2 [M, K] (fp16/bf16) @ (W [N, K] e4m3 * scale).T (+ bias) -> [M, N] in x2's dtype."""
    m, k = x2.shape
    n = weight.shape[0]
    bk = block_k(spec, k)
    if bk is None:
        raise ValueError(f"the Triton FP8 kernel cannot run {spec.describe()} with K={k}")
    s, rows, cols, per_k = _scale_grid(scale, spec, n, k)
    x2 = x2.contiguous()
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


def _scale_grid(scale: torch.Tensor, spec: FP8Spec, n: int, k: int) -> tuple[torch.Tensor, int, int, bool]:
    geo = _geometry(spec, n, k)
    if geo is None:
        raise ValueError(f"{spec.describe()}: block scales without a block size")
    rows, cols, per_k = geo
    s = scale.detach().to(torch.float32).reshape(-(-n // rows), -1).contiguous()
    return s, rows, cols, per_k


def dequantize_rows(
    weight: torch.Tensor,
    scale: torch.Tensor,
    spec: FP8Spec,
    dtype: torch.dtype,
    row0: int = 0,
    rows: int | None = None,
    *,
    out: torch.Tensor | None = None,
    cfg: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Dense rows [row0, row0 + rows) of W [N, K] e4m3 in ``dtype``; ``out`` (contiguous rows) if given;
    ``cfg``: (BN, BK, num_warps), default DEQUANT_CFG."""
    n, k = weight.shape
    rows = n - row0 if rows is None else rows
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    s, scale_rows, scale_cols, per_k = _scale_grid(scale, spec, n, k)
    if out is None:
        out = torch.empty((rows, k), dtype=dtype, device=weight.device)
    bn, bk, warps = cfg or DEQUANT_CFG
    while bk > 16 and bk // 2 >= k:
        bk //= 2
    gather = False
    if per_k:  # a tile inside one block column: the widest power of two dividing the block width
        fit = bk
        while fit > 16 and scale_cols % fit:
            fit //= 2
        gather = scale_cols % fit != 0
        if not gather:
            bn, bk = bn * bk // fit, fit
    with on_device_of(weight):
        _fp8_dequant_kernel[(triton.cdiv(rows, bn), triton.cdiv(k, bk))](
            weight.view(torch.uint8), s, out, row0, rows, k,
            weight.stride(0), s.stride(0), out.stride(0), scale_rows, scale_cols,
            GATHER=gather, BN=bn, BK=bk, num_warps=warps,
        )  # fmt: skip
    return out


def dequant_supports(x2: torch.Tensor, spec: FP8Spec) -> bool:
    """Whether ``dequant_mm`` can run this call: fp16/bf16/fp32 x on CUDA or the CPU interpreter."""
    return (
        (x2.is_cuda or (_INTERPRET and x2.device.type == "cpu"))
        and x2.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and x2.shape[0] > 0
        and _geometry(spec, 1, 1) is not None
    )


def dequant_mm(
    x2: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    spec: FP8Spec,
    bias: torch.Tensor | None,
    *,
    scratch_bytes: int | None = None,
) -> torch.Tensor:
    """x2 [M, K] @ (W [N, K] e4m3 * scale).T (+ bias) -> [M, N] in x2's dtype: W dequantized into a
    scratch of at most ``scratch_bytes`` (default settings.scratch_mb) a chunk of rows at a time, each
    chunk multiplied by cuBLAS."""
    budget = scratch_bytes_default() if scratch_bytes is None else scratch_bytes

    def rows(r0: int, r: int, scratch: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(weight, scale, spec, x2.dtype, r0, r, out=scratch)

    return scratch_matmul(x2, weight.shape[0], rows, bias, budget, 64)
