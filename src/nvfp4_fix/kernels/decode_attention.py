"""Split-KV ("flash-decoding") attention of one query token over a static KV cache, in Triton.

``decode_attention(q, k, v, mask, scale)``: q [B, H, 1, D], k/v [B, H_kv, L, D] (the transformers
``StaticCache`` layout), mask None or [B or 1, 1, 1, >= L] (bool, True = attend, or additive float);
returns [B, 1, H, D] (transformers' attention-output layout) in q's dtype.

Two kernels. ``_split_kernel`` (grid B * H_kv x S) takes all H / H_kv query heads of one KV head (so
each K/V block is read once for the whole group, and ``tl.dot`` applies) over one contiguous range of
BLOCK_N-position blocks, with an online softmax in float32; it skips the K/V loads of blocks where the
mask allows no position, so a decode step reads only the filled part of the cache. ``_combine_kernel``
(grid B * H) merges the S partial results by their log-sum-exp. A row that no position is allowed for
gets zeros, not NaN.

Graph-safe: workspaces come from ``torch.empty``, the split count from shapes and the SM count only
(no host sync). ``torch.ops.nvfp4_fix.decode_attention`` wraps it for torch.compile (opaque custom op).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .device import on_device_of
from .triton_ops import _sms

__all__ = ["decode_attention", "supports", "BLOCK_N"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK_N = 64  # the interpreter's; on CUDA, block_size() (benchmarks/RESULTS-attention.md)
NUM_WARPS = 4
PROGRAMS_PER_SM = 2
MAX_SPLITS = 64
MAX_ACC = 8192  # float32 accumulator elements per program (query heads padded x head dim)
_INTERPRET_PROGRAMS = 4  # the interpreter's "SM count": a few splits, so that tests combine several
_LOG2E = 1.4426950408889634
_NO_MASK, _BOOL_MASK, _FLOAT_MASK = 0, 1, 2


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, m_ptr, l_ptr,
    sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, smask_b, smask_n,
    L, qk_scale, blocks_per_split,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK: tl.constexpr,  # 0: none, 1: bool (as uint8), 2: additive float
    DOT_F32: tl.constexpr,  # float32 dots: fp32 inputs, and the interpreter (its bf16 dot is broken)
):  # fmt: skip
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)  # b * stride may pass 2^31 on large caches
    kvh = pid % HKV
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q_rows = q_ptr + b * sq_b + (kvh * G + g)[:, None] * sq_h
    q = tl.load(q_rows + d[None, :], mask=(g < G)[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = k_ptr + b * sk_b + kvh * sk_h
    v_base = v_ptr + b * sv_b + kvh * sv_h
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, tl.cdiv(L, BLOCK_N))
    for blk in range(first, last):
        n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        allowed = n < L
        if MASK == 1:
            allowed &= tl.load(mask_ptr + b * smask_b + n * smask_n, mask=n < L, other=0) != 0
        elif MASK == 2:
            bias = tl.load(mask_ptr + b * smask_b + n * smask_n, mask=n < L, other=float("-inf"))
            allowed &= bias > float("-inf")
            # finite but huge (finfo.min) stays finite once scaled by log2(e): a row of such values
            # then averages uniformly, as SDPA does
            bias = tl.maximum(bias.to(tl.float32), -1.0e30)
        if tl.max(allowed.to(tl.int32), 0) > 0:
            # masked-off positions are never read: a static cache's unwritten tail may hold anything
            kt = tl.load(k_base + n[None, :] * sk_n + d[:, None], mask=allowed[None, :], other=0.0)
            vb = tl.load(v_base + n[:, None] * sv_n + d[None, :], mask=allowed[:, None], other=0.0)
            if DOT_F32:
                s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * qk_scale
            if MASK == 2:
                s += bias[None, :] * 1.4426950408889634  # log2(e)
            s = tl.where(allowed[None, :], s, float("-inf"))
            # the block allows a position, so m_new is finite and no -inf - -inf arises
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT_F32:
                pv = tl.dot(p, vb.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(vb.dtype), vb)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
    row = (pid * tl.num_programs(1) + split) * GP + g
    tl.store(o_ptr + row[:, None] * D + d[None, :], acc)
    tl.store(m_ptr + row, m_i)
    tl.store(l_ptr + row, l_i)


@triton.jit
def _combine_kernel(
    o_ptr, m_ptr, l_ptr, out_ptr, n_splits,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # = b * H + h: out is [B, 1, H, D], contiguous
    kv_row = pid // G  # = b * H_kv + h // G
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    ok = s < n_splits
    row = (kv_row * n_splits + s) * GP + pid % G
    m = tl.load(m_ptr + row, mask=ok, other=float("-inf"))
    l_s = tl.load(l_ptr + row, mask=ok, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for splits that saw nothing
    denom = tl.sum(w * l_s, 0)
    o = tl.load(o_ptr + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    acc = tl.sum(o * w[:, None], 0)
    out = tl.where(denom > 0, acc / tl.where(denom > 0, denom, 1.0), 0.0)
    tl.store(out_ptr + pid * D + d, out.to(out_ptr.dtype.element_ty))


def _group_pad(groups: int) -> int:
    """Query heads per KV head, padded for tl.dot (at least 16 rows)."""
    return max(16, triton.next_power_of_2(groups))


def _num_splits(blocks: int, rows: int, device: torch.device, per_sm: int) -> int:
    """About ``per_sm`` programs per SM over the B * H_kv rows, at most one split per block."""
    programs = per_sm * _sms(device) if device.type == "cuda" else _INTERPRET_PROGRAMS
    return max(1, min(blocks, MAX_SPLITS, triton.cdiv(programs, rows)))


def block_size(length: int, device: torch.device) -> int:
    """Cache positions per step: 32 for short caches, 128 from 1024 on (H100, bench_decode_attention)."""
    if device.type != "cuda":
        return BLOCK_N
    return 32 if length <= 1024 else 128


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether :func:`decode_attention` takes these inputs (else use SDPA)."""
    if not (q.is_cuda or (_INTERPRET and q.device.type == "cpu")):
        return False
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[2] != 1:
        return False
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[2] == 0 or h % k.shape[1]:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        return False
    if not 16 <= d <= 256 or d & (d - 1) or _group_pad(h // k.shape[1]) * d > MAX_ACC:
        return False
    if any(t.device != q.device or t.stride(-1) != 1 for t in (k, v)) or q.stride(-1) != 1:
        return False
    if mask is None:
        return True
    return (
        mask.device == q.device
        and (mask.dtype == torch.bool or mask.dtype.is_floating_point)
        and mask.dim() == 4
        and mask.shape[0] in (1, b)
        and mask.shape[1] == mask.shape[2] == 1
        and mask.shape[3] >= k.shape[2]
    )


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = NUM_WARPS,
    programs_per_sm: int = PROGRAMS_PER_SM,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for one query token: [B, 1, H, D] in q's dtype. Inputs must pass
    :func:`supports`. ``num_splits`` overrides the split count (default: about ``programs_per_sm``
    programs per SM); ``block_n`` (cache positions per step, default :func:`block_size`) and
    ``num_warps`` are for tuning (benchmarks/bench_decode_attention.py)."""
    b, h, _, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    g = h // hkv
    gp = _group_pad(g)
    block_n = block_n or block_size(length, q.device)
    blocks = triton.cdiv(length, block_n)
    splits = num_splits or _num_splits(blocks, b * hkv, q.device, programs_per_sm)
    per_split = triton.cdiv(blocks, max(1, min(splits, blocks)))
    splits = triton.cdiv(blocks, per_split)
    ws = functools.partial(torch.empty, dtype=torch.float32, device=q.device)
    o_part, m_part, l_part = ws(b * hkv, splits, gp, d), ws(b * hkv, splits, gp), ws(b * hkv, splits, gp)
    out = torch.empty(b, 1, h, d, dtype=q.dtype, device=q.device)
    if mask is None:
        kind, mask_arg, smask_b, smask_n = _NO_MASK, q, 0, 0
    else:
        kind = _BOOL_MASK if mask.dtype == torch.bool else _FLOAT_MASK
        mask_arg = mask.view(torch.uint8) if kind == _BOOL_MASK else mask
        smask_b = mask.stride(0) if mask.shape[0] > 1 else 0
        smask_n = mask.stride(3)
    with on_device_of(q):
        _split_kernel[(b * hkv, splits)](
            q, k, v, mask_arg, o_part, m_part, l_part,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), smask_b, smask_n,
            length, scale * _LOG2E, per_split,
            HKV=hkv, G=g, GP=gp, D=d, BLOCK_N=block_n, MASK=kind,
            DOT_F32=_INTERPRET or q.dtype == torch.float32, num_warps=num_warps, num_stages=2,
        )  # fmt: skip
        _combine_kernel[(b * h,)](
            o_part, m_part, l_part, out, splits,
            G=g, GP=gp, D=d, SP=max(2, triton.next_power_of_2(splits)), num_warps=4,
        )  # fmt: skip
    return out


@torch.library.custom_op("nvfp4_fix::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    return decode_attention(q, k, v, mask, scale)


@_decode_attention_op.register_fake
def _decode_attention_fake(q, k, v, mask, scale):
    b, h, _, d = q.shape
    return q.new_empty((b, 1, h, d))


@torch.library.custom_op("nvfp4_fix::materialize", mutates_args=())
def _materialize(x: torch.Tensor) -> torch.Tensor:
    """A copy of x through an opaque op: under torch.compile, a buffer computed once however many ops
    read it (see ``generation.attention.mask_once``)."""
    return x.clone()


@_materialize.register_fake
def _materialize_fake(x):
    return torch.empty_like(x)
