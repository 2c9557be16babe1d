"""An FP8 reference for ``verify``, written from the format description and independent of
:mod:`nvfp4_fix.fp8`: e4m3 decoded from its bit fields in float64, each scale spread over its rows,
columns or blocks by index arithmetic, and the activation quantization spelled out again."""

from __future__ import annotations

from typing import Any

from ..schemes import FP8Spec


def e4m3_float64(weight: Any) -> Any:
    """float8_e4m3fn -> float64 from the bits: 1 sign, 4 exponent (bias 7), 3 mantissa; 0x7f is NaN."""
    import torch

    b = weight.view(torch.uint8).to(torch.int64)
    sign = 1.0 - 2.0 * ((b >> 7) & 1).to(torch.float64)
    exp, man = (b >> 3) & 0xF, (b & 7).to(torch.float64)
    normal = torch.pow(2.0, (exp - 7).to(torch.float64)) * (1.0 + man / 8.0)
    value = sign * torch.where(exp == 0, man / 8.0 * 2.0**-6, normal)
    return torch.where((b & 0x7F) == 0x7F, torch.full_like(value, float("nan")), value)


def reference_weight(weight: Any, scale: Any, spec: FP8Spec) -> Any:
    """Float64 W [N, K] = e4m3(weight) * the scale that covers each element."""
    import torch

    w = e4m3_float64(weight)
    n, k = w.shape
    s = scale.to(torch.float64)
    if spec.weights == "tensor":
        return w * s.reshape(())
    if spec.weights == "channel":
        return w * s.reshape(n, 1)
    assert spec.block is not None
    rows = torch.arange(n, device=s.device) // spec.block[0]
    cols = torch.arange(k, device=s.device) // spec.block[1]
    return w * s[rows[:, None], cols[None, :]]


def reference_act_quant(x: Any, spec: FP8Spec, input_scale: float | None, dtype: Any) -> Any:
    """FP8 quantize-dequantize of activations x (float64 holding values of ``dtype``) as compressed-tensors
    defines it: scale = amax / 448 rounded to the activation dtype (per tensor, row or group; a zero
    scale becomes the dtype's eps) or the static input scale; x / scale rounded to the activation dtype,
    clamped to +-448, rounded to e4m3, times the scale, rounded to the activation dtype."""
    import torch

    shape = x.shape
    if spec.activations == "static":
        assert input_scale is not None
        scale = torch.tensor(input_scale, dtype=torch.float64).to(dtype).to(torch.float64)
        g = x
    else:
        if spec.activations == "dynamic-group":
            g = x.reshape(*shape[:-1], -1, spec.group_size or 1)
            amax = g.abs().amax(-1, keepdim=True)
        elif spec.activations == "dynamic-token":
            g, amax = x, x.abs().amax(-1, keepdim=True)
        else:
            g, amax = x, x.abs().amax()
        scale = (amax / 448.0).to(dtype).to(torch.float64)
        scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(dtype).eps), scale)
    v = (g / scale).to(dtype).to(torch.float64).clamp(-448.0, 448.0)
    q = e4m3_float64(v.to(torch.float8_e4m3fn))
    return (q * scale).to(dtype).to(torch.float64).reshape(shape)
