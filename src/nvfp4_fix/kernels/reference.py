"""The reference path: dequantize to float32 and multiply. Slow, exact, runs anywhere."""

from __future__ import annotations

import torch

from ..codec import dequantize


def linear_reference(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_mul: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    w = dequantize(weight_packed, weight_scale, weight_mul, "multiplier", torch.float32)
    y = x.to(torch.float32) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)
