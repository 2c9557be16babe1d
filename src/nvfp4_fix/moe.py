"""Packed NVFP4 experts for transformers 5 mixture-of-experts blocks.

transformers 5 fuses a block's experts into 3-D parameters (``gate_up_proj`` [E, 2I, H],
``down_proj`` [E, H, I]). NVFP4 checkpoints store one linear per expert, each with its own global
scale (gate and up of one expert may differ), so this module keeps them as one :class:`NVFP4Linear`
(or :class:`FP8Linear`) per expert and projection, under the checkpoint's names and scales, and
computes only the experts that tokens were routed to.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from . import expert_stack
from .checkpoint import CheckpointInfo, QuantizedModule
from .errors import CheckpointError
from .fp8 import FP8Linear
from .layer import NVFP4Linear

_EXPERT = re.compile(r"^(?P<block>.+\.experts)\.(?P<idx>\d+)\.(?P<proj>[A-Za-z0-9_]+)$")
_ROLES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def expert_groups(quantized: dict[str, QuantizedModule]) -> dict[str, list[str]]:
    """Per-expert checkpoint prefixes grouped by their experts block: {'...mlp.experts': [...]}."""
    groups: dict[str, list[str]] = {}
    for prefix in quantized:
        m = _EXPERT.match(prefix)
        if m and m["proj"] in _ROLES:
            groups.setdefault(m["block"], []).append(prefix)
    return groups


class NVFP4Experts(nn.Module):
    """Drop-in for a fused experts module: forward(hidden_states, top_k_index, top_k_weights)."""

    def __init__(self, num_experts: int, act_fn: Any, names: dict[str, str]) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.names = names  # role -> checkpoint projection name, e.g. {"gate": "w1", ...}
        self.activation_mode = "quantize"

    @classmethod
    def replacing(
        cls,
        old: nn.Module,
        members: list[str],
        info: CheckpointInfo,
        layout: str,
        dtype: torch.dtype,
        config: Any,
    ) -> NVFP4Experts:
        parsed = [(_EXPERT.match(p), p) for p in members]
        num = max(int(m["idx"]) for m, _ in parsed) + 1
        names = {_ROLES[m["proj"]]: m["proj"] for m, _ in parsed}
        if set(names) != {"gate", "up", "down"}:
            raise CheckpointError(
                f"{info.path}: experts need gate, up and down projections, found {sorted(names)}"
            )
        act_fn = getattr(old, "act_fn", None)
        if act_fn is None:
            from transformers.activations import ACT2FN

            act_fn = ACT2FN[getattr(config, "hidden_act", "silu")]
        new = cls(getattr(old, "num_experts", num), act_fn, names)
        for i in range(new.num_experts):
            expert = nn.Module()
            for proj in names.values():
                q = info.quantized.get(f"{members[0].rsplit('.', 2)[0]}.{i}.{proj}")
                if q is None:
                    raise CheckpointError(f"{info.path}: expert {i} has no quantized {proj}")
                layer: nn.Module
                if q.scheme == "fp8":
                    layer = FP8Linear.for_checkpoint(q, False, dtype)
                else:
                    layer = NVFP4Linear(
                        q.in_features,
                        q.out_features,
                        layout=layout,
                        input_scale=q.has_input_scale,
                        pre_quant_scale=q.has_pre_quant_scale,
                        dtype=dtype,
                        device="meta",
                    )
                setattr(expert, proj, layer)
            new.add_module(str(i), expert)
        return new

    def stacked(self) -> expert_stack.Stacked | None:
        """The experts as one buffer per projection (made on first use, again after the weights moved),
        or None where they do not qualify for the grouped kernel."""
        st = self.__dict__.get("_stacked")
        if torch.compiler.is_compiling():
            return st
        if st is None or not expert_stack.intact(self, st):
            st = None if self.__dict__.get("_unstackable") else expert_stack.stack(self)
            self.__dict__["_stacked"] = st
            self.__dict__["_unstackable"] = st is None
        return st

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        st = self.stacked() if expert_stack.applies(hidden_states) else None
        if st is not None:  # one grouped launch per projection, no host sync
            gate = getattr(self._modules["0"], self.names["gate"])  # the layers' mode, as in the loop
            quantize = gate.activation_mode == "quantize"
            x, idx, w = hidden_states, top_k_index, top_k_weights
            return expert_stack.grouped_forward(st, x, idx, w, self.act_fn, quantize)
        # CPU (and experts that do not qualify): one call per hit expert
        out = torch.zeros_like(hidden_states)
        hit = torch.unique(top_k_index).tolist()
        for e in hit:
            if not 0 <= e < self.num_experts:
                continue
            token_idx, k_pos = torch.where(top_k_index == e)
            expert = self._modules[str(e)]
            x = hidden_states[token_idx]
            h = self.act_fn(getattr(expert, self.names["gate"])(x)) * getattr(expert, self.names["up"])(x)
            y = getattr(expert, self.names["down"])(h) * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out
