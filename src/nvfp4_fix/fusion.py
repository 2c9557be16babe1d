"""Fused q/k/v and gate/up: sibling NVFP4 layers that read the same input share one packed weight.

After ``fuse_siblings(model)`` the members' ``weight_packed`` / ``weight_scale`` are row views of one
[sum N, K/2] buffer (no extra memory), so a forward makes one kernel launch (and pays one launch's
host time) instead of three (two): the first member called computes every member's output with
per-row multipliers through the usual dispatch (any M), the others take their slice while their
input is the same tensor. Anything else (another input, a forced kernel, float32 activations) runs
the member alone, unchanged. Under torch.compile every
member is traced too: the first one records the fused call on the group, the others slice it, so a
compiled step also makes one launch per group.
``state_dict()`` returns copies, so checkpoints are written exactly as before.
"""

from __future__ import annotations

import torch
from torch import nn

from . import settings
from .kernels import HAS_TRITON, nvfp4_linear
from .layer import NVFP4Linear

SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


class FusedGroup:
    def __init__(self, members: list[NVFP4Linear]) -> None:
        self.members = members
        self.offsets = [0]
        for m in members:
            self.offsets.append(self.offsets[-1] + m.out_features)
        dev = members[0].weight_packed.device
        self.packed = torch.cat([m.weight_packed.detach() for m in members])
        self.scale = torch.cat([m.weight_scale.detach() for m in members])
        self.bias = None
        if any(m.bias is not None for m in members):
            self.bias = torch.cat(
                [
                    m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, device=dev)
                    for m in members
                ]
            ).to(members[0].bias.dtype if members[0].bias is not None else torch.bfloat16)
        for i, (m, lo, hi) in enumerate(zip(members, self.offsets, self.offsets[1:], strict=False)):
            m._parameters[m._packed_name] = nn.Parameter(self.packed[lo:hi], requires_grad=False)
            m.weight_scale = nn.Parameter(self.scale[lo:hi], requires_grad=False)
            m._fused = self
            m._fused_index = i
            m._register_state_dict_hook(_copy_views)
        self._row_mul: torch.Tensor | None = None
        self._mul_key: tuple[object, ...] | None = None
        self.row_mul()
        self._x: torch.Tensor | None = None
        self._x_version = -1
        self._y: torch.Tensor | None = None
        self._served: set[int] = set()
        self._traced_x: torch.Tensor | None = None
        self._traced_y: torch.Tensor | None = None
        self._traced_n = 0

    def row_mul(self) -> torch.Tensor:
        muls = [m.weight_mul for m in self.members]
        key = tuple((t.data_ptr(), t._version) for t in muls)
        if key != self._mul_key:
            self._row_mul = torch.cat(
                [t.reshape(1).expand(m.out_features) for t, m in zip(muls, self.members, strict=True)]
            ).contiguous()
            self._mul_key = key
        return self._row_mul

    def _applies(self, member: NVFP4Linear, x: torch.Tensor) -> bool:
        """The checks both paths share (all static, so torch.compile can trace them)."""
        return (
            HAS_TRITON  # the CUDA kernels that take per-row multipliers
            and x.is_cuda
            and x.device == self.packed.device
            and x.dtype in (torch.bfloat16, torch.float16)
            and settings.current().kernel == "auto"
            and self.members[0].weight_packed.device == self.packed.device
            and all(
                m.dense_weight is None and m.activation_mode == member.activation_mode for m in self.members
            )
        )

    def _slice(self, y: torch.Tensor, member: NVFP4Linear) -> torch.Tensor:
        return y[..., self.offsets[member._fused_index] : self.offsets[member._fused_index + 1]]

    def traced_output(self, member: NVFP4Linear, x: torch.Tensor) -> torch.Tensor | None:
        """Under torch.compile: the first member traced records the fused call, the others slice it
        while their input is the same traced tensor; None to run it alone. The record is dropped once
        every member took its slice, so no tensor outlives the trace."""
        if not (self._applies(member, x) and self._mul_key is not None):
            return None
        if self._traced_x is not x:
            xin = self.members[0].prepare_input(x)  # identical for every member (fuse_siblings checks)
            self._traced_y = nvfp4_linear(xin, self.packed, self.scale, self._row_mul, self.bias)
            self._traced_x, self._traced_n = x, 0
        y = self._slice(self._traced_y, member)
        self._traced_n += 1
        if self._traced_n == len(self.members):
            self._traced_x = self._traced_y = None
        return y

    def intact(self) -> bool:
        first = self.members[0].weight_packed
        return first.device == self.packed.device and first.data_ptr() == self.packed.data_ptr()

    def output(self, member: NVFP4Linear, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output computed through the fused weight, or None to run it alone."""
        if not (self._applies(member, x) and self.intact()):
            return None
        i = member._fused_index
        if self._x is not x or self._x_version != x._version or i in self._served:
            xin = self.members[0].prepare_input(x)
            self._y = nvfp4_linear(xin, self.packed, self.scale, self.row_mul(), self.bias)
            self._x, self._x_version, self._served = x, x._version, set()
        y = self._slice(self._y, member)
        self._served.add(i)
        if len(self._served) == len(self.members):
            self._x = self._y = None
        return y


def _copy_views(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name in (module._packed_name, "weight_scale"):
        key = prefix + name
        if key in state_dict:
            state_dict[key] = state_dict[key].clone()


def _same_inputs(members: list[NVFP4Linear]) -> bool:
    """Members whose input transformation (AWQ pre-scale, W4A4 activation scale) is identical."""
    first = members[0]

    def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
        return (a is None) == (b is None) and (a is None or torch.equal(a, b))

    return all(
        m.layout == first.layout
        and m.in_features == first.in_features
        and m.weight_packed.device == first.weight_packed.device
        and same(m.pre_quant_scale, first.pre_quant_scale)
        and same(m.input_divisor, first.input_divisor)
        and (m.bias is None or first.bias is None or m.bias.dtype == first.bias.dtype)
        for m in members
    )


def fuse_siblings(model: nn.Module, device_types: tuple[str, ...] = ("cuda",)) -> int:
    """Fuse q/k/v and gate/up NVFP4 siblings whose weights are on these device types (the fused
    kernel is CUDA only; elsewhere members keep computing alone); returns the number of groups."""
    if not settings.current().fuse:
        return 0
    groups = 0
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if not all(isinstance(m, NVFP4Linear) and m._fused is None for m in members):
                continue
            if members[0].weight_packed.device.type not in device_types or not _same_inputs(members):
                continue
            FusedGroup(members)
            groups += 1
    return groups
