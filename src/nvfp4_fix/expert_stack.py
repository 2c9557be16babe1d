"""Experts computed by one grouped kernel per projection instead of a Python loop over the hit experts.

:func:`stack` lays the packed experts of an ``NVFP4Experts`` block out as one buffer per projection:
gate and up as [E, 2I, H/2] codes + [E, 2I, H/16] scales (each expert's gate rows, then its up rows),
down as [E, H, I/2] + [E, H, I/16], and each expert's per-tensor multipliers as [E, 2] (gate, up: they
may differ) and [E, 1]. The experts' own parameters become views of those buffers (no extra memory;
``state_dict`` still writes each expert under its checkpoint name, as copies).

:func:`grouped_forward` then routes all (token, expert) pairs on the device and runs
``kernels.moe_grouped.expert_mm`` for gate_up and for down: no ``torch.unique(...).tolist()`` host sync,
the same launches for any routing (CUDA-graph capturable; under torch.compile an opaque custom op).
The down kernel multiplies each pair's row by its routing weight in float32, and one launch sums each
token's rows; SiLU experts get silu(gate) * up in the gate_up kernel's epilogue. Decode-sized routings
of SiLU experts run ``kernels.moe_decode`` instead: on tensor cores (``kernels.cuda_moe``: gate, up
and SiLU in one launch, down, the pair sum) where they support the call, else two Triton launches
(gate, up and SiLU; down and the pair sum). W4A4 experts quantize each pair's activations with that
expert's own input scale (the torch ops).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layer import NVFP4Linear, fake_quantize_activations

__all__ = ["Stacked", "applies", "grouped_forward", "stack"]

#: device types whose experts run the grouped kernel (the CPU keeps the per-expert loop: there the
#: loop costs no device sync, and the interpreter would be slow; tests add "cpu")
GROUPED_DEVICES: tuple[str, ...] = ("cuda",)


@dataclass
class Stacked:
    gate_up_codes: torch.Tensor  # [E, 2I, H/2] uint8
    gate_up_scales: torch.Tensor  # [E, 2I, H/16] e4m3
    gate_up_mul: torch.Tensor  # [E, 2] float32 multipliers (gate, up)
    down_codes: torch.Tensor  # [E, H, I/2]
    down_scales: torch.Tensor  # [E, H, I/16]
    down_mul: torch.Tensor  # [E, 1]
    divisors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # W4A4: [E] gate, up, down


def _members(block: nn.Module) -> list[tuple[NVFP4Linear, NVFP4Linear, NVFP4Linear]] | None:
    names = block.names  # type: ignore[attr-defined]
    out = []
    for e in range(block.num_experts):  # type: ignore[attr-defined]
        expert = block._modules[str(e)]
        trio = tuple(getattr(expert, names[r], None) for r in ("gate", "up", "down"))
        if not all(isinstance(m, NVFP4Linear) for m in trio):
            return None
        out.append(trio)
    return out  # type: ignore[return-value]


def _eligible(members: list[tuple[NVFP4Linear, NVFP4Linear, NVFP4Linear]]) -> bool:
    g0, _, d0 = members[0]
    for gate, up, down in members:
        for m in (gate, up, down):
            if m.pre_quant_scale is not None or m.bias is not None or m.dense_weight is not None:
                return False
            if m.weight_packed.device != g0.weight_packed.device or m.weight_packed.device.type == "meta":
                return False
        if (gate.weight_packed.shape, up.weight_packed.shape) != (g0.weight_packed.shape,) * 2:
            return False
        if down.weight_packed.shape != d0.weight_packed.shape:
            return False
        if len({m._input_name is None for m in (gate, up, down)}) != 1:
            return False
    return True


def _point(layer: NVFP4Linear, codes: torch.Tensor, scales: torch.Tensor) -> None:
    from .fusion import _copy_views

    layer._fused = None  # a per-expert q/k/v-style fusion: superseded by the stack
    layer._parameters[layer._packed_name] = nn.Parameter(codes, requires_grad=False)
    layer.weight_scale = nn.Parameter(scales, requires_grad=False)
    if not getattr(layer, "_nvfp4_fix_stacked", False):
        layer._register_state_dict_hook(_copy_views)
        layer._nvfp4_fix_stacked = True  # type: ignore[attr-defined]


def stack(block: nn.Module) -> Stacked | None:
    """Stack ``block``'s experts (see the module text), or None where they do not qualify (FP8 or AWQ
    experts, biases, dense copies, mixed devices or shapes): those keep the per-expert loop."""
    members = _members(block)
    if not members or not _eligible(members):
        return None
    with torch.no_grad():
        gate_up_codes = torch.stack([torch.cat([g.weight_packed, u.weight_packed]) for g, u, _ in members])
        gate_up_scales = torch.stack([torch.cat([g.weight_scale, u.weight_scale]) for g, u, _ in members])
        down_codes = torch.stack([d.weight_packed for _, _, d in members])
        down_scales = torch.stack([d.weight_scale for _, _, d in members])
        gate_up_mul = torch.stack([torch.stack([g.weight_mul, u.weight_mul]) for g, u, _ in members])
        down_mul = torch.stack([d.weight_mul for _, _, d in members]).view(-1, 1)
        divisors = None
        if members[0][0]._input_name is not None:
            divisors = tuple(  # type: ignore[assignment]
                torch.stack([m[r].input_divisor.reshape(()) for m in members]) for r in range(3)
            )
    rows = members[0][0].out_features
    for e, (gate, up, down) in enumerate(members):
        _point(gate, gate_up_codes[e, :rows], gate_up_scales[e, :rows])
        _point(up, gate_up_codes[e, rows:], gate_up_scales[e, rows:])
        _point(down, down_codes[e], down_scales[e])
    return Stacked(gate_up_codes, gate_up_scales, gate_up_mul.float(), down_codes, down_scales,
                   down_mul.float(), divisors)  # fmt: skip


def intact(block: nn.Module, st: Stacked) -> bool:
    """Whether the experts still compute from the stacked buffers (not moved or reloaded since)."""
    first = block._modules["0"]
    gate = getattr(first, block.names["gate"])  # type: ignore[index]
    return gate.weight_packed.data_ptr() == st.gate_up_codes.data_ptr()


def applies(x: torch.Tensor) -> bool:
    """Inference only: the kernel has no backward, so inputs that need a gradient (training adapters
    upstream) take the per-expert loop, whose layers do."""
    from .kernels import HAS_TRITON

    needs_grad = torch.is_grad_enabled() and x.requires_grad
    return HAS_TRITON and x.device.type in GROUPED_DEVICES and x.dim() == 2 and not needs_grad


def _quantized(x: torch.Tensor, divisor: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Each row quantized with its expert's activation scale (invalid expert ids: any scale)."""
    per_row = divisor[expert.clamp(0, divisor.numel() - 1)].view(-1, 1, 1)
    return fake_quantize_activations(x, per_row)


