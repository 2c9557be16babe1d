"""What :func:`generate` needs from a model's module tree, found in one walk per model and kept on it.

A Qwen3-30B-A3B-shaped NVFP4 model has ~25k modules and ~56k tensors (a module per expert projection).
One walk over them takes ~25-100 ms on a CPU, and every generate call took three (the device of every
tensor, the sdpa configs, the routers): more than the GPU time of a 1-token call. The walk is redone
after :func:`forget` (``clear_cache(model)``), and when the devices of a sample of the tensors differ
from the walk's (a whole-model ``.to()`` moves every one of them). A module tree changed in place after
a generate call (adapters added, say) needs ``clear_cache(model)``, as its captured graphs do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["ModuleScan", "forget", "scan"]

ATTR = "_nvfp4_fix_module_scan"
#: modules holding tensors whose devices each call re-checks
SAMPLES = 64
_META = torch.device("meta")


@dataclasses.dataclass(frozen=True)
class ModuleScan:
    by_class: dict[str, tuple[nn.Module, ...]]  # every module, by its class name
    configs: tuple[object, ...]  # every transformers config the modules hold, sub-configs included
    devices: frozenset[torch.device]  # of every parameter and buffer (meta ones left out)
    sample: tuple[nn.Module, ...]  # modules spread over the tree whose tensors' devices ...
    sample_devices: tuple[torch.device, ...]  # ... were these at the walk

    def modules_of(self, class_names: Iterable[str]) -> list[nn.Module]:
        return [m for name in class_names for m in self.by_class.get(name, ())]


def _devices(modules: Iterable[nn.Module]) -> list[torch.device]:
    return [
        t.device for m in modules for d in (m._parameters, m._buffers) for t in d.values() if t is not None
    ]


def _configs(modules: Iterable[nn.Module]) -> tuple[object, ...]:
    from transformers import PretrainedConfig

    seen: dict[int, object] = {}
    todo = [m.__dict__.get("config") for m in modules]
    while todo:
        cfg = todo.pop()
        if not isinstance(cfg, PretrainedConfig) or id(cfg) in seen:
            continue
        seen[id(cfg)] = cfg
        todo.extend(getattr(cfg, k, None) for k in getattr(cfg, "sub_configs", {}) or {})
    return tuple(seen.values())


def _walk(model: nn.Module) -> ModuleScan:
    modules = list(model.modules())
    by_class: dict[str, list[nn.Module]] = {}
    for m in modules:
        by_class.setdefault(type(m).__name__, []).append(m)
    holders = [m for m in modules if m._parameters or m._buffers]
    step = max(1, -(-len(holders) // SAMPLES))
    sample = tuple(holders[::step]) + tuple(holders[-1:])
    return ModuleScan(
        by_class={k: tuple(v) for k, v in by_class.items()},
        configs=_configs(modules),
        devices=frozenset(_devices(holders)) - {_META},
        sample=sample,
        sample_devices=tuple(_devices(sample)),
    )


def scan(model: nn.Module) -> ModuleScan:
    """The model's scan, walked now if it has none or its sampled tensors moved since."""
    found: ModuleScan | None = model.__dict__.get(ATTR)
    if found is None or tuple(_devices(found.sample)) != found.sample_devices:
        found = _walk(model)
        model.__dict__[ATTR] = found
    return found


def forget(model: nn.Module) -> None:
    model.__dict__.pop(ATTR, None)
