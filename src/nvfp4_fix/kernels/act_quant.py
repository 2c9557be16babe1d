"""NVFP4 fake quantization of activations (W4A4 checkpoints) in one Triton launch.

``fake_quantize(x, global_divisor)`` returns, bit for bit, what ``layer.fake_quantize_activations``
(the torch reference, about fifteen kernels) returns: per group of 16 values along the last dim,
scale = e4m3(divisor * dtype(amax / 6)) (0 becomes e4m3's eps, 0.125), step = scale / divisor,
value = nearest E2M1 grid point of x / step (ties to the even code) times step, rounded to x's dtype.
A group holding a NaN comes out all NaN, as in the reference. Each step is the op torch runs on that
device: correctly rounded divisions (``div_rn``), except ``amax / 6`` on CUDA, which torch computes
as amax * fp32(1/6) (it differs for fp32 activations); e4m3 and bf16 rounding use integer ops, so the
GPU and Triton's interpreter give the same bits.
"""

from __future__ import annotations

import os

import torch

from .device import on_device_of

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - no (or a broken) Triton: callers use the torch reference
    triton = None

__all__ = ["fake_quantize", "supports"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_GROUPS = 64  # groups of 16 values per program
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if triton is not None:

    @triton.jit
    def _round_e4m3(v):
        """Nearest float8 e4m3fn value (ties to even) of fp32 v with |v| <= 448, as fp32."""
        a = tl.abs(v)
        sub = (a + 16384.0) - 16384.0  # below 2^-6: multiples of 2^-9 (the fp32 ulp at 2^14)
        u = a.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFFF + ((u >> 20) & 1)) & 0xFFF00000  # 3 mantissa bits, ties to even
        r = tl.where(a < 0.015625, sub, u.to(tl.float32, bitcast=True))
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _round_to(v, DT: tl.constexpr):
        """fp32 v rounded to DT, to nearest even (bf16 by integer ops: the interpreter's cast truncates)."""
        if DT == tl.bfloat16:
            u = v.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            v = u.to(tl.float32, bitcast=True)
        return v.to(DT)

    @triton.jit
    def _fake_quant_kernel(x_ptr, out_ptr, g_ptr, n_groups, BLOCK_G: tl.constexpr, RECIP: tl.constexpr):
        rg = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
        inside = (rg < n_groups)[:, None]
        offs = rg[:, None] * 16 + tl.arange(0, 16)[None, :]
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
        xf = x.to(tl.float32)
        g = tl.load(g_ptr)
        amax = tl.max(tl.abs(xf), axis=1)
        if RECIP:  # torch on CUDA divides by a Python scalar as a multiply by its fp32 reciprocal
            local = amax * (1.0 / 6.0)
        else:
            local = tl.math.div_rn(amax, 6.0)
        local = _round_to(local, x.dtype).to(tl.float32)  # amax / 6 in x's dtype
        scale = _round_e4m3(tl.minimum(tl.maximum(g * local, -448.0), 448.0))
        scale = tl.where(scale == 0.0, 0.125, scale)
        step = tl.math.div_rn(scale, g)[:, None]
        v = tl.minimum(tl.maximum(tl.math.div_rn(xf, step), -6.0), 6.0)
        a = tl.abs(v)
        q = tl.where(a < 3.5, tl.where(a <= 2.5, 2.0, 3.0), tl.where(a <= 5.0, 4.0, 6.0))
        q = tl.where(a < 1.75, tl.where(a <= 1.25, 1.0, 1.5), q)
        q = tl.where(a < 0.75, tl.where(a <= 0.25, 0.0, 0.5), q)
        q = tl.where(v < 0, -q, q)
        y = q * step
        has_nan = tl.max((xf != xf).to(tl.int32), axis=1) > 0
        y = tl.where(has_nan[:, None], float("nan"), y)
        tl.store(out_ptr + offs, _round_to(y, x.dtype), mask=inside)


def supports(x: torch.Tensor) -> bool:
    """Whether :func:`fake_quantize` runs the kernel for x (CUDA, or CPU under the interpreter)."""
    on_device = x.is_cuda or (_INTERPRET and x.device.type == "cpu")
    return triton is not None and on_device and x.dtype in _DTYPES and x.shape[-1] % 16 == 0


def _launch(x: torch.Tensor, global_divisor: torch.Tensor) -> torch.Tensor:
    if not supports(x):
        raise ValueError(
            f"fake_quantize needs a CUDA fp16/bf16/fp32 tensor whose last dim is a multiple of 16, got"
            f" {x.dtype} {tuple(x.shape)} on {x.device}"
        )
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_groups = xc.numel() // 16
    if n_groups:
        g = global_divisor.to(device=x.device, dtype=torch.float32).reshape(1)
        grid = (triton.cdiv(n_groups, _GROUPS),)
        with on_device_of(x):
            _fake_quant_kernel[grid](xc, out, g, n_groups, BLOCK_G=_GROUPS, RECIP=x.is_cuda, num_warps=4)
    return out


@torch.library.custom_op("nvfp4_fix::fake_quantize", mutates_args=())
def _fake_quantize_op(x: torch.Tensor, global_divisor: torch.Tensor) -> torch.Tensor:
    return _launch(x, global_divisor)


@_fake_quantize_op.register_fake
def _fake_quantize_fake(x, global_divisor):
    return torch.empty_like(x)


def fake_quantize(x: torch.Tensor, global_divisor: torch.Tensor) -> torch.Tensor:
    """x quantized to the NVFP4 grid and back (same dtype and shape); global_divisor: one float32
    value on x's device, compressed-tensors' divisor convention."""
    if torch.compiler.is_compiling():
        return torch.ops.nvfp4_fix.fake_quantize(x, global_divisor)
    return _launch(x, global_divisor)
