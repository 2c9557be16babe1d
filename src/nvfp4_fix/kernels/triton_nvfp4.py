"""Triton kernels computing y = x @ W.T straight from packed NVFP4 (W4A16).

Three kernels:

* ``_gemv_kernel``: M == 1 rows (decode). CUDA-core FMA. The packed weight is read as int32 words
  (8 codes, half of a 16-block), each code turned into float32 bits with two shifts and a LOP3
  (``DEQ=0``: E2M1 -> fp32 bits ``(mag << 22) | (sign << 31)``, which is value * 2^-126 exactly, the
  subnormal 0.5 included; x is pre-multiplied by 2^32 so every product is a normal fp32 number) or
  through fp16 bits (``DEQ=1``: ``(mag << 9) | (sign << 15)`` = value * 2^-14, then cvt to fp32).
  Per-16-block partial sums get one e4m3 scale multiply per block; 2^94 (or 2^14) and the per-tensor
  multiplier are one epilogue factor. Split-K writes fp32 partials that ``_splitk_reduce_kernel``
  sums (no memset, no atomics).
* ``_mm_kernel``: any M (used for 2 <= M <= 16 decode with BM=16 and for prefill). Dequantizes a
  [BN, BK] tile in registers to x.dtype (e2m1 * e4m3 is exact in bf16 and fp16: <= 6 significant
  bits, range 2^-10..2688) and multiplies with ``tl.dot`` (tensor cores, fp32 accumulation); the
  per-tensor multiplier is applied in fp32 in the epilogue.
* ``_dequant_kernel``: packed -> dense x.dtype rows (value * scale * multiplier), for the
  dequantize-into-scratch + cuBLAS prefill path.

The FP4 and e4m3 decoders live in ``triton_dequant.py``; the scales are read as raw bytes (uint8
view) and decoded with integer ops, so every kernel also runs under ``TRITON_INTERPRET=1`` on the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_dequant import (
    EPI_F16,
    EPI_F32,
    GEMV_WORD_ASM,
    X_PRESCALE_F32,
    _dequant_tile,
    _e2m1_nibble_f16,
    _e2m1_word_f16,
    _e2m1_word_f32,
    _e4m3_to_f32,
)


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] fp16/bf16, row stride stride_xm, unit column stride
    w_ptr,  # [N, K/8] int32 view of the packed bytes
    s_ptr,  # [N, K/16] uint8 view of the e4m3 block scales
    y_ptr,  # [M, N] output (x.dtype) or [SPLIT, M, N] fp32 workspace
    mul_ptr,  # float32: the per-tensor multiplier, or [N] per-row ones (MUL_ROWS)
    b_ptr,  # [N] bias or dummy
    M,
    N,
    KW,  # K / 8 (int32 words per row)
    KB,  # K / 16 (blocks per row)
    stride_xm,
    stride_ym,
    words_per_split,  # multiple of BKW
    BN: tl.constexpr,
    BKW: tl.constexpr,  # words per row per iteration (even)
    USE_WS: tl.constexpr,  # split-K: write fp32 partials [split, M, N]
    EVEN_K: tl.constexpr,
    DEQ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MUL_ROWS: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rn_c = tl.minimum(rn, N - 1).to(tl.int64)  # clamp: rows past N load row N-1, never stored
    rw = tl.arange(0, BKW)
    rb = tl.arange(0, BKW // 2)
    kw0 = pid_k * words_per_split
    kw_end = tl.minimum(kw0 + words_per_split, KW)
    w_base = w_ptr + rn_c[:, None] * KW + rw[None, :]
    s_base = s_ptr + rn_c[:, None] * KB + rb[None, :]
    x_base = x_ptr + m.to(tl.int64) * stride_xm + rw * 8
    acc = tl.zeros([BN, BKW], dtype=tl.float32)
    for kw in range(kw0, kw_end, BKW):
        if EVEN_K:
            words = tl.load(w_base + kw, cache_modifier=".cg")
            sc = tl.load(s_base + kw // 2, cache_modifier=".cg")
        else:
            words = tl.load(w_base + kw, mask=((kw + rw) < kw_end)[None, :], other=0, cache_modifier=".cg")
            sc = tl.load(
                s_base + kw // 2, mask=((kw + 2 * rb) < kw_end)[None, :], other=0, cache_modifier=".cg"
            )
        if DEQ == 2:
            # packed PTX: one instance per word -> sum_j w_j * x_j over its 8 codes (value * 2^-14)
            if EVEN_K:
                x0 = tl.load(x_base + kw * 8 + 0).to(tl.float32)
                x1 = tl.load(x_base + kw * 8 + 1).to(tl.float32)
                x2 = tl.load(x_base + kw * 8 + 2).to(tl.float32)
                x3 = tl.load(x_base + kw * 8 + 3).to(tl.float32)
                x4 = tl.load(x_base + kw * 8 + 4).to(tl.float32)
                x5 = tl.load(x_base + kw * 8 + 5).to(tl.float32)
                x6 = tl.load(x_base + kw * 8 + 6).to(tl.float32)
                x7 = tl.load(x_base + kw * 8 + 7).to(tl.float32)
            else:
                km = (kw + rw) < kw_end
                x0 = tl.load(x_base + kw * 8 + 0, mask=km, other=0.0).to(tl.float32)
                x1 = tl.load(x_base + kw * 8 + 1, mask=km, other=0.0).to(tl.float32)
                x2 = tl.load(x_base + kw * 8 + 2, mask=km, other=0.0).to(tl.float32)
                x3 = tl.load(x_base + kw * 8 + 3, mask=km, other=0.0).to(tl.float32)
                x4 = tl.load(x_base + kw * 8 + 4, mask=km, other=0.0).to(tl.float32)
                x5 = tl.load(x_base + kw * 8 + 5, mask=km, other=0.0).to(tl.float32)
                x6 = tl.load(x_base + kw * 8 + 6, mask=km, other=0.0).to(tl.float32)
                x7 = tl.load(x_base + kw * 8 + 7, mask=km, other=0.0).to(tl.float32)
            part = tl.inline_asm_elementwise(
                GEMV_WORD_ASM,
                "=f,r,f,f,f,f,f,f,f,f",
                [
                    words,
                    x0[None, :],
                    x1[None, :],
                    x2[None, :],
                    x3[None, :],
                    x4[None, :],
                    x5[None, :],
                    x6[None, :],
                    x7[None, :],
                ],
                dtype=tl.float32,
                is_pure=True,
                pack=1,
            )
        else:
            part = tl.zeros([BN, BKW], dtype=tl.float32)
            for j in tl.static_range(8):
                if EVEN_K:
                    xj = tl.load(x_base + kw * 8 + j).to(tl.float32)
                else:
                    xj = tl.load(x_base + kw * 8 + j, mask=(kw + rw) < kw_end, other=0.0).to(tl.float32)
                if DEQ == 0:
                    wj = _e2m1_word_f32(words, j)
                    xj = xj * X_PRESCALE_F32
                else:
                    wj = _e2m1_word_f16(words, j)
                part = tl.fma(wj, xj[None, :], part)  # explicit FMA (fp fusion may be off)
        sf = _e4m3_to_f32(sc.to(tl.int32))
        acc += part * tl.reshape(tl.join(sf, sf), (BN, BKW))
    y = tl.sum(acc, axis=1)
    if DEQ == 0:
        y = y * EPI_F32
    else:
        y = y * EPI_F16
    y = y * tl.load(mul_ptr + rn_c) if MUL_ROWS else y * tl.load(mul_ptr)
    nmask = rn < N
    if not USE_WS:
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + m.to(tl.int64) * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)
    else:
        tl.store(y_ptr + (pid_k * M + m).to(tl.int64) * N + rn, y, mask=nmask)


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr, y_ptr, b_ptr, M, N, stride_ym, SPLIT, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr
):
    """y[m, n] = sum_s ws[s, m, n] (+ bias[n]), cast to y's dtype."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mn = M * N
    mask = offs < mn
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(ws_ptr + s * mn + offs, mask=mask, other=0.0)
    row = offs // N
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + col, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mm_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K/2] uint8
    s_ptr,  # [N, K/16] uint8 (e4m3 bits)
    y_ptr,  # [M, N] out or [SPLIT, M, N] fp32 workspace
    mul_ptr,
    b_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_ym,
    k_per_split,  # multiple of BK
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    USE_WS: tl.constexpr,  # split-K: write fp32 partials [split, M, N]
    EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GROUP_M: tl.constexpr,
    ASM: tl.constexpr = True,  # packed PTX dequantization (False: plain Triton, for the interpreter)
    DOT_F32: tl.constexpr = False,  # interpreter only: its bf16 tl.dot is broken
    MUL_ROWS: tl.constexpr = False,  # mul_ptr holds one multiplier per output feature
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rm_c = tl.minimum(rm, M - 1).to(tl.int64)
    rn_c = tl.minimum(rn, N - 1).to(tl.int64)
    rk = tl.arange(0, BK)
    rk2 = tl.arange(0, BK // 2)
    rkb = tl.arange(0, BK // 16)
    K2 = K // 2
    KB = K // 16
    k0 = pid_k * k_per_split
    k_end = tl.minimum(k0 + k_per_split, K)
    x_base = x_ptr + rm_c[:, None] * stride_xm + rk[None, :]
    w_base = w_ptr + rn_c[:, None] * K2 + rk2[None, :]
    s_base = s_ptr + rn_c[:, None] * KB + rkb[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k in range(k0, k_end, BK):
        if EVEN_K:
            xt = tl.load(x_base + k)
            wb = tl.load(w_base + k // 2)
            sb = tl.load(s_base + k // 16)
        else:
            xt = tl.load(x_base + k, mask=(k + rk)[None, :] < k_end, other=0.0)
            wb = tl.load(w_base + k // 2, mask=(k + 2 * rk2)[None, :] < k_end, other=0)
            sb = tl.load(s_base + k // 16, mask=(k + 16 * rkb)[None, :] < k_end, other=0)
        w = _dequant_tile(wb, sb, x_ptr.dtype.element_ty, BN, BK, ASM)
        if DOT_F32:
            xt = xt.to(tl.float32)
            w = w.to(tl.float32)
        if DOT_F32:
            acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(w), acc)
    if MUL_ROWS:
        acc = acc * (tl.load(mul_ptr + rn_c) * 128.0)[None, :]  # tiles carry value * scale * 2^-7
    else:
        acc = acc * (tl.load(mul_ptr) * 128.0)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if not USE_WS:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        ptrs = y_ptr + (pid_k * M + rm).to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _dequant_kernel(
    w_ptr,  # [N, K/2] uint8
    s_ptr,  # [N, K/16] uint8
    mul_ptr,
    out_ptr,  # [rows, K] dense, row stride K
    row0,
    rows,
    N,
    K,
    BN: tl.constexpr,
    BK: tl.constexpr,
    ASM: tl.constexpr = False,
    MUL_ROWS: tl.constexpr = False,  # mul_ptr holds one multiplier per row of W
):
    """out[r, :] = dequant(W[row0 + r, :]) * multiplier, rounded once to out's dtype."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rk2 = pid_k * (BK // 2) + tl.arange(0, BK // 2)
    rkb = pid_k * (BK // 16) + tl.arange(0, BK // 16)
    src = (row0 + rn).to(tl.int64)
    nmask = ((row0 + rn) < N) & (rn < rows)
    wb = tl.load(
        w_ptr + src[:, None] * (K // 2) + rk2[None, :], mask=nmask[:, None] & (rk2 < K // 2)[None, :], other=0
    )
    sb = tl.load(
        s_ptr + src[:, None] * (K // 16) + rkb[None, :],
        mask=nmask[:, None] & (rkb < K // 16)[None, :],
        other=0,
    )
    if MUL_ROWS:
        mul = tl.load(mul_ptr + src, mask=nmask, other=0.0)[:, None]
    else:
        mul = tl.load(mul_ptr)
    if ASM:  # exact value * scale * 2^-7 in a 16-bit type, then one fp32 multiply and one rounding
        if out_ptr.dtype.element_ty == tl.float16:
            w16 = _dequant_tile(wb, sb, tl.float16, BN, BK, True)
        else:
            w16 = _dequant_tile(wb, sb, tl.bfloat16, BN, BK, True)
        w = w16.to(tl.float32) * (mul * 128.0)
    else:
        wb = wb.to(tl.int32)
        lo = _e2m1_nibble_f16(wb & 15)
        hi = _e2m1_nibble_f16(wb >> 4)
        v = tl.reshape(tl.join(lo, hi), (BN, BK // 16, 16)).to(tl.float32)
        sf = _e4m3_to_f32(sb.to(tl.int32)) * 16384.0
        w = tl.reshape(v * sf[:, :, None], (BN, BK)) * mul
    rk = pid_k * BK + tl.arange(0, BK)
    optrs = out_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]
    tl.store(optrs, w.to(out_ptr.dtype.element_ty), mask=nmask[:, None] & (rk < K)[None, :])
