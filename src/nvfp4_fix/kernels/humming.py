"""Humming (``humming-kernels``, the vLLM project's JIT NVFP4 GEMM library) as an optional backend.

Install with ``pip install nvfp4-fix[humming]``. Humming repacks the checkpoint's bytes into its own
layout (``HummingLayer.transform()``), so a layer it runs keeps a second, Humming-layout copy of its
weights next to the checkpoint-layout one (which ``save_pretrained`` writes and our kernels read). That
copy is why it is off unless ``settings.humming`` is on. One ``Plan`` is built per weight on its first
use (never during a CUDA-graph capture) and reused; every failure (not installed, import error, the
card, a compile error, a configuration Humming refuses) is logged once and the caller falls back to
this package's kernels.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

import torch

log = logging.getLogger("nvfp4_fix.kernels")

#: compute capability Humming needs (it claims SM75+)
MIN_CC = (7, 5)

#: Humming pads N and K itself, up to these multiples (``HummingLayer``'s pad_n_to_multiple and
#: pad_k_to_multiple; humming-kernels 0.1.20). N to 128: its sm_90 tiles are at least 128 wide in N,
#: so an N padded only to an odd multiple of 64 (N = 1088 or 2880) has no tile that divides it. K to
#: 128: K = 2064 padded only to 2080 gets a 16-deep K tile, below the 32 its 16-bit kernels need.
PAD_N = 128
PAD_K = 128
#: Humming's kernels need the padding of N in whole multiples of 8 (``HummingKernel.check_shape``,
#: humming-kernels 0.1.20): an N that is not a multiple of 8 cannot be padded for it.
PAD_STEP = 8

_import_error: str | None = None
_module: Any = None
_logged: set[str] = set()


def log_once(message: str, level: int = logging.INFO) -> None:
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def _humming() -> Any:
    """The imported ``humming`` package, or None (the reason is kept in ``unavailable_reason``)."""
    global _module, _import_error
    if _module is None and _import_error is None:
        try:
            import humming
            from humming.layer import HummingLayer  # noqa: F401
        except ImportError as err:
            _import_error = f"humming-kernels is not installed ({err})"
        except Exception as err:  # a broken install (missing CUDA libraries, an ABI mismatch)
            _import_error = f"humming-kernels failed to import: {type(err).__name__}: {err}"
        else:
            _module = humming
    return _module


def unavailable_reason(device: torch.device) -> str | None:
    """None when Humming can run on this device, else why not."""
    if _humming() is None:
        return _import_error
    if device.type != "cuda":
        return f"Humming needs a CUDA device, not {device.type}"
    cc = torch.cuda.get_device_capability(device)
    if cc < MIN_CC:
        return f"Humming needs compute capability >= {MIN_CC[0]}.{MIN_CC[1]}, this card has {cc[0]}.{cc[1]}"
    return None


def padded_shape(n: int, k: int) -> tuple[int, int]:
    """The N x K Humming computes for an N x K weight (it pads both with zeros)."""
    return -(-n // PAD_N) * PAD_N, -(-k // PAD_K) * PAD_K


def shape_refusal(n: int, k: int) -> str | None:
    """Why Humming cannot run an N x K NVFP4 weight, from the shape alone; None when the shape is fine.

    These shapes make Humming's build fail with a bare ``AssertionError``; they are refused before
    Humming is called."""
    pn = padded_shape(n, k)[0]
    if (pn - n) % PAD_STEP:
        return (
            f"N = {n} is not a multiple of {PAD_STEP}: Humming pads N to {pn} and needs the {pn - n}"
            f" padding rows to be a multiple of {PAD_STEP}"
        )
    if k % 16:
        return f"K = {k} is not a multiple of 16 (one NVFP4 scale block)"
    return None


def fallback_line(n: int, k: int, reason: str) -> str:
    return f"nvfp4_fix: Humming cannot run a {n}x{k} weight ({reason}); using nvfp4-fix kernels"


def weight_config() -> dict[str, Any]:
    """compressed-tensors' description of an NVFP4 weight, as Humming reads it."""
    return {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "type": "float",
        "num_bits": 4,
        "strategy": "tensor_group",
        "group_size": 16,
        "symmetric": True,
    }


@dataclasses.dataclass
class Plan:
    """A weight in Humming's layout and the layer that runs it."""

    layer: torch.nn.Module
    n: int
    k: int
    dtype: torch.dtype
    resident_bytes: int  # bytes the transformed copy keeps on the device

    def __call__(self, x2: torch.Tensor) -> torch.Tensor:
        return self.layer(x2)


@dataclasses.dataclass
class _Entry:
    owner: weakref.ref  # the first packed-weight tensor seen: while it lives, its bytes cannot move
    version: int
    scale_ptr: int
    mul_ptr: int
    mul: torch.Tensor  # a copy, to recognise the same multiplier in another tensor
    result: Plan | str  # the plan, or why Humming cannot run this weight