def grouped_forward(
    st: Stacked,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    act_fn: Any,
    quantize_activations: bool,
) -> torch.Tensor:
    """sum_k w[t, k] * down_e(act(gate_e(x_t)) * up_e(x_t)) over each token's routed experts e = idx[t, k];
    ``quantize_activations``: W4A4 experts quantize each pair's inputs with that expert's scales.
    SiLU experts without activation quantization: decode-sized routings run ``kernels.moe_decode``
    (2 or 3 launches), and so do routings up to ``moe_decode.SORTED_MAX_PAIRS`` pairs where its CUDA
    kernels take the pairs sorted by expert; larger ones apply silu(gate) * up in the grouped gate_up
    kernel's epilogue."""
    from .kernels import moe_decode as md
    from .kernels import moe_grouped as mg
    from .kernels import moe_route

    t, h = hidden_states.shape
    k = top_k_index.shape[1]
    e, rows = st.gate_up_codes.shape[0], st.gate_up_codes.shape[1] // 2
    block_m = mg.block_m_for(t * k)
    compiling = torch.compiler.is_compiling()
    quantize = st.divisors is not None and quantize_activations
    silu = md.is_silu(act_fn)
    decode = block_m == 1 or md.sorted_cuda_may_run(hidden_states, t * k, h, rows)
    if decode and not quantize and silu:
        gate_up = (st.gate_up_codes, st.gate_up_scales, st.gate_up_mul)
        down = (st.down_codes, st.down_scales, st.down_mul)
        if compiling:
            op = torch.ops.nvfp4_fix.moe_decode_experts
            return op(hidden_states, top_k_index, top_k_weights, *gate_up, *down)
        return md.decode_experts(hidden_states, top_k_index, top_k_weights, gate_up, down)
    plan = moe_route.route(top_k_index, e, block_m)
    flat = top_k_index.reshape(-1)

    def mm(x: torch.Tensor, x_div: int, codes: torch.Tensor, scales: torch.Tensor, mul: torch.Tensor,
           rows_per_part: int, pair_weights: torch.Tensor | None = None,
           glu: bool = False) -> torch.Tensor:  # fmt: skip
        if compiling:
            op = torch.ops.nvfp4_fix.moe_expert_mm
            p = plan
            return op(x, x_div, p.pairs, p.block_expert, p.num_pairs, p.block_m, codes, scales, mul,
                      rows_per_part, pair_weights, glu)  # fmt: skip
        return mg.expert_mm(x, x_div, plan, codes, scales, mul, rows_per_part, pair_weights=pair_weights,
                            silu_glu=glu)  # fmt: skip

    if not quantize and silu and block_m > 1:  # silu(gate) * up in the gate_up kernel's epilogue
        act = mm(hidden_states, k, st.gate_up_codes, st.gate_up_scales, st.gate_up_mul, rows, glu=True)
    elif not quantize:
        gate_up = mm(hidden_states, k, st.gate_up_codes, st.gate_up_scales, st.gate_up_mul, rows)
        act = act_fn(gate_up[:, :rows]) * gate_up[:, rows:]
    else:
        assert st.divisors is not None
        per_pair = hidden_states.repeat_interleave(k, dim=0)
        gate = mm(_quantized(per_pair, st.divisors[0], flat), 1, st.gate_up_codes[:, :rows],
                  st.gate_up_scales[:, :rows], st.gate_up_mul[:, 0:1], rows)  # fmt: skip
        up = mm(_quantized(per_pair, st.divisors[1], flat), 1, st.gate_up_codes[:, rows:],
                st.gate_up_scales[:, rows:], st.gate_up_mul[:, 1:2], rows)  # fmt: skip
        act = _quantized(act_fn(gate) * up, st.divisors[2], flat)
    # float32 rows, each times its pair's routing weight (the kernel's epilogue); one launch sums them
    down = mm(act, 1, st.down_codes, st.down_scales, st.down_mul, h, top_k_weights.reshape(-1))
    if compiling:
        return torch.ops.nvfp4_fix.moe_sum_pairs(down, top_k_index, e, hidden_states.dtype)
    return md.sum_pairs(down, top_k_index, e, hidden_states.dtype)
