"""MoE routers in one launch during generation (``settings.moe_router``).

transformers' softmax top-k routers run ``F.linear`` -> ``softmax`` -> ``torch.topk`` -> divide; the
top-k alone is two sort kernels per layer and token. Within :func:`fused_routers` the routers of the
classes in :data:`ROUTERS`, whose forward is that math (checked against each class in
tests/test_moe_router.py), run ``kernels.moe_router.router_topk`` instead (decode on CUDA: the logits
and the top k in one launch; else ``F.linear`` and the one-launch top-k); the class's forward is
restored on exit. Quantized and bf16 models alike: it is the generation path's, not the format's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .scan import scan

try:
    from ..kernels.moe_router import router_topk
except ImportError:  # no triton (CPU-only installs): transformers' own routers stay
    router_topk = None

__all__ = ["ROUTERS", "RouterMath", "fused_routers"]


@dataclass(frozen=True)
class RouterMath:
    #: renormalize the top k: True, or the name of the module's bool attribute that says so
    normalize: bool | str
    #: the returned scores are cast to the logits' dtype (else float32)
    cast: bool


_QWEN = RouterMath("norm_topk_prob", cast=True)

#: class name -> its forward's math (transformers 5: ``forward(hidden) -> (logits, scores, ids)``)
ROUTERS: dict[str, RouterMath] = {
    "Qwen3MoeTopKRouter": _QWEN,
    "Qwen2MoeTopKRouter": _QWEN,
    "Qwen3NextTopKRouter": _QWEN,
    "OlmoeTopKRouter": _QWEN,
    "FlexOlmoTopKRouter": _QWEN,
    "Qwen3VLMoeTextTopKRouter": RouterMath(True, cast=True),
    "Qwen3_5MoeTopKRouter": RouterMath(True, cast=True),
    "MixtralTopKRouter": RouterMath(True, cast=False),
}


def _forward(module: nn.Module, math: RouterMath) -> Any:
    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, module.hidden_dim)
        norm = math.normalize if isinstance(math.normalize, bool) else bool(getattr(module, math.normalize))
        logits, scores, ids = router_topk(hidden_states, module.weight, module.top_k, norm)
        return logits, scores.to(logits.dtype) if math.cast else scores, ids

    return forward


def _routers(model: nn.Module) -> list[tuple[nn.Module, RouterMath]]:
    out = []
    for m in scan(model).modules_of(ROUTERS):
        math = ROUTERS[type(m).__name__]
        if "forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks:
            continue  # a replaced forward or a hook: not the math this module's class was checked for
        if getattr(m, "bias", None) is not None or not isinstance(getattr(m, "weight", None), torch.Tensor):
            continue
        if not hasattr(m, "hidden_dim") or not hasattr(m, "top_k"):
            continue
        out.append((m, math))
    return out


@contextlib.contextmanager
def fused_routers(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, the model's known routers run ``router_topk`` (on CUDA one launch at decode,
    the logits with the top k; the same torch math on the CPU) and the block yields how many; their
    forward is restored on exit, also on an exception."""
    routers = _routers(model) if enabled and router_topk is not None else []
    for m, math in routers:
        m.forward = _forward(m, math)
    try:
        yield len(routers)
    finally:
        for m, _ in routers:
            m.__dict__.pop("forward", None)
