"""Backward of the packed linear: grad_x = grad_y @ W, computed from the packed bytes.

The weight (codes, block scales, global scale) is frozen: it never gets a gradient, and autograd saves
only references to the packed tensors (not the input, not a dense copy). The dense weight exists only
inside one backward call, a bounded piece at a time:

* CPU: row chunks dequantized to float32 (``cpu.grad_input_chunked``), accumulated in float32.
* CUDA: W dequantized by the Triton kernel into a bf16/fp16 (fp32 for fp32 gradients) scratch and
  multiplied by cuBLAS; a weight larger than the scratch budget (``settings.scratch_mb``) goes in
  column blocks, each one GEMM over all of N, so nothing is accumulated in half precision.
* ``reference`` kernel: the whole weight dequantized to float32.

``torch.ops.nvfp4_fix.linear`` gets this formula through ``torch.library.register_autograd`` (with
the backward as the custom op ``nvfp4_fix::linear_grad_input``), so torch.compile traces both; eager
training calls the same kernels and formula through ``PackedLinear``, an autograd.Function.
"""

from __future__ import annotations

import torch

from .. import settings
from ..codec import dequantize
from . import cpu as _cpu
from .device import on_device_of

try:
    from . import triton_ops as _tops
except Exception:  # pragma: no cover - no triton
    _tops = None


def _grad_input_reference(g: torch.Tensor, wp, ws, mul) -> torch.Tensor:
    scalar = mul.reshape(()) if mul.numel() == 1 else torch.ones((), device=mul.device)
    w = dequantize(wp, ws, scalar, "multiplier", torch.float32)
    gf = g.to(torch.float32)
    if mul.numel() > 1:
        gf = gf * mul.to(torch.float32).reshape(1, -1)
    return (gf @ w).to(g.dtype)


def _grad_input_cuda(g: torch.Tensor, wp, ws, mul) -> torch.Tensor:
    n, k = wp.shape[0], wp.shape[1] * 2
    dtype = g.dtype if g.dtype in (torch.float16, torch.bfloat16) else torch.float32
    esize = torch.finfo(dtype).bits // 8
    budget = settings.current().scratch_mb << 20
    g = g.to(dtype).contiguous()
    if n * k * esize <= budget:
        return torch.mm(g, _tops.dequantize_rows(wp, ws, mul, dtype)).to(g.dtype)
    cols = max(128, (budget // (n * esize)) // 128 * 128)
    out = torch.empty((g.shape[0], k), dtype=dtype, device=g.device)
    scratch = torch.empty((n, min(cols, k)), dtype=dtype, device=g.device)
    for c0 in range(0, k, cols):
        c = min(cols, k - c0)
        part = wp[:, c0 // 2 : (c0 + c) // 2].contiguous()
        sc = ws[:, c0 // 16 : (c0 + c) // 16].contiguous()
        w = _tops.dequantize_rows(part, sc, mul, dtype, out=scratch[:, :c] if c == cols else None)
        out[:, c0 : c0 + c] = torch.mm(g, w)
    return out


def grad_input(
    grad_y: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_mul: torch.Tensor,
    kernel: str = "auto",
) -> torch.Tensor:
    """grad_y [M, N] @ W [N, K] -> [M, K] in grad_y's dtype; ``weight_mul`` a scalar or per-row [N]."""
    if weight_scale.dtype == torch.uint8:
        weight_scale = weight_scale.view(torch.float8_e4m3fn)
    n = weight_packed.shape[0]
    if grad_y.shape[-1] != n or weight_mul.numel() not in (1, n):
        raise ValueError(
            f"grad_y {tuple(grad_y.shape)} / weight_mul ({weight_mul.numel()} values) do not match the"
            f" packed weight {tuple(weight_packed.shape)}"
        )
    mul = weight_mul.to(device=grad_y.device, dtype=torch.float32)
    if kernel == "reference":
        return _grad_input_reference(grad_y, weight_packed, weight_scale, mul)
    if grad_y.is_cuda and _tops is not None:
        with on_device_of(grad_y):
            return _grad_input_cuda(grad_y, weight_packed, weight_scale, mul)
    return _cpu.grad_input_chunked(grad_y, weight_packed, weight_scale, mul)


@torch.library.custom_op("nvfp4_fix::linear_grad_input", mutates_args=())
def _grad_input_op(
    grad_y: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_mul: torch.Tensor,
    kernel: str,
) -> torch.Tensor:
    return grad_input(grad_y, weight_packed, weight_scale, weight_mul, kernel)


@_grad_input_op.register_fake
def _grad_input_fake(grad_y, weight_packed, weight_scale, weight_mul, kernel):
    return grad_y.new_empty((grad_y.shape[0], weight_packed.shape[1] * 2))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    _x, wp, ws, mul, bias, kernel = inputs
    ctx.save_for_backward(wp, ws, mul)
    ctx.kernel = kernel
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):  # noqa: ANN001, ANN202
    wp, ws, mul = ctx.saved_tensors
    gx = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.nvfp4_fix.linear_grad_input(grad.contiguous(), wp, ws, mul, ctx.kernel)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
        gb = grad.sum(0).to(ctx.bias_dtype)
    return gx, None, None, None, gb, None


torch.library.register_autograd("nvfp4_fix::linear", _backward, setup_context=_setup_context)


class PackedLinear(torch.autograd.Function):
    """Eager training: the op's kernels and the same backward, without the custom-op dispatch (whose
    autograd wrapper costs host time on every call; torch.compile uses the op)."""

    @staticmethod
    def forward(ctx, x, wp, ws, mul, bias, kernel):  # noqa: ANN001, ANN205
        from . import _run

        _setup_context(ctx, (x, wp, ws, mul, bias, kernel), None)
        return _run(kernel, x, wp, ws, mul, bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        wp, ws, mul = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad_input(grad.contiguous(), wp, ws, mul, ctx.kernel)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
            gb = grad.sum(0).to(ctx.bias_dtype)
        return gx, None, None, None, gb, None
