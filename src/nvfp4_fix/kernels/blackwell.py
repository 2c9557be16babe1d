"""Blackwell (sm >= 100): native FP4 tensor cores through ``torch._scaled_mm``.

Both operands must be FP4, so the activations are quantized to NVFP4 on the fly (16-element blocks,
e4m3 block scales, a per-tensor multiplier). That changes the numerics, so this path is only for
W4A4 checkpoints (scheme NVFP4, which carry an input scale) and only when the caller passes
``input_mul``; weight-only (W4A16) layers keep using the Triton kernels on Blackwell too.
Not run in this project yet (no Blackwell card was lent): the test for it skips elsewhere.
"""

from __future__ import annotations

import torch

from ..codec import BLOCK, FP4_MAX, FP8_MAX, round_to_e2m1_codes


def available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if not hasattr(torch, "float4_e2m1fn_x2") or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 10


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """[rows, K/16] e4m3 scales -> cuBLAS' 128x4 block-swizzled layout (flattened), zero padded."""
    rows, cols = scales.shape
    rb, cb = _ceil_div(rows, 128), _ceil_div(cols, 4)
    padded = scales
    if (rows, cols) != (rb * 128, cb * 4):
        padded = torch.zeros((rb * 128, cb * 4), device=scales.device, dtype=scales.dtype)
        padded[:rows, :cols] = scales
    blocks = padded.view(rb, 128, cb, 4).permute(0, 2, 1, 3)
    return blocks.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


def quantize_activations(x2: torch.Tensor, input_mul: torch.Tensor):
    """x [M, K] -> (packed uint8 [M, K/2], e4m3 scales [M, K/16]) with multiplier ``input_mul``
    (W = e2m1 * scale * input_mul), as compressed-tensors' W4A4 fake quantization does."""
    m, k = x2.shape
    xb = x2.to(torch.float32).view(m, k // BLOCK, BLOCK)
    mul = input_mul.to(torch.float32).reshape(())
    scale = (xb.abs().amax(-1) / FP4_MAX / mul).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    denom = scale.to(torch.float32) * mul
    q = torch.where(denom[..., None] > 0, xb / denom[..., None], torch.zeros_like(xb))
    codes = round_to_e2m1_codes(q).view(m, k)
    packed = (codes[:, 0::2] & 0x0F) | (codes[:, 1::2] << 4)
    return packed, scale


def linear_fp4(x2, weight_packed, weight_scale, weight_mul, bias, input_mul):
    """y = (fp4(x) @ W.T) * input_mul * weight_mul (+ bias) on FP4 tensor cores."""
    xq, xs = quantize_activations(x2, input_mul)
    a = xq.view(torch.float4_e2m1fn_x2)
    b = weight_packed.contiguous().view(torch.float4_e2m1fn_x2).t()
    y = torch._scaled_mm(
        a,
        b,
        scale_a=to_blocked(xs),
        scale_b=to_blocked(weight_scale.contiguous()),
        out_dtype=torch.float32,
    )
    y = y * (input_mul.to(torch.float32) * weight_mul.to(torch.float32)).reshape(())
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x2.dtype)
