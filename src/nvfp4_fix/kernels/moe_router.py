"""Softmax routing of a mixture-of-experts layer in one launch: softmax over the experts in float32,
the top k, optionally renormalized to sum to 1.

transformers' routers (``Qwen3MoeTopKRouter`` and kin) compute ``softmax`` -> ``torch.topk`` ->
divide; under torch.compile the top-k stays ATen's sort-based kernels (``gatherTopK`` and
``bitonicSortKVInPlace``, 9.6 us a layer at batch 1 on an H100, benchmarks/RESULTS-moe.md), more than
the layer's q/k/v projection. Here one program per token row keeps the row's logits in registers and
takes the k largest by repeated max (the lowest expert id first among equal probabilities).

:func:`router_topk` also computes the logits (``hidden @ weight.T``): for decode-sized calls on CUDA in
the same launch (the router GEMM was a cuBLAS launch of ~5 us a layer, benchmarks/RESULTS-moe.md), as
``_gemv_topk_kernel``: each token's experts are split over ~32 programs, each writes its logits, and
the token's last program to finish (an atomic counter) takes the top k.

:func:`softmax_topk` and :func:`router_topk` are the opaque ops ``torch.ops.nvfp4_fix.softmax_topk`` and
``router_topk`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``; the same math in torch elsewhere).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .device import arrival_counters, on_device_of

__all__ = ["FUSED_MAX_TOKENS", "MAX_EXPERTS", "router_topk", "softmax_topk", "softmax_topk_reference"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: experts a row may have for the one-program kernel (the row lives in registers)
MAX_EXPERTS = 4096


#: Most token rows :func:`router_topk` computes in one launch (decode); more go to the GEMM (cuBLAS), then
#: :func:`softmax_topk`
FUSED_MAX_TOKENS = 16
#: programs per token row of the fused kernel, each taking E / PARTS experts' logits (H100, Qwen3-30B-A3B's
#: router, benchmarks/bench_router.py: 5.2 us a router at 128 programs, 6.8 at 32, 10.1 at 16; F.linear
#: + softmax_topk 7.25)
PARTS = 128


@triton.jit
def _topk_of_row(x, offs, E, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr, NORMALIZE: tl.constexpr):
    """(values [KP], ids [KP]) of one row's logits x [BLOCK] (padded slots -inf): float32 softmax, the
    k largest by repeated max, optionally renormalized; slots past K hold 0."""
    valid = offs < E
    e = tl.exp(x - tl.max(x, 0))
    p = e / tl.sum(e, 0)
    work = tl.where(valid, p, -1.0)  # probabilities are >= 0: a taken or padded slot is -1
    kofs = tl.arange(0, KP)
    top = tl.zeros([KP], tl.float32)
    idx = tl.zeros([KP], tl.int64)
    for j in tl.static_range(K):
        v = tl.max(work, 0)
        i = tl.min(tl.where(work == v, offs, BLOCK), 0)
        i = tl.minimum(i, E - 1)  # a NaN row matches nothing: keep the id in range (its values are NaN)
        top = tl.where(kofs == j, v, top)
        idx = tl.where(kofs == j, i.to(tl.int64), idx)
        work = tl.where(offs == i, -1.0, work)
    if NORMALIZE:
        top = top / tl.sum(top, 0)  # the KP - K padded slots hold 0
    return top, idx


@triton.jit
def _softmax_topk_kernel(
    logits, stride_row, values, indices, E, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
    NORMALIZE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x = tl.load(logits + row * stride_row + offs, mask=offs < E, other=float("-inf")).to(tl.float32)
    top, idx = _topk_of_row(x, offs, E, K, KP, BLOCK, NORMALIZE)
    kofs = tl.arange(0, KP)
    tl.store(values + row * K + kofs, top, mask=kofs < K)
    tl.store(indices + row * K + kofs, idx, mask=kofs < K)


@triton.jit
def _gemv_topk_kernel(
    x_ptr, stride_x, w_ptr, stride_w, logits, stride_l, work, counts, values, indices, H, E,
    K: tl.constexpr, KP: tl.constexpr, BE: tl.constexpr, BH: tl.constexpr, BLOCK: tl.constexpr,
    NORMALIZE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BE + tl.arange(0, BE)
    acc = tl.zeros([BE], tl.float32)
    for h0 in range(0, H, BH):
        h = h0 + tl.arange(0, BH)
        xv = tl.load(x_ptr + row * stride_x + h, mask=h < H, other=0.0).to(tl.float32)
        wv = tl.load(
            w_ptr + e[:, None] * stride_w + h[None, :], mask=(e[:, None] < E) & (h[None, :] < H), other=0.0
        )
        acc += tl.sum(wv.to(tl.float32) * xv[None, :], 1)
    # the logits in the model's dtype, rounded to nearest as F.linear returns them
    out = acc.to(logits.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(logits + row * stride_l + e, out, mask=e < E)
    tl.store(work + row * BLOCK + e, out.to(tl.float32), mask=e < E)
    # the atomic (acq_rel) orders this program's stores before it and the last program's loads after it
    arrived = tl.atomic_add(counts + row, 1)
    if arrived == tl.num_programs(1) - 1:  # every other program of this row has stored its logits
        tl.store(counts + row, 0)  # ready for the next call (a replayed graph reuses the counters)
        offs = tl.arange(0, BLOCK)
        lg = tl.load(work + row * BLOCK + offs, mask=offs < E, other=float("-inf"), cache_modifier=".cg")
        top, idx = _topk_of_row(lg, offs, E, K, KP, BLOCK, NORMALIZE)
        kofs = tl.arange(0, KP)
        tl.store(values + row * K + kofs, top, mask=kofs < K)
        tl.store(indices + row * K + kofs, idx, mask=kofs < K)


def softmax_topk_reference(
    logits: torch.Tensor, k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' router math: float32 softmax, ``torch.topk``, optional renormalization."""
    probs = torch.softmax(logits.float(), dim=-1)
    values, indices = torch.topk(probs, k, dim=-1)
    if normalize:
        values = values / values.sum(dim=-1, keepdim=True)
    return values, indices


