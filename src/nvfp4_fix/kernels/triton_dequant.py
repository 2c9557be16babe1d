"""The FP4 (E2M1) and E4M3 decoders shared by the Triton kernels, in plain Triton (interpreter) and as
packed PTX (GPU). Every decoder is exact: E2M1 x E4M3 fits bf16 and fp16, so a decoded weight equals
value * scale times a power of two that the kernel's epilogue removes."""

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
