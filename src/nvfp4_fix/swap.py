"""Swap a checkpoint's quantized linears for packed layers on a transformers model's meta skeleton.

Used by the quantizer (:mod:`nvfp4_fix.quantizer`) before transformers loads the weights: the new
modules carry parameters under the checkpoint's own names, dtypes and shapes, so transformers' loader
fills them as it fills any parameter.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import f4
from .checkpoint import COMPRESSED_TENSORS, CheckpointInfo, QuantizedModule
from .errors import CheckpointError
from .fp8 import FP8Linear
from .layer import NVFP4Linear
from .moe import NVFP4Experts, expert_groups


def name_candidates(model: nn.Module) -> Callable[[str], list[str]]:
    """Candidate model names for a checkpoint key, across transformers' key-renaming schemes.

    Last resort: the one model name that holds all of the key's components in order (e.g. a
    transformers-5 ``vision_tower.embeddings.x`` for 4.57's ``vision_tower.vision_model.embeddings.x``).
    """
    legacy = dict(getattr(model, "_checkpoint_conversion_mapping", {}) or {})
    renamings: list[Any] = []
    apply_renamings = None
    with contextlib.suppress(Exception):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    prefix = getattr(model, "base_model_prefix", "")
    by_tail: dict[tuple[str, ...], list[list[str]]] = {}
    for name in [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]:
        parts = name.split(".")
        by_tail.setdefault(tuple(parts[-2:]), []).append(parts)

    def in_order(needle: list[str], hay: list[str]) -> bool:
        it = iter(hay)
        return all(part in it for part in needle)

    def candidates(key: str) -> list[str]:
        out = [key]
        renamed = key
        for pattern, repl in legacy.items():
            renamed = re.sub(pattern, repl, renamed)
        out.append(renamed)
        if renamings and apply_renamings is not None:
            out.append(apply_renamings(key, renamings))
        for k in list(out):
            if prefix:
                out.append(f"{prefix}.{k}")
                if k.startswith(prefix + "."):
                    out.append(k[len(prefix) + 1 :])
        parts = key.split(".")
        loose = [h for h in by_tail.get(tuple(parts[-2:]), []) if in_order(parts, h)]
        if len(loose) == 1:
            out.append(".".join(loose[0]))
        return list(dict.fromkeys(out))

    return candidates


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _module_for(
    candidates: Callable[[str], list[str]], modules: dict[str, nn.Module], prefix: str
) -> str | None:
    return next(
        (c[: -len(".weight")] for c in candidates(prefix + ".weight") if c[: -len(".weight")] in modules),
        None,
    )


def make_linear(q: QuantizedModule, layout: str, bias: bool, dtype: torch.dtype) -> nn.Module:
    """The packed layer (on the meta device) for one quantized linear of the checkpoint."""
    if q.scheme == "fp8":
        return FP8Linear.for_checkpoint(q, bias, dtype)
    layer = NVFP4Linear(
        q.in_features,
        q.out_features,
        bias=bias,
        layout=layout,
        input_scale=q.has_input_scale,
        pre_quant_scale=q.has_pre_quant_scale,
        dtype=dtype,
        device="meta",
    )
    return f4.defer_codes(layer) if q.packed_dtype == "F4" else layer


def swap_quantized_modules(model: nn.Module, info: CheckpointInfo, dtype: torch.dtype) -> dict[str, str]:
    """Replace the checkpoint's quantized linears by packed layers; return checkpoint->model prefix map."""
    candidates = name_candidates(model)
    modules = dict(model.named_modules())
    prefix_map: dict[str, str] = {}
    layout = info.format or COMPRESSED_TENSORS

    pending: dict[str, QuantizedModule] = {}
    for ckpt_prefix, q in info.quantized.items():
        target = _module_for(candidates, modules, ckpt_prefix)
        old = modules.get(target) if target else None
        if not isinstance(old, nn.Linear):
            pending[ckpt_prefix] = q
            continue
        if (old.in_features, old.out_features) != (q.in_features, q.out_features):
            raise CheckpointError(
                f"{info.path}: tensor {info.packed_name(ckpt_prefix)!r} holds a {q.out_features}x"
                f"{q.in_features} layer but the config gives {old.out_features}x{old.in_features}"
            )
        set_module(model, target, make_linear(q, layout, old.bias is not None, dtype))
        prefix_map[ckpt_prefix] = target

    groups = expert_groups(pending)
    leftover = sorted(set(pending) - {p for members in groups.values() for p in members})
    if leftover:
        raise CheckpointError(
            f"{info.path}: quantized layer {leftover[0]!r} matches no nn.Linear of {type(model).__name__}"
            + (f" (and {len(leftover) - 1} more)" if len(leftover) > 1 else "")
        )
    for experts_prefix, members in groups.items():
        target = _module_for(candidates, modules, experts_prefix)
        if target is None:
            raise CheckpointError(
                f"{info.path}: experts {experts_prefix!r} match no module of {type(model).__name__}"
            )
        new = NVFP4Experts.replacing(modules[target], members, info, layout, dtype, model.config)
        set_module(model, target, new)
        prefix_map[experts_prefix] = target
    return prefix_map
