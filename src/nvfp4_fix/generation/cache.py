"""The static KV cache of the fast path, and the model-call conventions of each transformers version.

The cache is a transformers ``StaticCache`` whose layers are all full-length: sliding-window layers
(Gemma 2, Mistral) become full ones, the window then applied by the attention mask alone, which is
exact and keeps every update free of host-side branching, so one captured graph serves a whole
generation. Each decode token's K and V go in with one launch per layer (``kernels/kv_cache.py``)
instead of ``StaticLayer.update``'s three ops (``settings.kv_append=False`` keeps transformers' own).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import settings
from ..kernels import kv_cache

__all__ = ["ForwardApi", "forward_api", "holds_prompt", "cache_lengths", "make_static_cache", "reset_cache"]


@dataclass(frozen=True)
class ForwardApi:
    """transformers 4.57: ``past_key_values`` + ``cache_position``; 5.0-5.2x: ``past_key_values``,
    cache writes driven by the cache's device-side length; 5.24+: the keyword is ``cache``."""

    cache_kw: str
    cache_position: bool
    logits_kw: str | None


def forward_api(model: nn.Module) -> ForwardApi:
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "past_key_values" not in params and "cache" in params else "past_key_values"
    logits_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return ForwardApi(cache_kw, "cache_position" in params, logits_kw)


@functools.cache
def _append_layer_class() -> type:
    from transformers.cache_utils import StaticLayer

    class AppendLayer(StaticLayer):
        """A ``StaticLayer`` whose one-token update (the decode step) is one kernel instead of three:
        ``kernels.kv_cache.append_kv`` writes K and V at ``cumulative_length`` and advances it, as
        ``StaticLayer.update`` does. Other updates, and versions without ``cumulative_length``, are
        ``StaticLayer``'s own."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
            length = getattr(self, "cumulative_length", None)
            if (
                not settings.current().kv_append
                or not getattr(self, "is_initialized", False)
                or key_states.shape[-2] != 1
                or not isinstance(length, torch.Tensor)
                or not kv_cache.supports(self.keys, self.values, key_states, value_states, length)
            ):
                return super().update(key_states, value_states, *args, **kwargs)
            if torch.compiler.is_compiling():
                torch.ops.nvfp4_fix.append_kv(self.keys, self.values, key_states, value_states, length)
            else:
                kv_cache.append_kv(self.keys, self.values, key_states, value_states, length)
            return self.keys, self.values

    return AppendLayer


def make_static_cache(model: nn.Module, max_cache_len: int) -> Any:
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError("this transformers version's StaticCache has no per-layer API")
    layers[:] = [_append_layer_class()(max_cache_len=max_cache_len) for _ in layers]
    return cache


def reset_cache(cache: Any) -> None:
    """Zero the cache in place (tensor addresses are baked into captured graphs)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys.zero_()
            layer.values.zero_()
        length = getattr(layer, "cumulative_length", None)
        if isinstance(length, torch.Tensor):
            length.zero_()


def cache_lengths(cache: Any) -> list[torch.Tensor]:
    return [
        t
        for t in (getattr(layer, "cumulative_length", None) for layer in cache.layers)
        if isinstance(t, torch.Tensor)
    ]


def holds_prompt(layers: list[Any], n_static: int, length: int) -> bool:
    """Whether a prefilled DynamicCache's layers hold the whole prompt, one per static-cache layer."""
    return len(layers) == n_static and all(
        isinstance(getattr(d, "keys", None), torch.Tensor) and d.keys.shape[-2] == length for d in layers
    )
