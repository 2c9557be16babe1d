"""What the fast path cannot do goes to ``model.generate``: the checks that decide it, the model's
stop and pad ids, and the call itself with the same settings."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .sampling import SamplingParams
from .scan import scan

__all__ = ["Unsupported", "check_model", "hf_generate", "log_fallback", "model_device", "pad_id", "stop_ids"]

logger = logging.getLogger("nvfp4_fix")


class Unsupported(Exception):
    """The fast path cannot run this model (the message says why)."""


def check_model(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        raise Unsupported("only decoder-only transformers models are supported")
    cls = type(model)
    if not getattr(cls, "_can_compile_fullgraph", False) or getattr(cls, "_is_stateful", False):
        raise Unsupported(f"{type(model).__name__} does not support a static KV cache")


def model_device(model: nn.Module) -> torch.device:
    devices = set(scan(model).devices)
    if len(devices) != 1:
        raise Unsupported(f"the model spans several devices ({sorted(map(str, devices))})")
    return devices.pop()


def stop_ids(model: nn.Module, stop_token_ids: int | Iterable[int] | None) -> tuple[int, ...]:
    if stop_token_ids is None:
        gc = getattr(model, "generation_config", None)
        stop_token_ids = getattr(gc, "eos_token_id", None)
        if stop_token_ids is None:
            stop_token_ids = getattr(getattr(model, "config", None), "eos_token_id", None)
    if stop_token_ids is None:
        return ()
    if isinstance(stop_token_ids, int):
        return (stop_token_ids,)
    return tuple(int(t) for t in stop_token_ids)


def pad_id(model: nn.Module, stop: tuple[int, ...], pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        pid = getattr(src, "pad_token_id", None)
        if isinstance(pid, int):
            return pid
    return stop[0] if stop else 0


_logged: set[str] = set()


def log_fallback(reason: str) -> None:
    msg = f"nvfp4-fix: fast generation unavailable ({reason}); falling back to model.generate"
    if reason not in _logged:
        _logged.add(reason)
        logger.warning(msg)
    else:
        logger.info(msg)


def hf_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    params: SamplingParams,
    stop: tuple[int, ...],
    pad: int,
    streamer: Any,
) -> torch.Tensor:
    """``model.generate`` with the same settings (one value for every row: see ``expressible``)."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    gc = copy.deepcopy(base) if base is not None else GenerationConfig()
    temperature, top_k, top_p = params.temperature[0], params.top_k[0], params.top_p[0]
    sampling = temperature > 0
    gc.do_sample = sampling
    gc.temperature = float(temperature) if sampling else 1.0
    gc.top_k = int(top_k) if (sampling and top_k) else None
    gc.top_p = float(top_p) if sampling else 1.0
    gc.max_new_tokens = int(max_new_tokens)
    gc.max_length = None
    gc.min_new_tokens = None
    gc.min_length = 0
    gc.num_beams = 1
    gc.eos_token_id = list(stop) if stop else []  # None would let generate() restore the model's EOS ids
    gc.pad_token_id = pad
    kw: dict[str, Any] = {"attention_mask": attention_mask} if attention_mask is not None else {}
    return model.generate(input_ids=input_ids, generation_config=gc, streamer=streamer, **kw)


def expressible(params: SamplingParams, generator: torch.Generator | None) -> bool:
    """Whether ``model.generate`` can do what was asked: one setting for all rows, no own generator."""
    uniform = all(len(set(v)) == 1 for v in (params.temperature, params.top_k, params.top_p))
    return generator is None and uniform
