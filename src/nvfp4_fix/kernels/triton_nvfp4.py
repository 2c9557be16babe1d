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

The e4m3 block scales are read as raw bytes (uint8 view) and decoded with integer ops, so every
kernel also runs under ``TRITON_INTERPRET=1`` on the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

# DEQ=0: weights come out as value * 2^-126, x is scaled by 2^32 -> partials carry 2^-94.
X_PRESCALE_F32 = tl.constexpr(4294967296.0)  # 2^32
EPI_F32 = tl.constexpr(2.0**94)
# DEQ=1: weights come out as value * 2^-14.
EPI_F16 = tl.constexpr(16384.0)


@triton.jit
def _e4m3_to_f32(s):
    """float8_e4m3fn bytes (as int32 0..255) -> float32, exactly (subnormals included)."""
    e = (s >> 3) & 15
    m = s & 7
    neg = (s & 128) != 0
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125  # m/8 * 2^-6
    mag = tl.where(e == 0, sub, normal)
    return tl.where(neg, -mag, mag)


@triton.jit
def _e2m1_word_f32(w, J: tl.constexpr):
    """Code J (0..7) of int32 words w -> float32 equal to value * 2^-126 (bit trick, no table)."""
    if 22 - 4 * J >= 0:
        mag = (w << (22 - 4 * J)) & 0x01C00000
    else:
        mag = (w >> (4 * J - 22)) & 0x01C00000
    sgn = (w << (28 - 4 * J)) & -2147483648
    return (mag | sgn).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_word_f16(w, J: tl.constexpr):
    """Code J (0..7) of int32 words w -> float32 equal to value * 2^-14 (through fp16 bits)."""
    if 9 - 4 * J >= 0:
        mag = (w << (9 - 4 * J)) & 0x0E00
    else:
        mag = (w >> (4 * J - 9)) & 0x0E00
    if 12 - 4 * J >= 0:
        sgn = (w << (12 - 4 * J)) & 0x8000
    else:
        sgn = (w >> (4 * J - 12)) & 0x8000
    return (mag | sgn).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e2m1_nibble_f16(c):
    """4-bit codes (int32 0..15) -> float16 equal to value * 2^-14."""
    return (((c & 8) << 12) | ((c & 7) << 9)).to(tl.int16).to(tl.float16, bitcast=True)


# One asm instance: 4 packed bytes (8 codes) + their 4 block scales (16-bit, pre-multiplied by 2^119
# for bf16 or 2^7 for fp16) -> 4 registers of 16-bit pairs: lo nibbles (even columns) of bytes
# (0,1), (2,3), then hi nibbles (odd columns) of bytes (0,1), (2,3). Per 2 codes: a prmt/shift share,
# 3 logic ops and one packed multiply (fma with -0.0) by the scale, subnormals kept: the E2M1 code is
# placed as value * 2^-126 (bf16, S=6) or value * 2^-14 (fp16, S=3), so the product is value * scale
# * 2^-7, exact in both formats; the epilogue multiplies by 2^7.
_DEQ_ASM = """
{
.reg .b32 t0, t1, u0, u1, a, b, nz, sc;
mov.b32 nz, 0x80008000;
cvt.rn.CVT sc, $5, $5;
prmt.b32 t0, $4, 0, 0x1404;
prmt.b32 t1, $4, 0, 0x3424;
shl.b32 u0, t0, 4;
shl.b32 u1, t1, 4;
and.b32 a, u0, 0x70007000;
shr.b32 a, a, SHIFT;
and.b32 b, u0, 0x80008000;
or.b32 a, a, b;
fma.rn.TYPE $0, a, sc, nz;
and.b32 a, u1, 0x70007000;
shr.b32 a, a, SHIFT;
and.b32 b, u1, 0x80008000;
or.b32 a, a, b;
fma.rn.TYPE $1, a, sc, nz;
and.b32 a, t0, 0x70007000;
shr.b32 a, a, SHIFT;
and.b32 b, t0, 0x80008000;
or.b32 a, a, b;
fma.rn.TYPE $2, a, sc, nz;
and.b32 a, t1, 0x70007000;
shr.b32 a, a, SHIFT;
and.b32 b, t1, 0x80008000;
or.b32 a, a, b;
fma.rn.TYPE $3, a, sc, nz;
}
"""
# $5..$8 are the (identical) fp32 scales of the 4 bytes: 4 consecutive bytes never straddle a
# 16-element block (8 bytes) because Triton packs 4-aligned groups of a contiguous, 8-aligned row.
DEQ_ASM_BF16 = tl.constexpr(
    _DEQ_ASM.replace("SHIFT", "6").replace("TYPE", "bf16x2").replace("CVT", "bf16x2.f32")
)
DEQ_ASM_F16 = tl.constexpr(
    _DEQ_ASM.replace("SHIFT", "3").replace("TYPE", "f16x2").replace("CVT", "f16x2.f32")
)