_entries: dict[tuple, _Entry] = {}


def clear() -> None:
    """Drop every plan (and the Humming-layout copies they hold)."""
    _entries.clear()


def _uniform_multiplier(mul: torch.Tensor, n: int) -> float | None:
    flat = mul.reshape(-1).to(torch.float32)
    if flat.numel() not in (1, n):
        return None
    first = float(flat[0])
    return first if bool((flat == first).all()) else None


def build(wp: torch.Tensor, ws: torch.Tensor, mul: torch.Tensor, dtype: torch.dtype) -> Plan:
    """Transform one NVFP4 weight (packed [N, K/2] uint8, e4m3 scales [N, K/16], multiplier) into
    Humming's layout on the weight's device. Raises on anything Humming refuses."""
    humming = _humming()
    if humming is None:
        raise RuntimeError(_import_error)
    from humming.layer import HummingLayer

    n, k = wp.shape[0], wp.shape[1] * 2
    m = _uniform_multiplier(mul, n)
    if m is None or not m > 0:
        raise ValueError("Humming takes one per-tensor multiplier; this weight has per-row ones that differ")
    device = wp.device
    with torch.cuda.device(device), torch.device(device):
        layer = HummingLayer(
            shape_n=n,
            shape_k=k,
            weight_config=weight_config(),
            pad_n_to_multiple=PAD_N,
            pad_k_to_multiple=PAD_K,
            torch_dtype=dtype,
        )
        layer.load_from_tensors(
            {
                "weight_packed": wp,
                "weight_scale": ws.view(torch.float8_e4m3fn),
                # compressed-tensors stores the divisor: 1 / multiplier
                "weight_global_scale": torch.tensor([1.0 / m], dtype=torch.float32, device=device),
            }
        )
        layer.transform()
        layer(torch.zeros((1, k), dtype=dtype, device=device))  # compiles its kernels now, not mid-run
    resident = sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))
    return Plan(layer, n, k, dtype, resident)


def plan_for(wp: torch.Tensor, ws: torch.Tensor, mul: torch.Tensor, dtype: torch.dtype) -> Plan | str:
    """This weight's plan, built on its first use, else why Humming cannot run it (logged once):
    Humming missing or unusable on this device, a shape it cannot run (``shape_refusal``, checked
    before Humming is called), or whatever its build raised.

    Plans are keyed by the packed bytes' address and layout; an entry counts only while the tensor it
    was built from is alive and unmodified, so a freed weight's address reused by another never
    matches. Nothing here syncs the device once the plan exists (CUDA-graph capture safe)."""
    key = (wp.device, wp.data_ptr(), tuple(wp.shape), tuple(wp.stride()), dtype)
    entry = _entries.get(key)
    capturing = wp.is_cuda and torch.cuda.is_current_stream_capturing()
    if entry is not None and entry.owner() is not None and entry.version == wp._version:
        if entry.scale_ptr == ws.data_ptr() and entry.mul_ptr == mul.data_ptr():
            return entry.result
        if capturing:  # the same weight reached through other tensors; no sync allowed here
            return entry.result
        if entry.scale_ptr == ws.data_ptr() and torch.equal(entry.mul, mul.reshape(-1).to(entry.mul)):
            entry.mul_ptr = mul.data_ptr()
            return entry.result
    if capturing:
        return "a plan cannot be built during a CUDA-graph capture (run the shape once before capturing)"
    result: Plan | str
    n, k = wp.shape[0], wp.shape[1] * 2
    reason = unavailable_reason(wp.device) or shape_refusal(n, k)
    if reason is None:
        try:
            result = build(wp, ws, mul, dtype)
        except Exception as err:  # a compile error, a configuration Humming refuses: our kernels run
            result = f"{type(err).__name__}: {err}"
    else:
        result = reason
    if isinstance(result, str):
        log_once(fallback_line(n, k, result), logging.WARNING)
    _entries[key] = _Entry(
        weakref.ref(wp, lambda _r, key=key: _entries.pop(key, None)),
        wp._version,
        ws.data_ptr(),
        mul.data_ptr(),
        mul.detach().reshape(-1).to(torch.float32).clone(),
        result,
    )
    return result


def mark_failed(wp: torch.Tensor, dtype: torch.dtype, err: Exception) -> None:
    """A plan that raised when run: Humming is not used for this weight again."""
    key = (wp.device, wp.data_ptr(), tuple(wp.shape), tuple(wp.stride()), dtype)
    if key in _entries:
        _entries[key].result = f"{type(err).__name__}: {err}"
    n, k = wp.shape[0], wp.shape[1] * 2
    log_once(
        f"nvfp4_fix: Humming failed on a {n}x{k} weight ({err}); using nvfp4-fix kernels", logging.WARNING
    )


def linear(x2: torch.Tensor, plan: Plan, bias: torch.Tensor | None) -> torch.Tensor:
    y = plan(x2)
    return y if bias is None else y.add_(bias.to(y.dtype))