def _launch(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, experts = logits.shape
    values = torch.empty((rows, k), dtype=torch.float32, device=logits.device)
    indices = torch.empty((rows, k), dtype=torch.int64, device=logits.device)
    if rows:
        block = triton.next_power_of_2(experts)
        with on_device_of(logits):
            _softmax_topk_kernel[(rows,)](
                logits, logits.stride(0), values, indices, experts, K=k, KP=triton.next_power_of_2(k),
                BLOCK=block, NORMALIZE=normalize, num_warps=1 if block <= 256 else 4,
            )  # fmt: skip
    return values, indices


def _softmax_topk(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.is_cuda or (_INTERPRET and logits.device.type == "cpu"):
        return _launch(logits, k, normalize)
    return softmax_topk_reference(logits, k, normalize)


@torch.library.custom_op("nvfp4_fix::softmax_topk", mutates_args=())
def _softmax_topk_op(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _softmax_topk(logits, k, normalize)


@_softmax_topk_op.register_fake
def _softmax_topk_fake(logits, k, normalize):
    rows = logits.shape[0]
    return logits.new_empty((rows, k), dtype=torch.float32), logits.new_empty((rows, k), dtype=torch.int64)


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32 [T, k], expert ids int64 [T, k]) of router logits [T, E], largest first.

    Equal to :func:`softmax_topk_reference` within float32 rounding; the ids differ only where two
    probabilities tie (torch.topk leaves that order unspecified)."""
    if logits.dim() != 2:
        raise ValueError(f"softmax_topk: logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    rows, experts = logits.shape
    if not 0 < k <= experts:
        raise ValueError(f"softmax_topk: k = {k} must be in [1, {experts}] (the experts)")
    if experts > MAX_EXPERTS:
        return softmax_topk_reference(logits, k, normalize)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.nvfp4_fix.softmax_topk(logits, k, normalize)
    return _softmax_topk(logits, k, normalize)  # eager: without the op's ~150 us of dispatch


def _counters(device: torch.device) -> torch.Tensor:
    """Per-row arrival counters of the fused kernel on ``device`` (each call's last programs reset theirs)."""
    return arrival_counters(device, "softmax_topk", FUSED_MAX_TOKENS)


def _gemv_topk(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, h = hidden.shape
    experts = weight.shape[0]
    dev = hidden.device
    logits = torch.empty((rows, experts), dtype=hidden.dtype, device=dev)
    values = torch.empty((rows, k), dtype=torch.float32, device=dev)
    indices = torch.empty((rows, k), dtype=torch.int64, device=dev)
    if rows:
        block = triton.next_power_of_2(experts)
        be = triton.next_power_of_2(triton.cdiv(experts, PARTS))
        bh = max(16, min(triton.next_power_of_2(h), 2048 // be))
        work = torch.empty((rows, block), dtype=torch.float32, device=dev)
        with on_device_of(hidden):
            _gemv_topk_kernel[(rows, triton.cdiv(experts, be))](
                hidden, hidden.stride(0), weight, weight.stride(0), logits, logits.stride(0), work,
                _counters(dev), values, indices, h, experts, K=k, KP=triton.next_power_of_2(k), BE=be,
                BH=bh, BLOCK=block, NORMALIZE=normalize, num_warps=4,
            )  # fmt: skip
    return logits, values, indices


@torch.library.custom_op("nvfp4_fix::router_topk", mutates_args=())
def _router_topk_op(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _gemv_topk(hidden, weight, k, normalize)


@_router_topk_op.register_fake
def _router_topk_fake(hidden, weight, k, normalize):
    rows, experts = hidden.shape[0], weight.shape[0]
    return (
        hidden.new_empty((rows, experts)),
        hidden.new_empty((rows, k), dtype=torch.float32),
        hidden.new_empty((rows, k), dtype=torch.int64),
    )


def fuses(hidden: torch.Tensor, weight: torch.Tensor, k: int) -> bool:
    """Whether :func:`router_topk` computes this call in one launch: CUDA, at most FUSED_MAX_TOKENS
    rows, one dtype, unit inner strides. (The CPU keeps ``F.linear``'s exact logits; the tests run the
    kernel there through the interpreter directly.)"""
    return (
        hidden.is_cuda
        and hidden.dim() == 2
        and weight.dim() == 2
        and hidden.shape[0] <= FUSED_MAX_TOKENS
        and hidden.shape[1] == weight.shape[1]
        and hidden.dtype == weight.dtype
        and hidden.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and hidden.device == weight.device
        and hidden.stride(1) == 1
        and weight.stride(1) == 1
        and 0 < k <= weight.shape[0] <= MAX_EXPERTS
    )


def router_topk(
    hidden: torch.Tensor, weight: torch.Tensor, k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [T, E] in hidden's dtype, values float32 [T, k], expert ids int64 [T, k]) of a softmax
    top-k router: logits = hidden [T, H] @ weight [E, H].T, then :func:`softmax_topk` of them. Calls that
    :func:`fuses` take one launch (the logits summed in float32 in another order than cuBLAS: they may
    differ from ``F.linear``'s by a rounding); others run ``F.linear`` and :func:`softmax_topk`."""
    if not fuses(hidden, weight, k):
        logits = F.linear(hidden, weight)
        return (logits, *softmax_topk(logits, k, normalize))
    if torch.compiler.is_compiling():
        return torch.ops.nvfp4_fix.router_topk(hidden, weight, k, normalize)
    return _gemv_topk(hidden, weight, k, normalize)
