"""Softmax routing of a mixture-of-experts layer in one launch: softmax over the experts in float32,
the top k, optionally renormalized to sum to 1.

transformers' routers (``Qwen3MoeTopKRouter`` and kin) compute ``softmax`` -> ``torch.topk`` ->
divide; under torch.compile the top-k stays ATen's sort-based kernels (``gatherTopK`` and
``bitonicSortKVInPlace``, 9.6 us a layer at batch 1 on an H100, benchmarks/RESULTS-moe.md), more than
the layer's q/k/v projection. Here one program per token row keeps the row's logits in registers and
takes the k largest by repeated max (the lowest expert id first among equal probabilities).

:func:`softmax_topk` is the opaque op ``torch.ops.nvfp4_fix.softmax_topk`` (CUDA, or the CPU under
``TRITON_INTERPRET=1``; the same math in torch elsewhere).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .device import on_device_of

__all__ = ["MAX_EXPERTS", "softmax_topk", "softmax_topk_reference"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: experts a row may have for the one-program kernel (the row lives in registers)
MAX_EXPERTS = 4096


@triton.jit
def _softmax_topk_kernel(
    logits, stride_row, values, indices, E, K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr,
    NORMALIZE: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < E
    x = tl.load(logits + row * stride_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
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
