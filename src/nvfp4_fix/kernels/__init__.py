"""One dispatch for y = x @ W.T (+ bias) with W in packed NVFP4.

``weight_mul`` is the per-tensor factor in the multiplier convention (float32 scalar tensor).
Set ``NVFP4_FIX_KERNEL=reference`` to force the reference path.
"""

from __future__ import annotations

import os

import torch

from .reference import linear_reference


def nvfp4_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_mul: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) times packed W [N, K/2] -> [..., N] in x.dtype."""
    if os.environ.get("NVFP4_FIX_KERNEL", "") == "reference":
        return linear_reference(x, weight_packed, weight_scale, weight_mul, bias)
    return linear_reference(x, weight_packed, weight_scale, weight_mul, bias)
