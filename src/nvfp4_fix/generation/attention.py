"""Decode attention of the fast path, chosen per model through transformers' attention registry.

:func:`packed_gqa_sdpa` is registered with ``AttentionInterface`` (and the sdpa mask function, through
:func:`mask_once`, with ``AttentionMaskInterface``) under our own name, :data:`NAME`. Within
:func:`decode_attention`, the configs of one model that use ``"sdpa"`` are switched to that name and
switched back on exit: transformers' global ``"sdpa"`` entry and every other model are left alone.
Captured graphs keep the kernels they recorded, so only eager steps, warm-up and capture need it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import torch
from torch import nn

from .. import settings
from .scan import scan

try:  # Triton is optional: without it decode attention stays on SDPA
    from ..kernels import decode_attention as triton_decode
except Exception:  # pragma: no cover - depends on the environment
    triton_decode = None  # type: ignore[assignment]

__all__ = ["NAME", "decode_attention", "mask_once", "packed_gqa_sdpa", "register"]

#: the name our attention and mask functions are registered under
NAME = "nvfp4_fix_decode"
#: devices whose tensors go to the Triton kernel; not the CPU even under TRITON_INTERPRET=1 (~40 ms a call)
TRITON_DECODE_DEVICES: tuple[str, ...] = ("cuda",)

# kwargs under which the packed path would not compute what transformers' sdpa function computes
_SDPA_SPECIAL = ("softcap", "position_bias", "sinks", "s_aux", "head_mask", "output_attentions")


def _attention_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor | None) -> ModuleType | None:  # fmt: skip
    """The Triton split-KV decode kernel module where it takes these inputs, else None."""
    if (
        triton_decode is None
        or not settings.current().decode_attention
        or query.device.type not in TRITON_DECODE_DEVICES
        or not triton_decode.supports(query, key, value, mask)
    ):
        return None
    return triton_decode


def packed_gqa_sdpa(orig: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' ``sdpa`` attention, for one query token (the decode step) without the copies of
    K/V that ``repeat_kv`` makes over the whole static cache (2 x [B, H, cache, D] per layer and token):

    * where it applies (CUDA tensors, see ``kernels.decode_attention.supports``), the Triton split-KV
      kernel, which also skips the cache blocks the mask excludes (the unfilled tail, left padding);
      under torch.compile through the opaque custom op ``torch.ops.nvfp4_fix.decode_attention``;
    * else, eagerly and with grouped K/V heads, SDPA with the query heads folded into the query-length
      axis ([B, H, 1, D] -> [B, H_kv, H / H_kv, D]; transformers >= 5.24 does the same, ``pack_gqa``).

    Same numbers up to summation order. Every other case (several query tokens, per-head masks,
    dropout, soft-capping, sinks ...), and the SDPA path while tracing, goes to ``orig``."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
        b, h, q, d = query.shape
        groups = int(getattr(module, "num_key_value_groups", 1) or 1)
        mask = attention_mask
        plain = not (
            q != 1
            or dropout
            or key.shape[1] * groups != h
            or key.shape[-1] != value.shape[-1]
            or any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in _SDPA_SPECIAL)
            or (mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1))
        )
        kernel = _attention_kernel(query, key, value, mask) if plain else None
        if kernel is not None:
            scale = float(scaling) if scaling is not None else d**-0.5
            if torch.compiler.is_compiling():
                return torch.ops.nvfp4_fix.decode_attention(query, key, value, mask, scale), None
            return kernel.decode_attention(query, key, value, mask, scale), None
        if not plain or groups <= 1 or torch.compiler.is_compiling():
            return orig(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)  # fmt: skip
        if mask is not None:
            mask = mask[:, :, :, : key.shape[-2]]
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(b, h // groups, groups, d), key, value, attn_mask=mask, scale=scaling
        )
        return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None

    return attention


def mask_once(orig: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' ``sdpa`` mask function, whose mask inductor computes once per step: a cheap
    pointwise input of an opaque op is otherwise recomputed into a new buffer for every op that reads
    it (the same [B, 1, 1, L] mask for each layer's decode attention: one kernel per layer and token).
    Returned through an opaque op, the mask is a buffer that every layer shares."""

    def mask(*args: Any, **kwargs: Any) -> Any:
        m = orig(*args, **kwargs)
        if isinstance(m, torch.Tensor) and triton_decode is not None and torch.compiler.is_compiling():
            return torch.ops.nvfp4_fix.materialize(m)
        return m

    return mask


@functools.cache
def register() -> bool:
    """Register :data:`NAME` with transformers' attention and mask registries (once); False where this
    transformers version has no such registries."""
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers without the registries
        return False
    AttentionInterface.register(NAME, packed_gqa_sdpa(sdpa_attention_forward))
    AttentionMaskInterface.register(NAME, mask_once(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"]))
    return True


def _sdpa_configs(model: nn.Module) -> list[Any]:
    """Every config object of the model (top level, sub-configs, those modules hold) set to sdpa."""
    return [c for c in scan(model).configs if c.__dict__.get("_attn_implementation_internal") == "sdpa"]


@contextlib.contextmanager
def decode_attention(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the block, the model's sdpa attention is :data:`NAME`'s (yields whether it is); its
    configs are set back on exit, also on an exception."""
    configs = _sdpa_configs(model) if enabled and register() else []
    for cfg in configs:  # the internal field: the property's setter would also reset sub-configs
        cfg.__dict__["_attn_implementation_internal"] = NAME
    try:
        yield bool(configs)
    finally:
        for cfg in configs:
            cfg.__dict__["_attn_implementation_internal"] = "sdpa"
