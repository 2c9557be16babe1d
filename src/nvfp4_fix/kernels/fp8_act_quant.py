"""FP8 activation quantization for ``torch._scaled_mm`` in one Triton launch: e4m3 codes and scales.

The checkpoint's dynamic per-token (or static per-tensor) FP8 activation quantization, as
``fp8.fake_quantize_fp8`` (compressed-tensors' forward) does it, in the activation dtype:
``scale = amax / 448`` rounded to that dtype (0 becomes the dtype's eps) or the static input scale,
then ``codes = e4m3(clamp(dtype(x / scale), -448, 448))``. Done with torch ops that is about ten
launches a layer (abs, amax, divide, where, divide, clamp, cast, the scale's float copy); here each
program reads one token row once for its amax, then again to write its codes and its float32 scale.
The division is IEEE (``div_rn``) so the codes are bit-equal to the torch ops'.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .device import on_device_of

__all__ = ["quantize_rows", "supports"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FP8_MAX = tl.constexpr(448.0)
#: (mantissa bits, minimum normal exponent) of each activation dtype
_FORMAT = {torch.bfloat16: (7, -126), torch.float16: (10, -14), torch.float32: (23, -126)}


@triton.jit
def _round(y, MANT: tl.constexpr, EMIN: tl.constexpr):
    """float32 y rounded to the nearest number with MANT mantissa bits and minimum normal exponent EMIN
    (e4m3: 3, -6; bf16: 7, -126; fp16: 10, -14), ties to even, as float32: adding and subtracting
    1.5 * 2^(23 + q), q the exponent of the target's quantum at y, rounds to that quantum in float32
    arithmetic. Used instead of casts so the rounding is the GPU's on Triton's interpreter too (which
    truncates bf16 casts and rounds fp8 casts its own way); the exact result then casts exactly."""
    if MANT >= 23:
        return y
    bits = y.to(tl.int32, bitcast=True)
    q = tl.maximum(((bits >> 23) & 0xFF) - 127, EMIN) - MANT
    magic = (((q + 150) << 23) | 0x400000).to(tl.float32, bitcast=True)
    rounded = ((tl.abs(y) + magic) - magic).to(tl.int32, bitcast=True)
    return (rounded | (bits & -0x80000000)).to(tl.float32, bitcast=True)  # the sign back, -0.0 too


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, stride_qm, eps,
    STATIC: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BK)
    if STATIC:
        scale = _round(tl.load(static_ptr).to(tl.float32), MANT, EMIN)
    else:
        amax = tl.zeros([BK], dtype=tl.float32)
        for k in range(0, K, BK):
            x = tl.load(x_ptr + row * stride_xm + k + cols, mask=k + cols < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = _round(tl.math.div_rn(tl.max(amax, 0), _FP8_MAX), MANT, EMIN)  # in x's dtype
        scale = tl.where(scale == 0.0, eps, scale)
    for k in range(0, K, BK):
        x = tl.load(x_ptr + row * stride_xm + k + cols, mask=k + cols < K, other=0.0)
        y = _round(tl.math.div_rn(x.to(tl.float32), scale), MANT, EMIN)  # x / scale in x's dtype
        y = _round(tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX), 3, -6)  # to e4m3, exactly
        tl.store(q_ptr + row * stride_qm + k + cols, y.to(tl.float8e4nv), mask=k + cols < K)
    tl.store(s_ptr + row, scale)


def supports(x2: torch.Tensor) -> bool:
    """Whether :func:`quantize_rows` takes x2 (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    on_device = x2.is_cuda or (_INTERPRET and x2.device.type == "cpu")
    return on_device and x2.dim() == 2 and x2.dtype in _FORMAT and x2.stride(1) == 1


def quantize_rows(
    x2: torch.Tensor, input_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [M, K] float8_e4m3fn, scales [M, 1] float32) of x2 [M, K]: one scale per row (dynamic
    per-token), or with ``input_scale`` (a static per-tensor scale, any float dtype, one element) that
    scale, rounded to x2's dtype, on every row."""
    if not supports(x2):
        raise ValueError(
            f"quantize_rows needs a 2-D fp32/fp16/bf16 tensor with unit column stride on CUDA, got "
            f"{tuple(x2.shape)} {x2.dtype} on {x2.device}"
        )
    m, k = x2.shape
    codes = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    static = input_scale is not None
    if static and input_scale.numel() != 1:
        raise ValueError(f"a static FP8 input scale has one element, got {tuple(input_scale.shape)}")
    static_arg = input_scale.reshape(1).to(device=x2.device) if static else scales
    if m == 0:
        return codes, scales
    bk = min(4096, triton.next_power_of_2(k))
    with on_device_of(x2):
        _quantize_rows_kernel[(m,)](
            x2, codes, scales, static_arg, k, x2.stride(0), codes.stride(0), torch.finfo(x2.dtype).eps,
            STATIC=static, MANT=_FORMAT[x2.dtype][0], EMIN=_FORMAT[x2.dtype][1], BK=bk, num_warps=4,
        )  # fmt: skip
    return codes, scales
