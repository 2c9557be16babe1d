"""The routing step of MoE experts: which (token, expert) pairs each block of a grouped kernel computes.

``route(top_k_index, num_experts, block_m)`` sorts the T x K pairs by expert on the device (no host
sync: static shapes from T, K and the expert count) and pads each expert's run to a multiple of
``block_m``, as vLLM's ``moe_align_block_size`` does: ``pairs`` [blocks * block_m] holds pair ids
(``T * K`` marks padding) and ``block_expert`` [blocks] each block's expert (``num_experts`` for blocks
past the last one, and for pairs routed to an id outside [0, num_experts), which are skipped). Pair p is
token p // K's k-th choice, k = p % K. ``block_m`` 1 is the indexed layout: no sorting.

The sort is torch ops (``route_torch``), or with ``settings.moe_route_kernel`` one Triton program
(``_route_kernel``, ``torch.ops.nvfp4_fix.moe_route`` under torch.compile) that lays the pairs out
identically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import settings
from .device import on_device_of

__all__ = ["RoutePlan", "INDEXED_MAX_PAIRS", "ROUTE_KERNEL_MAX_PAIRS", "route", "route_torch"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Up to this many (token, expert) pairs the kernels take them indexed, one pair per program (batch 8
#: at top-8: at most a few tokens share an expert), without a routing step.
INDEXED_MAX_PAIRS = 64


@dataclass(frozen=True)
class RoutePlan:
    pairs: torch.Tensor  # [blocks * block_m] int32 pair ids in expert order, num_pairs = padding
    # (block_m 1: each pair's expert id, any integer dtype)
    block_expert: torch.Tensor  # [blocks] int32
    num_pairs: int
    block_m: int


#: With ``settings.moe_route_kernel`` on, up to this many pairs ``route`` is one Triton program
#: (``_route_kernel``: a sort of the pairs in registers) instead of ~35 torch ops, which in a CUDA graph
#: cost more than the expert kernels they feed at 128 pairs (benchmarks/RESULTS-moe-humming.md,
#: session 15); on by default since session 16's H100 run (1.25-1.62x faster experts calls at 16-256 tokens).
ROUTE_KERNEL_MAX_PAIRS = 4096


def route(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> RoutePlan:
    """Pairs sorted by expert, each expert's run padded to ``block_m`` (device ops only). ``block_m``
    1 is the indexed layout for decode-sized routings: no sorting, ``pairs`` holds each pair's expert
    id (``top_k_index``'s dtype) and each program of the kernel computes one pair (a weight is read
    once per pair that uses it)."""
    n = top_k_index.numel()
    if block_m == 1:  # the kernel reads the ids as they come (no cast launch)
        ids = top_k_index.reshape(-1)
        return RoutePlan(ids, ids.new_empty(0, dtype=torch.int32), n, 1)
    one_program = settings.current().moe_route_kernel and (top_k_index.is_cuda or _INTERPRET)
    if one_program and 0 < n <= ROUTE_KERNEL_MAX_PAIRS and top_k_index.dim() == 2:
        if torch.compiler.is_compiling():
            pairs, block_expert = torch.ops.nvfp4_fix.moe_route(top_k_index, num_experts, block_m)
        else:  # eager: without the op's dispatch cost
            pairs, block_expert = _route_one_program(top_k_index, num_experts, block_m)
        return RoutePlan(pairs, block_expert, n, block_m)
    return route_torch(top_k_index, num_experts, block_m)


def route_torch(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> RoutePlan:
    """``route`` with torch ops (any size; ``route``'s reference in the tests)."""
    flat = top_k_index.reshape(-1).long()
    n = flat.numel()
    dev = flat.device
    valid = (flat >= 0) & (flat < num_experts)
    expert = torch.where(valid, flat, torch.full_like(flat, num_experts))  # num_experts: skipped
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=dev).scatter_add_(
        0, expert, torch.ones_like(expert)
    )
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    order = torch.sort(expert, stable=True).indices  # pairs in expert order
    sorted_expert = expert[order]
    start = counts.cumsum(0) - counts
    rank = torch.arange(n, device=dev) - start[sorted_expert]
    blocks = _route_blocks(n, num_experts, block_m)
    pairs = torch.full((blocks * block_m,), n, dtype=torch.int32, device=dev)
    pairs.scatter_(0, padded_start[sorted_expert] + rank, order.to(torch.int32))
    block_start = torch.arange(blocks, device=dev) * block_m
    block_expert = torch.searchsorted(padded_end, block_start, right=True).clamp_(max=num_experts)
    return RoutePlan(pairs, block_expert.to(torch.int32), n, block_m)


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _route_kernel(
    ids_ptr, stride_t, stride_k, pairs_ptr, block_expert_ptr, scratch_ptr, n, K, E, slots, blocks,
    BLOCK_N: tl.constexpr, BM: tl.constexpr, FILL: tl.constexpr,
):  # fmt: skip
    """route_torch's layout in one program: the pairs sorted by (expert, pair id) as keys
    expert * BLOCK_N + p; an element's rank in its expert's run from the run's first index (a running
    max of run starts), its slot = its sorted index + the padding of the runs before it (an exclusive
    running sum). Ids outside [0, E) sort as expert E (written, as route_torch does; their blocks say
    E), lanes past the pairs as E + 1 (not written)."""
    i = tl.arange(0, BLOCK_N)
    t = i // K
    e = tl.load(
        ids_ptr + t.to(tl.int64) * stride_t + (i - t * K).to(tl.int64) * stride_k, mask=i < n, other=0
    )
    e = e.to(tl.int32)
    e = tl.where((e >= 0) & (e < E), e, E)
    e = tl.where(i < n, e, E + 1)
    key = tl.sort(e * BLOCK_N + i, 0)
    se = key // BLOCK_N
    tl.store(scratch_ptr + i, se)  # neighbours through memory: one program, so a barrier orders them
    tl.debug_barrier()
    prev = tl.load(scratch_ptr + i - 1, mask=i > 0, other=-1)
    nxt = tl.load(scratch_ptr + i + 1, mask=i + 1 < BLOCK_N, other=-1)
    run_start = tl.associative_scan(tl.where(se != prev, i, 0), 0, _max_combine)
    rank = i - run_start
    pad = tl.where((se != nxt) & (se < E), (BM - (rank + 1) % BM) % BM, 0)
    slot = i + tl.cumsum(pad, 0) - pad
    for off in range(0, slots, FILL):
        o = off + tl.arange(0, FILL)
        tl.store(pairs_ptr + o, tl.zeros([FILL], dtype=tl.int32) + n, mask=o < slots)
    for off in range(0, blocks, FILL):
        o = off + tl.arange(0, FILL)
        tl.store(block_expert_ptr + o, tl.zeros([FILL], dtype=tl.int32) + E, mask=o < blocks)
    tl.debug_barrier()
    written = se <= E
    tl.store(pairs_ptr + slot, key - se * BLOCK_N, mask=written)
    tl.store(block_expert_ptr + slot // BM, se, mask=written)


def _route_blocks(n: int, num_experts: int, block_m: int) -> int:
    return triton.cdiv(n, block_m) + num_experts + 1  # every expert's run can add one partial block


def _route_one_program(
    top_k_index: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n = top_k_index.numel()
    dev = top_k_index.device
    blocks = _route_blocks(n, num_experts, block_m)
    pairs = torch.empty(blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(blocks, dtype=torch.int32, device=dev)
    block_n = max(16, triton.next_power_of_2(n))
    scratch = torch.empty(block_n, dtype=torch.int32, device=dev)
    with on_device_of(top_k_index):
        _route_kernel[(1,)](
            top_k_index, top_k_index.stride(0), top_k_index.stride(1), pairs, block_expert, scratch, n,
            top_k_index.shape[1], num_experts, blocks * block_m, blocks, BLOCK_N=block_n, BM=block_m,
            FILL=1024, num_warps=8 if block_n >= 2048 else 4,
        )  # fmt: skip
    return pairs, block_expert


@torch.library.custom_op("nvfp4_fix::moe_route", mutates_args=())
def _route_op(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _route_one_program(top_k_index, num_experts, block_m)


@_route_op.register_fake
def _route_fake(top_k_index, num_experts, block_m):
    blocks = _route_blocks(top_k_index.numel(), num_experts, block_m)
    return (
        top_k_index.new_empty(blocks * block_m, dtype=torch.int32),
        top_k_index.new_empty(blocks, dtype=torch.int32),
    )
