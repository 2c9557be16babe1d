"""FP8Linear's GPU paths.

* ``torch._scaled_mm`` (FP8 tensor cores) where the checkpoint quantizes activations and the card's
  scaling reproduces that quantization: per-tensor or per-channel weight scales with static per-tensor,
  dynamic per-tensor or dynamic per-token activation scales. The activations are quantized to the same
  e4m3 codes as the emulation (``fp8.fake_quantize_fp8``: same dtype, same order of operations); the
  product then runs on the codes with the scales applied in fp32, where the emulation rounds the
  dequantized operands to the activation dtype first. One scale a side needs sm_89+; per-token or
  per-channel scales (rowwise) need sm_90 / sm_100 and bf16 activations. ``settings.fp8_scaled_mm``
  (``NVFP4_FIX_FP8_SCALED_MM=0``) turns it off.
* W8A16 (``kernels/triton_fp8.py``): for M <= ``triton_fp8.MAX_M`` on sm_89+ the Triton tl.dot kernel
  reading the e4m3 codes; otherwise the Triton dequantization into a scratch + cuBLAS (``dequant_mm``).

``forward`` takes the first that applies (the torch path, dequantized row chunks, last). While
torch.compile traces, it runs as one custom op (``torch.ops.nvfp4_fix.fp8_linear``, opaque to dynamo):
a compiled step keeps the 8-bit kernels instead of tracing a dequantizing torch path.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

from . import settings
from .codec import FP8_MAX
from .schemes import FP8Spec

try:  # Triton is optional (the legacy environment has none): the torch path is exact too.
    from .kernels import fp8_act_quant as _act
    from .kernels import triton_fp8 as _triton
except Exception:  # pragma: no cover - depends on the environment
    _act = _triton = None

Scaling = Literal["tensor", "row"]
W8A16Path = Literal["dot", "dequant"]


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def scaled_mm_scaling(spec: FP8Spec, x2: torch.Tensor, n: int) -> Scaling | None:
    """How ``torch._scaled_mm`` reproduces ``spec``'s activation quantization for x2 [M, K] on its
    device: "tensor" (one scale a side), "row" (rowwise scales) or None (it cannot)."""
    if spec.weights not in ("tensor", "channel"):
        return None
    if spec.activations not in ("static", "dynamic-tensor", "dynamic-token"):
        return None
    if not x2.is_cuda or x2.shape[0] == 0 or x2.shape[1] % 16 or n % 16:
        return None
    cap = _capability(x2.device.index if x2.device.index is not None else torch.cuda.current_device())
    if spec.weights == "tensor" and spec.activations != "dynamic-token":
        ok = cap >= (8, 9) and x2.dtype in (torch.float16, torch.bfloat16, torch.float32)
        return "tensor" if ok else None
    return "row" if cap[0] in (9, 10) and x2.dtype == torch.bfloat16 else None


def quantize_activations(
    x2: torch.Tensor, spec: FP8Spec, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes [M, K], scale [M, 1] or [1, 1] in x2's dtype), the codes equal to those
    ``fp8.fake_quantize_fp8`` makes for static, dynamic-tensor and dynamic-token activations."""
    if spec.activations == "static":
        if input_scale is None:
            raise ValueError("static FP8 activations need an input_scale")
        s = input_scale.to(x2.dtype).reshape(1, 1)
    else:
        amax = x2.abs().amax(dim=-1, keepdim=True) if spec.activations == "dynamic-token" else x2.abs().amax()
        s = amax / FP8_MAX
        s = torch.where(s == 0, torch.full_like(s, torch.finfo(s.dtype).eps), s).reshape(-1, 1)
    return (x2 / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous(), s


def scaled_mm_linear(
    x2: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    spec: FP8Spec,
    scaling: Scaling,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x2 [M, K] quantized as the checkpoint asks, times W [N, K] e4m3, on FP8 tensor cores."""
    q, sa, sw = scaled_mm_operands(x2, weight_scale, input_scale, spec, scaling, weight.shape[0])
    y = torch._scaled_mm(q, weight.t(), scale_a=sa, scale_b=sw, out_dtype=x2.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def scaled_mm_operands(
    x2: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    spec: FP8Spec,
    scaling: Scaling,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(activation codes, scale_a, scale_b) for ``torch._scaled_mm`` in the shapes ``scaling`` needs.
    Static and per-token activations are quantized in one launch (``kernels/fp8_act_quant.py``, the
    same codes and scales as :func:`quantize_activations`) where it runs."""
    if _act is not None and spec.activations in ("static", "dynamic-token") and _act.supports(x2):
        q, sa = _act.quantize_rows(x2, input_scale if spec.activations == "static" else None)
    else:
        q, s = quantize_activations(x2, spec, input_scale)
        sa = s.to(torch.float32)
    sw = weight_scale.to(torch.float32)
    if scaling == "tensor":
        return q, sa.reshape(-1)[:1].reshape(()), sw.reshape(())
    sa = sa.reshape(-1, 1).expand(q.shape[0], 1).contiguous()
    return q, sa, sw.reshape(1, -1).expand(1, n).contiguous()


def layer_forward(layer, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """FP8Linear's output for x on CUDA (``forward``); while torch.compile traces, the custom op
    ``nvfp4_fix::fp8_linear`` runs it, so the choice of path happens at run time, not in the trace.
    Where a gradient must flow (x or the bias requires one), the torch path: the kernels have none."""
    k, n, spec = layer.in_features, layer.out_features, layer.spec
    x2 = x.reshape(-1, k)
    quantize = layer.activation_mode == "quantize" and spec.activations != "none"
    args = (x2, layer.weight, layer.weight_scale, layer.input_scale, layer.bias)
    if torch.is_grad_enabled() and (x.requires_grad or (layer.bias is not None and layer.bias.requires_grad)):
        # training through the layer (LoRA on a mixed checkpoint): the differentiable torch path
        from .fp8 import linear_in_row_chunks

        y = linear_in_row_chunks(layer.prepare_input(x2), layer.weight, layer.weight_scale, spec, layer.bias)
    elif torch.compiler.is_compiling():
        block = list(spec.block) if spec.block else []
        y = torch.ops.nvfp4_fix.fp8_linear(
            *args, spec.weights, spec.activations, block, spec.group_size or 0, quantize
        )
    else:  # eager: without the custom-op dispatch (host time)
        y = forward(*args, spec, quantize)
    return y.reshape(*x.shape[:-1], n)


def forward(
    x2: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: FP8Spec,
    quantize: bool,
) -> torch.Tensor:
    """x2 [M, K] @ W.T (+ bias) on x2's device, with x2 quantized as ``spec`` says if ``quantize``:
    ``torch._scaled_mm`` where it reproduces that quantization, else the emulation's quantization and
    then W8A16 (Triton), else the torch path (dequantized row chunks)."""
    from .fp8 import fake_quantize_fp8, linear_in_row_chunks  # fp8 imports this module

    if quantize:
        scaling = scaled_mm_scaling(spec, x2, weight.shape[0]) if settings.current().fp8_scaled_mm else None
        if scaling is not None:
            return scaled_mm_linear(x2, weight, weight_scale, input_scale, spec, scaling, bias)
        x2 = fake_quantize_fp8(x2, spec, input_scale)
    y = w8a16_linear(x2, weight, weight_scale, spec, bias)
    return y if y is not None else linear_in_row_chunks(x2, weight, weight_scale, spec, bias)


@torch.library.custom_op("nvfp4_fix::fp8_linear", mutates_args=())
def _fp8_linear_op(
    x2: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    weights: str,
    activations: str,
    block: list[int],
    group_size: int,
    quantize: bool,
) -> torch.Tensor:
    spec = FP8Spec(weights, activations, tuple(block) if block else None, group_size or None)  # type: ignore[arg-type]
    return forward(x2, weight, weight_scale, input_scale, bias, spec, quantize)


@_fp8_linear_op.register_fake
def _fp8_linear_fake(x2, weight, *_):  # noqa: ANN001, ANN002
    return x2.new_empty((x2.shape[0], weight.shape[0]))


def w8a16_path(x2: torch.Tensor, spec: FP8Spec, k: int) -> W8A16Path | None:
    """Which Triton W8A16 path runs x2 [M, K]: the tl.dot kernel (small M, sm_89+), the dequantize +
    cuBLAS one, or None (no Triton, or a case neither takes: the layer's torch path runs)."""
    if _triton is None:
        return None
    if _triton.supports(x2, spec, k):
        return "dot"
    return "dequant" if _triton.dequant_supports(x2, spec) else None


def w8a16_linear(
    x2: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    spec: FP8Spec,
    bias: torch.Tensor | None,
    path: W8A16Path | None = None,
) -> torch.Tensor | None:
    """x2 [M, K] @ (W e4m3 * scale).T through ``path`` (default: ``w8a16_path``'s choice), or None."""
    path = path or w8a16_path(x2, spec, x2.shape[1])
    if path == "dot":
        return _triton.fp8_linear(x2, weight, weight_scale, spec, bias)
    if path == "dequant":
        return _triton.dequant_mm(x2, weight, weight_scale, spec, bias)
    return None
