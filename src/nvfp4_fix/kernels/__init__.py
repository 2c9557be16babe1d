"""One dispatch for y = x @ W.T (+ bias) with W in packed NVFP4.

``weight_mul`` is the per-tensor factor in the multiplier convention (float32 scalar tensor). Keep it
on the same device as the weights (a registered buffer): it is read by the kernels on the device, so
nothing syncs the host and the call can be captured in a CUDA graph.

Choice of kernel (``kernel=`` argument, else ``settings.current().kernel``, env ``NVFP4_FIX_KERNEL``):

* ``reference``    dequantize to float32 and matmul (any device, slow, exact).
* CUDA, auto:      M <= 32 -> ``cuda_mma`` (NVRTC-compiled tensor-core decode GEMM, sm_80+, K % 128
                   == 0; the variant measured fastest per shape); otherwise M == 1 -> ``triton_gemv``;
                   2 <= M <= 16 -> ``triton_mm`` (BM=16); larger M (and M <= 32 that cuda_mma cannot
                   run) -> ``triton_mm`` or ``dequant_mm`` (dequantize into a bf16 scratch in
                   row chunks + cuBLAS), by the thresholds measured in benchmarks/RESULTS.md.
                   fp32 activations -> ``dequant_mm``. Without Triton, or below sm_80 -> ``chunked``.
                   The choice is ``selection.choose``, a pure function of the card and the settings.
* CPU, auto:       M == 1 -> ``cpu_gemv`` (torch.compile'd fused GEMV from packed bytes, eager
                   fallback); M > 1 -> ``chunked`` (row chunks dequantized to float32 + matmul).
* ``humming``       the optional Humming library (kernels/humming.py): ``auto`` takes it only with
                   ``settings.humming`` on, where kernels/table.py measured it faster, and falls back
                   to the kernels above when it is missing, fails to compile or refuses a weight
                   (shapes it cannot run, ``humming.shape_refusal``, are never sent to it).
* ``cuda_tile``      (sm_80+, 9 <= M <= 512): kernels/cuda_tile.py, a tiled mma.sync GEMM; ``auto`` runs it
                   on sm_90 for wide layers at 17 <= M <= 48, where it was measured faster than the
                   kernels above (``selection.tile_wins``).
* ``blackwell_fp4`` (sm >= 100, W4A4 only): activations quantized to NVFP4 with ``input_mul``, then
                   ``torch._scaled_mm`` on FP4 tensor cores. Only when ``input_mul`` is passed.

The GPU and CPU kernels run inside the custom op ``torch.ops.nvfp4_fix.linear`` (with a fake/meta
implementation), so torch.compile traces through it and CUDA graphs capture it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

from .. import settings
from . import cpu as _cpu
from . import cuda_mma as _cuda_mma
from . import cuda_tile as _cuda_tile
from . import humming as _humming
from . import selection as _selection
from . import table as _table
from .device import device_index, on_device_of
from .reference import linear_reference

try:  # Triton is optional: without it CUDA falls back to the chunked torch path.
    import triton  # noqa: F401

    from . import triton_ops as _tops

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    _tops = None
    HAS_TRITON = False

__all__ = ["nvfp4_linear", "dequantize_weight", "KERNELS", "HAS_TRITON", "select_kernel"]

KERNELS = settings.KERNEL_NAMES


def select_kernel(x2: torch.Tensor, n: int, k: int) -> str:
    """The kernel ``auto`` picks for a 2-D input x2 [M, K] and an N x K weight (cached per call shape
    and settings; "humming" may still fall back per weight, see ``_run_here``)."""
    dev = x2.device
    return _plan(dev.type, _index(dev), x2.dtype, x2.shape[0], n, k, settings.current())


def _index(dev: torch.device) -> int:
    if dev.type != "cuda":
        return -1
    return device_index(dev)


@functools.lru_cache(maxsize=8192)
def _plan(
    device_type: str, index: int, dtype: torch.dtype, m: int, n: int, k: int, s: settings.Settings
) -> str:
    if device_type != "cuda":
        return _selection.choose(None, dtype, m, n, k, s)
    card = _card(index, _humming_on(index, s.humming))
    refusal = _selection.humming_refusal(card, dtype, m, n, k, s)
    if refusal is not None:
        _humming.log_once(_humming.fallback_line(n, k, refusal), logging.WARNING)
    return _nvrtc_checked(
        card, index, _selection.choose(card, dtype, m, n, k, s, _m1(n, k)), dtype, m, n, k, s
    )


def _ours_cuda(index: int, dtype: torch.dtype, m: int, n: int, k: int, s: settings.Settings) -> str:
    card = _card(index, False)
    return _nvrtc_checked(card, index, _selection.ours(card, dtype, m, n, k, s, _m1(n, k)), dtype, m, n, k, s)


def _card(index: int, humming: bool) -> _selection.Card:
    # nvrtc=True until a call is about to take cuda_mma: only then is it compiled (_nvrtc_checked)
    return _selection.Card(torch.cuda.get_device_capability(index), HAS_TRITON, True, humming)


def _nvrtc_checked(
    card: _selection.Card,
    index: int,
    kernel: str,
    dtype: torch.dtype,
    m: int,
    n: int,
    k: int,
    s: settings.Settings,
) -> str:
    if kernel == "cuda_tile" and not _cuda_tile.supports_shape(index, dtype, m, k):
        kernel = _selection.ours(card, dtype, m, n, k, dataclasses.replace(s, cuda_tile=False), _m1(n, k))
    if kernel == "cuda_mma" and not _cuda_mma.supports_shape(index, dtype, m, k):
        return _selection.ours(dataclasses.replace(card, nvrtc=False), dtype, m, n, k, s, _m1(n, k))
    return kernel


def _m1(n: int, k: int) -> str:
    return _tops.m1_kernel(n, k) if HAS_TRITON else "gemv"


@functools.lru_cache(maxsize=64)
def _humming_on(index: int, wanted: bool) -> bool:
    """Whether auto may use Humming on this card; logs the one line saying which backends run."""
    cc = torch.cuda.get_device_capability(index)
    where = f"cuda:{index} (sm_{cc[0]}{cc[1]})"
    reason = "off (settings.humming / NVFP4_FIX_HUMMING=1 turns it on)" if not wanted else None
    reason = reason or _humming.unavailable_reason(torch.device("cuda", index))
    ranges = _table.humming_ranges(cc)
    if reason is None and not ranges:
        reason = "not measured faster on this card"
    if reason is None:
        _humming.log_once(
            f"nvfp4_fix: NVFP4 GEMMs on {where}: Humming for {', '.join(ranges)}, nvfp4-fix kernels otherwise"
        )
    else:
        _humming.log_once(
            f"nvfp4_fix: NVFP4 GEMMs on {where}: nvfp4-fix kernels; Humming {reason}", logging.INFO
        )
    return reason is None


def _run(kernel: str, x2, wp, ws, mul, bias):
    with on_device_of(x2):
        return _run_here(kernel, x2, wp, ws, mul, bias)


def _run_here(kernel: str, x2, wp, ws, mul, bias):
    n, k = wp.shape[0], x2.shape[1]
    if ws.dtype == torch.uint8:  # the op carries the scales as raw bytes
        ws = ws.view(torch.float8_e4m3fn)
    if kernel == "auto":
        kernel = select_kernel(x2, n, k)
        if kernel == "humming":
            plan = _humming.plan_for(wp, ws, mul, x2.dtype)
            if not isinstance(plan, str):
                try:
                    return _humming.linear(x2, plan, bias)
                except Exception as err:
                    if torch.cuda.is_current_stream_capturing():
                        raise
                    _humming.mark_failed(wp, x2.dtype, err)
            # this weight: Humming missing, refused, failed to compile or to run (logged once)
            kernel = _ours_cuda(_index(x2.device), x2.dtype, x2.shape[0], n, k, settings.current())
    if kernel == "humming":
        plan = _humming.plan_for(wp, ws, mul, x2.dtype)
        if isinstance(plan, str):
            raise RuntimeError(f"kernel 'humming' cannot run this {n}x{k} weight: {plan}")
        return _humming.linear(x2, plan, bias)
    if kernel == "reference":
        return linear_reference(x2, wp, ws, mul, bias)
    if kernel == "cuda_mma":
        if not _cuda_mma.supports(x2, n, k):
            raise RuntimeError(
                "kernel 'cuda_mma' needs CUDA sm_80+, fp16/bf16, M <= 64 and K % 128 == 0"
                f" (M={x2.shape[0]}, K={k})"
            )
        return _cuda_mma.linear(x2, wp, ws, mul, bias)
    if kernel == "cuda_tile":
        if not _cuda_tile.supports(x2, n, k):
            raise RuntimeError(
                f"kernel 'cuda_tile' needs CUDA sm_80+, fp16/bf16, {_cuda_tile.MIN_M} <= M <= "
                f"{_cuda_tile.MAX_M} and K % 128 == 0 (M={x2.shape[0]}, K={k})"
            )
        return _cuda_tile.linear(x2, wp, ws, mul, bias)
    if kernel in ("triton_gemv", "triton_mm", "dequant_mm"):
        if not HAS_TRITON:
            raise RuntimeError(f"kernel {kernel!r} needs triton, which is not importable")
        if x2.device.type != "cuda" and not _tops._INTERPRET:
            raise RuntimeError(f"kernel {kernel!r} needs a CUDA device (or TRITON_INTERPRET=1)")
        fn = {"triton_gemv": _tops.gemv, "triton_mm": _tops.mm, "dequant_mm": _tops.dequant_mm}[kernel]
        return fn(x2, wp, ws, mul, bias)
    if kernel == "cpu_gemv":
        return _cpu.gemv_compiled(x2, wp, ws, mul, bias)
    if kernel == "chunked":
        return _cpu.linear_chunked(x2, wp, ws, mul, bias)
    raise ValueError(f"unknown NVFP4 kernel {kernel!r}; choose one of {KERNELS}")


@torch.library.custom_op("nvfp4_fix::linear", mutates_args=())
def _linear_op(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,  # uint8 view of the float8_e4m3fn block scales
    weight_mul: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: str,
) -> torch.Tensor:
    return _run(kernel, x, weight_packed, weight_scale, weight_mul, bias)


@_linear_op.register_fake
def _linear_fake(x, weight_packed, weight_scale, weight_mul, bias, kernel):
    return x.new_empty((x.shape[0], weight_packed.shape[0]))


def nvfp4_linear(
    x: torch.Tensor,
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_mul: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel: str | None = None,
    input_mul: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) times packed W [N, K/2] -> [..., N] in x.dtype.

    ``input_mul`` (W4A4 checkpoints only, multiplier convention) enables the Blackwell FP4 path when
    the card has it and ``kernel`` is ``auto`` or ``blackwell_fp4``; otherwise it is ignored here
    (activation fake-quantization, if wanted, is the layer's business).
    """
    if kernel is None:
        kernel = settings.current().kernel
    if kernel not in KERNELS:
        raise ValueError(f"unknown NVFP4 kernel {kernel!r}; choose one of {KERNELS}")
    n, k2 = weight_packed.shape
    k = x.shape[-1]
    if k != 2 * k2 or k % 16:
        raise ValueError(
            f"x has {k} input features but the packed weight {tuple(weight_packed.shape)} holds {2 * k2}"
            " (NVFP4 needs in_features to be a multiple of 16)"
        )
    if kernel == "reference":
        return linear_reference(x, weight_packed, weight_scale, weight_mul, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if weight_mul.device != x.device:
        weight_mul = weight_mul.to(x.device)  # eager convenience; register it as a device buffer instead
    # Training: backward.py (PackedLinear eagerly, the op's autograd when compiled); Blackwell FP4 has none.
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad and kernel == "blackwell_fp4":
        raise RuntimeError("kernel 'blackwell_fp4' has no backward; use 'auto' to train through the layer")
    if input_mul is not None and kernel in ("auto", "blackwell_fp4") and not needs_grad:
        from . import blackwell

        if blackwell.available(x.device):
            return blackwell.linear_fp4(x2, weight_packed, weight_scale, weight_mul, bias, input_mul).reshape(
                *lead, n
            )
        if kernel == "blackwell_fp4":
            raise RuntimeError("kernel 'blackwell_fp4' needs a CUDA card with compute capability >= 10.0")
    elif kernel == "blackwell_fp4":
        raise ValueError("kernel 'blackwell_fp4' needs input_mul (W4A4 checkpoints only)")
    if x2.shape[0] == 0:
        return x.new_empty((*lead, n))
    scale_bytes = weight_scale.view(torch.uint8) if weight_scale.dtype != torch.uint8 else weight_scale
    if torch.compiler.is_compiling():  # the custom op: opaque to dynamo, differentiable (backward.py)
        y = torch.ops.nvfp4_fix.linear(x2, weight_packed, scale_bytes, weight_mul, bias, kernel)
    elif needs_grad:  # eager training: the same formula through a plain autograd.Function (less host time)
        y = _backward.PackedLinear.apply(x2, weight_packed, scale_bytes, weight_mul, bias, kernel)
    else:  # eager: skip the custom-op dispatch (measured ~0.2 ms of host time per call on an H100 host)
        y = _run(kernel, x2, weight_packed, scale_bytes, weight_mul, bias)
    return y.reshape(*lead, n)


def dequantize_weight(
    weight_packed: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_mul: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dense W [N, K] in ``dtype`` (e2m1 * e4m3 * multiplier, rounded once), for the "dequantize once
    at load" mode (fast CPU, bf16 memory). Built in row chunks on the CPU; one Triton kernel on CUDA."""
    if (
        weight_packed.device.type == "cuda"
        and HAS_TRITON
        and dtype in (torch.float16, torch.bfloat16, torch.float32)
    ):
        mul = weight_mul.to(weight_packed.device)
        with on_device_of(weight_packed):
            return _tops.dequantize_rows(weight_packed, weight_scale, mul, dtype)
    return _cpu.dequantize_dense(weight_packed, weight_scale, weight_mul.to(weight_packed.device), dtype)


from . import backward as _backward  # noqa: E402  (the op's autograd formula, the eager Function)
