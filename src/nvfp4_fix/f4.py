"""NVFP4 codes stored with the safetensors ``F4`` dtype: the header holds the logical shape [N, K], the
bytes are the packed [N, K/2] pairs (the same bytes as ``U8``), and safetensors reads them as
``torch.float4_e2m1fn_x2`` [N, K/2].

transformers reads checkpoint tensors through safetensors slices, which reshape F4 data to the header's
logical shape and fail. So a layer whose codes are F4 is built without its codes parameter (the key is
then not one transformers loads), and :func:`fill_codes` reads them after the other weights, with
``get_tensor``, as the uint8 pairs every kernel takes. ``state_dict()`` hands them back as
``float4_e2m1fn_x2``, so a save writes ``F4`` [N, K] again: the checkpoint's own convention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointInfo
from .errors import CheckpointError

F4_DTYPE = torch.float4_e2m1fn_x2


def defer_codes(layer: nn.Module) -> nn.Module:
    """Take an NVFP4Linear's codes parameter out until :func:`fill_codes` puts the checkpoint's in."""
    name = layer._packed_name
    layer._parameters.pop(name)
    layer._f4_codes = name
    layer._register_state_dict_hook(_as_f4)
    return layer


def _as_f4(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    key = prefix + module._f4_codes
    if key in state and state[key].dtype == torch.uint8:
        state[key] = state[key].view(F4_DTYPE)


def fill_codes(model: nn.Module, info: CheckpointInfo, prefix_map: dict[str, str]) -> int:
    """Read every deferred F4 codes tensor into its layer as uint8 [N, K/2], beside its block scales."""
    from safetensors import safe_open

    filled = 0
    for ckpt_prefix, target in prefix_map.items():
        module = model.get_submodule(target)
        name = getattr(module, "_f4_codes", None)
        if name is None or name in module._parameters:
            continue
        key = info.packed_name(ckpt_prefix)
        t = info.tensors.get(key)
        if t is None:
            raise CheckpointError(f"{info.path}: no tensor {key!r} for {target}.{name}")
        with safe_open(str(t.file), framework="pt", device="cpu") as f:
            codes = f.get_tensor(key).view(torch.uint8)
        expected = (module.out_features, module.in_features // 2)
        if tuple(codes.shape) != expected:
            raise CheckpointError(
                f"{t.file}: tensor {key!r} reads as {list(codes.shape)}; expected {list(expected)}"
            )
        device = module.weight_scale.device
        module._parameters[name] = nn.Parameter(codes.to(device), requires_grad=False)
        filled += 1
    return filled


def ignore_unexpected(model: nn.Module, info: CheckpointInfo, prefix_map: dict[str, str]) -> None:
    """Keep transformers from reporting the deferred F4 keys as unexpected (a set in transformers 5,
    a list in 4.57)."""
    import re

    patterns = []
    for p, q in info.nvfp4.items():
        if q.packed_dtype == "F4":
            leaf = info.packed_name(p).rpartition(".")[2]
            patterns += [re.escape(f"{p}.{leaf}") + "$", re.escape(f"{prefix_map.get(p, p)}.{leaf}") + "$"]
    if not patterns:
        return
    _allow_f4_headers()
    current = getattr(model, "_keys_to_ignore_on_load_unexpected", None)
    if isinstance(current, set):
        current.update(patterns)
    else:
        model._keys_to_ignore_on_load_unexpected = list(current or []) + patterns


def _allow_f4_headers() -> None:
    """transformers 4.57 lists a checkpoint's keys through a dtype table without F4 and refuses the file
    ("Cannot load safetensors of unknown dtype F4") before reading anything; give the table the entry.
    transformers 5 reads no such table."""
    try:
        from transformers import modeling_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    table = getattr(modeling_utils, "str_to_torch_dtype", None)
    if isinstance(table, dict):
        table.setdefault("F4", F4_DTYPE)
