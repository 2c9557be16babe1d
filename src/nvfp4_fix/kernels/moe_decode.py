"""Decode-sized MoE experts (up to 64 routed pairs, SiLU) in two Triton launches, no other op; on CUDA
the tensor-core kernels of ``cuda_moe`` instead, which also take up to ``SORTED_MAX_PAIRS`` pairs sorted
by expert (``moe_route.route`` first, ``sum_pairs`` after).

For T tokens routed to K experts each (``top_k_index`` [T, K], any integer dtype, read in place):

1. ``_gate_up_act_kernel``, one program per (pair, BN columns of I): reads the pair's expert's gate
   rows n and up rows I + n as one [2 BN, BK] tile per step (``codes`` [E, 2I, H/2], ``scales``
   [E, 2I, H/16] e4m3, ``mul`` [E, 2]: gate and up multipliers, which may differ) and writes
   ``silu(gate) * up``, computed in fp32 and rounded once to x's dtype, as act [T*K, I].
2. ``_down_sum_kernel``, one program per (token, BN columns of H): the down projections of all the
   token's pairs (up to MAX_SLOTS experts in one weight tile), each times its multiplier and routing
   weight, summed in fp32 and rounded once: out [T, H] in x's dtype.

Pairs routed to no expert (an id outside [0, E)) are skipped by both (their rows of act are never
written nor read, their weights never loaded), so nothing is zero-filled. Every buffer is
``torch.empty`` and every launch has the same grid for any routing: a CUDA graph replays it with new
ids. torch.compile sees the opaque ops ``torch.ops.nvfp4_fix.moe_decode_experts`` and
``moe_sum_pairs`` (``sum_pairs``: the pair sum after the CUDA and grouped expert kernels). Tile sizes
are the module constants (benchmarks/sweep_moe_tiles.py sweeps them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import settings
from . import cuda_moe
from .device import on_device_of
from .moe_grouped import _INTERPRET
from .moe_route import INDEXED_MAX_PAIRS, route
from .triton_dequant import _dequant_tile

__all__ = ["Tiles", "GATE_UP_TILES", "DOWN_TILES", "SUM_BLOCK", "decode_experts", "sum_pairs", "is_silu"]


@dataclass(frozen=True)
class Tiles:
    bn: int  # output columns per program
    bk: int  # reduction step (a multiple of 32)
    warps: int


#: gate_up: BN columns of I = 2 BN rows (gate and up) per program: 32, the bytes of the unfused gemv's
#: 64-row program. down: BN rows per program = pair slots x columns of H (64 = 8 experts x 8 columns).
GATE_UP_TILES = Tiles(bn=32, bk=128, warps=4)
DOWN_TILES = Tiles(bn=64, bk=128, warps=4)
MAX_SLOTS = 8  # pairs of one token per pass of the down kernel (more: several passes; 16 spill on sm_90)
SUM_BLOCK = 1024
#: Above moe_route.INDEXED_MAX_PAIRS (pairs read indexed: an expert's weights once per pair) and up to
#: this many pairs, the CUDA kernels take the pairs sorted by expert (``cuda_moe.*_sorted``: one read
#: per 8 pairs of an expert); beyond, moe_grouped's tl.dot kernels. H100, Qwen3-30B-A3B experts
#: (benchmarks/RESULTS-moe-humming.md, session 15): 1.47x those at 2048 pairs, 0.94x at 4096.
SORTED_MAX_PAIRS = 2048


def is_silu(act_fn: object) -> bool:
    """Whether ``act_fn`` is plain SiLU: ``F.silu``, an ``nn.SiLU`` or transformers' ``SiLUActivation``
    (ACT2FN["silu"] / ["swish"]), without hooks or a replaced forward."""
    if act_fn is torch.nn.functional.silu:
        return True
    if not isinstance(act_fn, torch.nn.Module) or "forward" in act_fn.__dict__:
        return False
    if act_fn._forward_hooks or act_fn._forward_pre_hooks:
        return False
    cls = type(act_fn)
    if cls is torch.nn.SiLU or (isinstance(act_fn, torch.nn.SiLU) and cls.forward is torch.nn.SiLU.forward):
        return True
    return cls.__name__ == "SiLUActivation" and cls.__module__.startswith("transformers.")


@triton.jit
def _rows_dot(
    x_ptr, w_base, s_base, K, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, WDT: tl.constexpr
):
    """[BN] float32: packed rows (bases at k = 0) times the fp32 vector x[0:K], value * scale * 2^-7."""
    rk = tl.arange(0, BK)
    rk2 = tl.arange(0, BK // 2)
    rkb = tl.arange(0, BK // 16)
    acc = tl.zeros([BN, BK], dtype=tl.float32)
    for k in range(0, K, BK):
        xt = tl.load(x_ptr + k + rk, mask=(k + rk) < K, other=0.0).to(tl.float32)
        wb = tl.load(w_base + k // 2, mask=(k + 2 * rk2)[None, :] < K, other=0)
        sb = tl.load(s_base + k // 16, mask=(k + 16 * rkb)[None, :] < K, other=0)
        acc += _dequant_tile(wb, sb, WDT, BN, BK, ASM).to(tl.float32) * xt[None, :]
    return tl.sum(acc, 1)


@triton.jit
def _gate_up_act_kernel(
    x_ptr, ids_ptr, w_ptr, s_ptr, mul_ptr, y_ptr,
    TOPK, N_I, H, E, stride_xm, stride_it, stride_ik, stride_ym, stride_we, stride_se, stride_me,
    BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, WDT: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = p // TOPK
    e = tl.load(ids_ptr + t * stride_it + (p % TOPK) * stride_ik)
    if (e < 0) | (e >= E):
        return
    e64 = e.to(tl.int64)
    r = tl.arange(0, 2 * BN)
    rows = tl.minimum(pid_n * BN + r // 2, N_I - 1) + (r % 2) * N_I  # gate and up rows interleaved
    rows = rows.to(tl.int64)[:, None]
    w_base = w_ptr + e64 * stride_we + rows * (H // 2) + tl.arange(0, BK // 2)[None, :]
    s_base = s_ptr + e64 * stride_se + rows * (H // 16) + tl.arange(0, BK // 16)[None, :]
    gate_up = _rows_dot(x_ptr + t.to(tl.int64) * stride_xm, w_base, s_base, H, 2 * BN, BK, ASM, WDT)
    mul = tl.load(mul_ptr + e64 * stride_me + r % 2) * 128.0  # tiles carry value * scale * 2^-7
    gate_up = gate_up * mul
    gate, up = tl.split(tl.reshape(gate_up, (BN, 2)))
    rn = pid_n * BN + tl.arange(0, BN)
    act = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + p.to(tl.int64) * stride_ym + rn, act.to(y_ptr.dtype.element_ty), mask=rn < N_I)


@triton.jit
def _down_sum_kernel(
    a_ptr, ids_ptr, rw_ptr, w_ptr, s_ptr, mul_ptr, out_ptr,
    TOPK, N, K, E, stride_am, stride_it, stride_ik, stride_rt, stride_rk, stride_om, stride_we, stride_se,
    stride_me, KP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ASM: tl.constexpr, WDT: tl.constexpr,
):  # fmt: skip
    """out[t, BN columns] = sum over the token's pairs of down_e(act row) * mul_e * routing weight, KP
    pair slots at a time: row r of the [KP * BN, BK] weight tile is column r % BN of slot r // BN."""
    t = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    r = tl.arange(0, KP * BN)
    col_r = tl.minimum(tl.program_id(1) * BN + r % BN, N - 1).to(tl.int64)
    rk = tl.arange(0, BK)
    rk2 = tl.arange(0, BK // 2)
    rkb = tl.arange(0, BK // 16)
    out = tl.zeros([BN], dtype=tl.float32)
    for j0 in range(0, TOPK, KP):
        j = j0 + tl.arange(0, KP)
        e = tl.load(ids_ptr + t * stride_it + j * stride_ik, mask=j < TOPK, other=-1)
        routed = (j < TOPK) & (e >= 0) & (e < E)  # other slots read nothing and add nothing
        j_r = j0 + r // BN
        e_r = tl.load(ids_ptr + t * stride_it + j_r * stride_ik, mask=j_r < TOPK, other=-1)
        routed_r = (j_r < TOPK) & (e_r >= 0) & (e_r < E)
        e_r64 = tl.where(routed_r, e_r, 0).to(tl.int64)
        w_rows = w_ptr + e_r64 * stride_we + col_r * (K // 2)
        s_rows = s_ptr + e_r64 * stride_se + col_r * (K // 16)
        a_rows = a_ptr + (t * TOPK + j).to(tl.int64) * stride_am
        acc = tl.zeros([KP, BN, BK], dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_rows[:, None] + k + rk[None, :],
                        mask=routed[:, None] & (k + rk < K)[None, :], other=0.0)  # fmt: skip
            wb = tl.load(w_rows[:, None] + k // 2 + rk2[None, :],
                         mask=routed_r[:, None] & (k + 2 * rk2 < K)[None, :], other=0)  # fmt: skip
            sb = tl.load(s_rows[:, None] + k // 16 + rkb[None, :],
                         mask=routed_r[:, None] & (k + 16 * rkb < K)[None, :], other=0)  # fmt: skip
            w = tl.reshape(_dequant_tile(wb, sb, WDT, KP * BN, BK, ASM), (KP, BN, BK)).to(tl.float32)
            acc += w * a.to(tl.float32)[:, None, :]
        weight = tl.load(rw_ptr + t * stride_rt + j * stride_rk, mask=routed, other=0.0).to(tl.float32)
        mul = tl.load(mul_ptr + tl.where(routed, e, 0).to(tl.int64) * stride_me, mask=routed, other=0.0)
        scale = tl.where(routed, mul * 128.0 * weight, 0.0)  # tiles carry value * scale * 2^-7
        out += tl.sum(tl.sum(acc, 2) * scale[:, None], 0)
    tl.store(out_ptr + t.to(tl.int64) * stride_om + rn, out.to(out_ptr.dtype.element_ty), mask=rn < N)


@triton.jit
def _sum_pairs_kernel(
    y_ptr, ids_ptr, out_ptr, TOPK, N, E, stride_it, stride_ik, stride_ym, stride_om, BLOCK: tl.constexpr
):
    t = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(TOPK):
        e = tl.load(ids_ptr + t * stride_it + j * stride_ik)
        n_ok = tl.where((e >= 0) & (e < E), N, 0)  # rows of pairs routed to no expert were never written
        row = (t * TOPK + j).to(tl.int64) * stride_ym
        acc += tl.load(y_ptr + row + rn, mask=rn < n_ok, other=0.0)
    tl.store(out_ptr + t.to(tl.int64) * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=rn < N)


def _modes(dtype: torch.dtype) -> tuple[bool, object]:
    asm = not (_INTERPRET or dtype == torch.float32)  # packed-PTX dequantization: bf16/fp16 on a GPU
    wdt = tl.float16 if dtype == torch.float16 else tl.bfloat16 if asm else tl.float32  # exact tiles
    return asm, wdt


def _bk(tiles: Tiles, k: int) -> int:
    return min(tiles.bk, max(32, triton.next_power_of_2(k)))


def sum_pairs(
    y: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, dtype: torch.dtype
) -> torch.Tensor:
    """out [T, N] (``dtype``) = sum over k of y[t * K + k] (float32 rows), skipping pairs whose id is
    outside [0, num_experts): their rows of y may hold anything."""
    t, k = top_k_index.shape
    n = y.shape[1]
    if y.shape[0] != t * k or y.stride(1) != 1:
        raise ValueError(f"pair rows {tuple(y.shape)} for {t} tokens x {k} experts")
    out = torch.empty(t, n, dtype=dtype, device=y.device)
    with on_device_of(y):
        _sum_pairs_kernel[(t, triton.cdiv(n, SUM_BLOCK))](
            y, top_k_index, out, k, n, num_experts, top_k_index.stride(0), top_k_index.stride(1),
            y.stride(0), out.stride(0), BLOCK=SUM_BLOCK, num_warps=4,
        )  # fmt: skip
    return out


def sorted_cuda_may_run(x: torch.Tensor, num_pairs: int, h: int, i: int) -> bool:
    """From shapes and settings alone (a traced call has no data pointers): whether ``decode_experts``
    is meant for ``num_pairs`` pairs, through the sorted CUDA kernels (``cuda_moe.supports`` then
    decides on the real tensors; if it refuses, the Triton decode kernels run, one read per pair)."""
    return (
        INDEXED_MAX_PAIRS < num_pairs <= SORTED_MAX_PAIRS
        and cuda_moe.shapes_supported(x, h, i)
        and settings.current().cuda_moe
    )


def decode_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    down: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    backend: str = "auto",
) -> torch.Tensor:
    """sum_k w[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)), e = top_k_index[t, k], in x's dtype.
    ``gate_up`` = (codes [E, 2I, H/2], scales [E, 2I, H/16], mul [E, 2]) with each expert's gate rows
    then its up rows; ``down`` = (codes [E, H, I/2], scales [E, H, I/16], mul [E, 1]).

    ``backend``: "auto" runs the tensor-core kernels of kernels/cuda_moe.py where they support the call
    (CUDA sm_80+, fp16/bf16, H and I multiples of 128) and ``settings.cuda_moe`` is on, the Triton
    kernels here otherwise; "cuda" / "triton" force one (tests, benchmarks)."""
    (gcodes, gscales, gmul), (dcodes, dscales, dmul) = gate_up, down
    t, h = x.shape
    e, two_i, _ = gcodes.shape
    i = two_i // 2
    topk = top_k_index.shape[1]
    shapes_ok = (
        gcodes.shape == (e, 2 * i, h // 2) and gscales.shape == (e, 2 * i, h // 16) and gmul.shape == (e, 2)
        and dcodes.shape == (e, h, i // 2) and dscales.shape == (e, h, i // 16) and dmul.shape[0] == e
        and top_k_index.shape == top_k_weights.shape == (t, topk) and h % 16 == 0 and i % 16 == 0
    )  # fmt: skip
    rows_ok = all(w.stride(2) == 1 and w.stride(1) == w.shape[2] for w in (gcodes, gscales, dcodes, dscales))
    if not (shapes_ok and rows_ok and x.stride(1) == 1 and gmul.stride(1) == 1):
        raise ValueError(
            f"decode experts: x {tuple(x.shape)}, ids {tuple(top_k_index.shape)}, weights "
            f"{tuple(top_k_weights.shape)}, gate_up {tuple(gcodes.shape)} / {tuple(gscales.shape)} / "
            f"{tuple(gmul.shape)}, down {tuple(dcodes.shape)} / {tuple(dscales.shape)} / {tuple(dmul.shape)}"
            "; each expert's rows must be contiguous"
        )
    if backend not in ("auto", "cuda", "triton"):
        raise ValueError(f"decode experts: backend must be 'auto', 'cuda' or 'triton', got {backend!r}")
    wanted = backend == "cuda" or (backend == "auto" and settings.current().cuda_moe)
    weights = (gcodes, gscales, dcodes, dscales)
    on_cuda = wanted and cuda_moe.supports(x, h, i, top_k_index, top_k_weights, weights)
    if backend == "cuda" and not on_cuda:
        raise RuntimeError(
            f"decode experts: the CUDA kernels cannot run x {x.dtype} {tuple(x.shape)} on {x.device} with"
            f" I = {i}, ids {top_k_index.dtype}, weights {top_k_weights.dtype} (need CUDA sm_80+ with"
            " NVRTC, fp16/bf16 x, H and I multiples of 128, 16-byte aligned expert weights)"
        )
    if on_cuda and t * topk > INDEXED_MAX_PAIRS:  # each expert's weights read once per 8 of its pairs
        with on_device_of(x):
            plan = route(top_k_index, e, cuda_moe.SORTED_BLOCK)
            act = cuda_moe.gate_up_act_sorted(
                x, plan.pairs, plan.block_expert, topk, gcodes, gscales, gmul.float()
            )
            y = cuda_moe.down_sorted(
                act, plan.pairs, plan.block_expert, top_k_weights, dcodes, dscales, dmul.float()
            )
        return sum_pairs(y, top_k_index, e, x.dtype)
    if on_cuda:
        with on_device_of(x):
            act = cuda_moe.gate_up_act(x, top_k_index, gcodes, gscales, gmul.float())
            if t <= cuda_moe.DOWN_SUM_MAX_TOKENS:
                return cuda_moe.down_sum(act, top_k_index, top_k_weights, dcodes, dscales, dmul.float())
            y = cuda_moe.down(act, top_k_index, top_k_weights, dcodes, dscales, dmul.float())
        return sum_pairs(y, top_k_index, e, x.dtype)
    asm, wdt = _modes(x.dtype)
    pairs = t * topk
    act = torch.empty(pairs, i, dtype=x.dtype, device=x.device)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    gt, dt = GATE_UP_TILES, DOWN_TILES
    slots = min(triton.next_power_of_2(topk), MAX_SLOTS)
    columns = max(1, dt.bn // slots)
    with on_device_of(x):
        _gate_up_act_kernel[(pairs, triton.cdiv(i, gt.bn))](
            x, top_k_index, gcodes, gscales.view(torch.uint8), gmul, act,
            topk, i, h, e, x.stride(0), top_k_index.stride(0), top_k_index.stride(1), act.stride(0),
            gcodes.stride(0), gscales.stride(0), gmul.stride(0),
            BN=gt.bn, BK=_bk(gt, h), ASM=asm, WDT=wdt, num_warps=gt.warps,
        )  # fmt: skip
        _down_sum_kernel[(t, triton.cdiv(h, columns))](
            act, top_k_index, top_k_weights, dcodes, dscales.view(torch.uint8), dmul, out,
            topk, h, i, e, act.stride(0), top_k_index.stride(0), top_k_index.stride(1),
            top_k_weights.stride(0), top_k_weights.stride(1), out.stride(0),
            dcodes.stride(0), dscales.stride(0), dmul.stride(0),
            KP=slots, BN=columns, BK=_bk(dt, i), ASM=asm, WDT=wdt, num_warps=dt.warps,
        )  # fmt: skip
    return out


@torch.library.custom_op("nvfp4_fix::moe_decode_experts", mutates_args=())
def _decode_experts_op(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                       gate_up_codes: torch.Tensor, gate_up_scales: torch.Tensor, gate_up_mul: torch.Tensor,
                       down_codes: torch.Tensor, down_scales: torch.Tensor,
                       down_mul: torch.Tensor) -> torch.Tensor:  # fmt: skip
    gate_up = (gate_up_codes, gate_up_scales, gate_up_mul)
    return decode_experts(x, top_k_index, top_k_weights, gate_up, (down_codes, down_scales, down_mul))


@_decode_experts_op.register_fake
def _decode_experts_fake(x, top_k_index, top_k_weights, gate_up_codes, gate_up_scales, gate_up_mul,
                         down_codes, down_scales, down_mul):  # fmt: skip
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("nvfp4_fix::moe_sum_pairs", mutates_args=())
def _sum_pairs_op(
    y: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, dtype: torch.dtype
) -> torch.Tensor:
    return sum_pairs(y, top_k_index, num_experts, dtype)


@_sum_pairs_op.register_fake
def _sum_pairs_fake(y, top_k_index, num_experts, dtype):
    return y.new_empty((top_k_index.shape[0], y.shape[1]), dtype=dtype)