def _gemv_word_asm() -> str:
    """PTX: $0 = sum_{i<8} e2m1(code i of word $1) * 2^-14 * $(2+i). Codes i and i+4 sit in the two
    16-bit halves, so one shift and three logic ops make two fp16 values (value * 2^-14, subnormal
    0.5 included), each converted exactly to fp32 and FMA'd in fp32."""
    lines = ["{", ".reg .b32 t, a, b;", ".reg .b16 l, h;", ".reg .f32 f, acc;", "mov.f32 acc, 0f00000000;"]
    for j in range(4):
        sh = 12 - 4 * j
        lines.append(f"shl.b32 t, $1, {sh};" if sh else "mov.b32 t, $1;")
        lines += [
            "and.b32 a, t, 0x70007000;",
            "shr.b32 a, a, 3;",
            "and.b32 b, t, 0x80008000;",
            "or.b32 a, a, b;",
            "mov.b32 {l, h}, a;",
            "cvt.f32.f16 f, l;",
            f"fma.rn.f32 acc, f, ${2 + j}, acc;",
            "cvt.f32.f16 f, h;",
            f"fma.rn.f32 acc, f, ${6 + j}, acc;",
        ]
    lines += ["mov.f32 $0, acc;", "}"]
    return "\n".join(lines)


GEMV_WORD_ASM = tl.constexpr(_gemv_word_asm())


@triton.jit
def _dequant_tile(wb, sb, DT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr):
    """Packed bytes [BN, BK/2] (uint8) + e4m3 bytes [BN, BK/16] -> W tile [BN, BK] in DT equal to
    value * scale * 2^-7 (exact). ASM=True uses packed PTX (GPU); False plain Triton (interpreter)."""
    sf = _e4m3_to_f32(sb.to(tl.int32))  # [BN, BK/16]
    if ASM:
        if DT == tl.bfloat16:
            s32 = sf * 6.646139978924579e35  # 2^119
        else:
            s32 = sf * 128.0
        s32 = tl.reshape(tl.broadcast_to(s32[:, :, None], (BN, BK // 16, 8)), (BN, BK // 2))
        if DT == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise(
                DEQ_ASM_BF16,
                "=r,=r,=r,=r,r,r,r,r,r",
                [wb, s32],
                dtype=(tl.bfloat16, tl.bfloat16),
                is_pure=True,
                pack=4,
            )
        else:
            lo, hi = tl.inline_asm_elementwise(
                DEQ_ASM_F16,
                "=r,=r,=r,=r,r,r,r,r,r",
                [wb, s32],
                dtype=(tl.float16, tl.float16),
                is_pure=True,
                pack=4,
            )
        w = tl.reshape(tl.join(lo, hi), (BN, BK))
    else:
        wi = wb.to(tl.int32)
        lo = _e2m1_nibble_f16(wi & 15)
        hi = _e2m1_nibble_f16(wi >> 4)
        v = tl.reshape(tl.join(lo, hi), (BN, BK // 16, 16)).to(tl.float32)  # value * 2^-14
        w = tl.reshape(v * (sf * 0.0078125 * 16384.0)[:, :, None], (BN, BK)).to(DT)
    return w


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
