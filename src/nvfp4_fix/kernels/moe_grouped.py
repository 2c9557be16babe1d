"""Mixture-of-experts NVFP4 GEMM over routed (token, expert) pairs, grouped by expert, in Triton.

The pairs come laid out by ``moe_route.route`` (sorted by expert, each expert's run padded to
``block_m``; ``block_m_for`` picks it).

``expert_mm(x, x_div, plan, codes, scales, mul, rows_per_part)`` computes, for every pair p routed to
expert e, ``y[p] = x[p // x_div] @ W_e.T``. Decode-sized routings (``block_m`` 1, up to 64 pairs: batch 8
at top-8) skip the sorting: ``_pair_gemv_kernel`` runs one program per (pair, BN columns), loads the
pair's expert id and reads that expert's packed rows (at batch 1 every routed expert is distinct, so each
weight is read once). Larger routings: one program per (block, BN columns) reads expert e's packed
weight (``codes`` [E, N, K/2] uint8, ``scales`` [E, N, K/16] e4m3) by the id it loads from
``block_expert``, dequantizes [BN, BK] tiles in registers (the W4A16 GEMM's ``_dequant_tile``) and
multiplies with ``tl.dot`` (fp32 accumulation); ``mul`` [E, parts] float32 is each expert's per-tensor
multiplier per part of N (gate and up rows of one expert have their own), part = row //
``rows_per_part``. Blocks of padding exit at once, so one launch serves any routing and a CUDA graph
replays it for any routing. ``torch.ops.nvfp4_fix.moe_expert_mm`` wraps it for torch.compile.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .device import on_device_of
from .moe_route import INDEXED_MAX_PAIRS, RoutePlan
from .triton_dequant import _dequant_tile

__all__ = ["block_m_for", "expert_mm", "supports"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _expert_mm_kernel(
    x_ptr, pairs_ptr, block_expert_ptr, w_ptr, s_ptr, mul_ptr, rw_ptr, y_ptr,
    num_pairs, x_div, N, K, E, rows_per_part, parts, stride_xm, stride_ym, stride_we, stride_se, stride_me,
    stride_rw, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, WN: tl.constexpr,
    ASM: tl.constexpr, DOT_F32: tl.constexpr, HAS_RW: tl.constexpr, GLU: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e >= E:  # padding past the last expert's run, or pairs routed to no expert
        return
    p = tl.load(pairs_ptr + pid_m * BM + tl.arange(0, BM))
    valid = p < num_pairs
    xrow = (tl.where(valid, p, 0) // x_div).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)  # output columns
    r = tl.arange(0, WN)  # weight rows of the tile: BN, or 2 BN with GLU
    if GLU:  # gate rows n and up rows N + n interleaved (N = I); multipliers 0 and 1
        rows = tl.minimum(pid_n * BN + r // 2, N - 1) + (r % 2) * N
        part = r % 2
    else:
        rows = tl.minimum(pid_n * BN + r, N - 1)
        part = tl.minimum(rows // rows_per_part, parts - 1)
    rows = rows.to(tl.int64)
    rk = tl.arange(0, BK)
    rk2 = tl.arange(0, BK // 2)
    rkb = tl.arange(0, BK // 16)
    e64 = e.to(tl.int64)
    K2 = K // 2
    KB = K // 16
    x_base = x_ptr + xrow[:, None] * stride_xm + rk[None, :]
    w_base = w_ptr + e64 * stride_we + rows[:, None] * K2 + rk2[None, :]
    s_base = s_ptr + e64 * stride_se + rows[:, None] * KB + rkb[None, :]
    acc = tl.zeros([BM, WN], dtype=tl.float32)
    for k in range(0, K, BK):
        xt = tl.load(x_base + k, mask=valid[:, None] & ((k + rk)[None, :] < K), other=0.0)
        wb = tl.load(w_base + k // 2, mask=(k + 2 * rk2)[None, :] < K, other=0)
        sb = tl.load(s_base + k // 16, mask=(k + 16 * rkb)[None, :] < K, other=0)
        w = _dequant_tile(wb, sb, x_ptr.dtype.element_ty, WN, BK, ASM)
        if DOT_F32:
            acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(w), acc)
    mul = tl.load(mul_ptr + e64 * stride_me + part)
    acc = acc * (mul * 128.0)[None, :]  # tiles carry value * scale * 2^-7
    if GLU:
        gate, up = tl.split(tl.reshape(acc, (BM, BN, 2)))
        out = gate * tl.sigmoid(gate) * up
    else:
        out = acc
    if HAS_RW:
        rw = tl.load(rw_ptr + tl.where(valid, p, 0).to(tl.int64) * stride_rw, mask=valid, other=0.0)
        out = out * rw.to(tl.float32)[:, None]
    ptrs = y_ptr + tl.where(valid, p, 0).to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=valid[:, None] & (rn < N)[None, :])


@triton.jit
def _pair_gemv_kernel(
    x_ptr, expert_ptr, w_ptr, s_ptr, mul_ptr, rw_ptr, y_ptr,
    x_div, N, K, E, rows_per_part, parts, stride_xm, stride_ym, stride_we, stride_se, stride_me, stride_rw,
    BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, WDT: tl.constexpr, HAS_RW: tl.constexpr,
):  # fmt: skip
    """y[p, n-block] = x[p // x_div] @ W_{expert[p]}[n-block].T: one pair per program (CUDA cores)."""
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(expert_ptr + p)
    if (e < 0) | (e >= E):  # routed to no expert: the output row stays as it was
        return
    xrow = (p // x_div).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    rn_c = tl.minimum(rn, N - 1).to(tl.int64)
    rk = tl.arange(0, BK)
    rk2 = tl.arange(0, BK // 2)
    rkb = tl.arange(0, BK // 16)
    e64 = e.to(tl.int64)
    w_base = w_ptr + e64 * stride_we + rn_c[:, None] * (K // 2) + rk2[None, :]
    s_base = s_ptr + e64 * stride_se + rn_c[:, None] * (K // 16) + rkb[None, :]
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k in range(0, K, BK):
        xt = tl.load(x_ptr + xrow * stride_xm + k + rk, mask=(k + rk) < K, other=0.0).to(tl.float32)
        wb = tl.load(w_base + k // 2, mask=(k + 2 * rk2)[None, :] < K, other=0)
        sb = tl.load(s_base + k // 16, mask=(k + 16 * rkb)[None, :] < K, other=0)
        w = _dequant_tile(wb, sb, WDT, BN, BK, ASM)
        acc += w.to(tl.float32) * xt[None, :]
    part = tl.minimum(rn_c // rows_per_part, parts - 1)
    y = tl.sum(acc, 1)
    mul = tl.load(mul_ptr + e64 * stride_me + part)
    y = y * mul * 128.0  # tiles carry value * scale * 2^-7
    if HAS_RW:
        y = y * tl.load(rw_ptr + p.to(tl.int64) * stride_rw).to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + p.to(tl.int64) * stride_ym + rn, y, mask=rn < N)


def supports(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether :func:`expert_mm` takes these (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    return (
        (x.is_cuda or (_INTERPRET and x.device.type == "cpu"))
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and codes.dim() == 3
        and codes.dtype == torch.uint8
        and x.shape[-1] == 2 * codes.shape[2]
        and x.shape[-1] % 16 == 0
        and x.device == codes.device
    )


def block_m_for(num_pairs: int) -> int:
    """Pairs per tile: 1 (indexed) up to INDEXED_MAX_PAIRS, 16 up to 256, 64 beyond (prefill:
    tensor-core tiles)."""
    return 1 if num_pairs <= INDEXED_MAX_PAIRS else 16 if num_pairs <= 256 else 64


def expert_mm(
    x: torch.Tensor,
    x_div: int,
    plan: RoutePlan,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mul: torch.Tensor,
    rows_per_part: int,
    out: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    silu_glu: bool = False,
) -> torch.Tensor:
    """y [num_pairs, N] (x's dtype) with y[p] = x[p // x_div] @ W_{expert(p)}.T; rows of pairs routed to
    no expert are left as they were (``out``, default zeros). ``codes``/``scales``/``mul`` may be views
    of a slice of the experts' rows (e.g. the gate half of gate_up) as long as each row is contiguous.
    ``pair_weights`` [num_pairs]: y is float32 times each pair's weight, and rows of pairs routed to no
    expert are left unwritten (``out``, default uninitialized: ``moe_decode.sum_pairs`` skips them).
    ``silu_glu`` (``block_m`` > 1): codes hold each expert's I gate rows then its I up rows, ``mul`` [E, 2]
    their multipliers, and y [num_pairs, I] = silu(gate) * up (fp32 in the epilogue; rows of pairs routed
    to no expert unwritten, as with ``pair_weights``)."""
    e, n_rows, k2 = codes.shape
    k = 2 * k2
    n = n_rows // 2 if silu_glu else n_rows  # output columns
    rows_ok = all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (codes, scales))
    rows_ok = rows_ok and mul.dim() == 2 and mul.stride(1) == 1
    if scales.shape != (e, n_rows, k // 16) or mul.dim() != 2 or mul.shape[0] != e or not rows_ok:
        raise ValueError(
            f"expert weights: codes {tuple(codes.shape)}, scales {tuple(scales.shape)} (want "
            f"{(e, n_rows, k // 16)}), multipliers {tuple(mul.shape)} (want [{e}, parts]); each expert's "
            "rows must be contiguous"
        )
    if silu_glu and not (plan.block_m > 1 and n_rows % 2 == 0 and mul.shape[1] == 2 and rows_per_part == n):
        raise ValueError(f"silu_glu: gate and up rows [{e}, 2 x {n}] with multipliers [{e}, 2], block_m > 1")
    if out is not None:
        y = out
    elif pair_weights is not None or silu_glu:  # rows of pairs routed to no expert: never read
        dtype = torch.float32 if pair_weights is not None else x.dtype
        y = torch.empty(plan.num_pairs, n, dtype=dtype, device=x.device)
    else:
        y = torch.zeros(plan.num_pairs, n, dtype=x.dtype, device=x.device)
    has_rw = pair_weights is not None
    rw = pair_weights if pair_weights is not None else mul
    stride_rw = rw.stride(0)
    bn_max = 32 if silu_glu else 64  # GLU tiles hold 2 BN weight rows
    bn = bn_max if n >= bn_max else max(16, triton.next_power_of_2(n))
    bk = 128 if k % 128 == 0 or k > 128 else max(32, triton.next_power_of_2(k))
    grid = (plan.block_expert.numel(), triton.cdiv(n, bn))
    f32 = x.dtype == torch.float32
    asm = not (_INTERPRET or f32)  # packed-PTX dequantization: bf16/fp16 tiles on a GPU
    wdt = tl.float16 if x.dtype == torch.float16 else tl.bfloat16 if asm else tl.float32  # exact tiles
    if plan.block_m == 1:
        with on_device_of(x):
            _pair_gemv_kernel[(plan.num_pairs, triton.cdiv(n, bn))](
                x, plan.pairs, codes, scales.view(torch.uint8), mul, rw, y,
                x_div, n, k, e, rows_per_part, mul.shape[1], x.stride(0), y.stride(0),
                codes.stride(0), scales.stride(0), mul.stride(0), stride_rw,
                BN=bn, BK=bk, ASM=asm, WDT=wdt, HAS_RW=has_rw, num_warps=4,
            )  # fmt: skip
        return y
    with on_device_of(x):
        _expert_mm_kernel[grid](
            x, plan.pairs, plan.block_expert, codes, scales.view(torch.uint8), mul, rw, y,
            plan.num_pairs, x_div, n, k, e, rows_per_part, mul.shape[1], x.stride(0), y.stride(0),
            codes.stride(0), scales.stride(0), mul.stride(0), stride_rw,
            BM=plan.block_m, BN=bn, BK=bk, WN=2 * bn if silu_glu else bn, ASM=asm,
            DOT_F32=_INTERPRET or f32, HAS_RW=has_rw, GLU=silu_glu, num_warps=4, num_stages=3,
        )  # fmt: skip
    return y


@torch.library.custom_op("nvfp4_fix::moe_expert_mm", mutates_args=())
def _expert_mm_op(x: torch.Tensor, x_div: int, pairs: torch.Tensor, block_expert: torch.Tensor,
                  num_pairs: int, block_m: int, codes: torch.Tensor, scales: torch.Tensor, mul: torch.Tensor,
                  rows_per_part: int, pair_weights: torch.Tensor | None = None,
                  silu_glu: bool = False) -> torch.Tensor:  # fmt: skip
    plan = RoutePlan(pairs, block_expert, num_pairs, block_m)
    return expert_mm(x, x_div, plan, codes, scales, mul, rows_per_part, pair_weights=pair_weights,
                     silu_glu=silu_glu)  # fmt: skip


@_expert_mm_op.register_fake
def _expert_mm_fake(x, x_div, pairs, block_expert, num_pairs, block_m, codes, scales, mul, rows_per_part,
                    pair_weights=None, silu_glu=False):  # fmt: skip
    dtype = x.dtype if pair_weights is None else torch.float32
    return x.new_empty((num_pairs, codes.shape[1] // (2 if silu_glu else 1)), dtype=dtype)
