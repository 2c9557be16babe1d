"""Decode-sized MoE experts on tensor cores: cuda_mma's K loop with the expert read per block.

For decode (a few tokens, each routed to ``topk`` experts) every (token, expert) pair is one row of
activations against one expert's weights, so the GEMM is cuda_mma's M = 1 case with the weight base
chosen per block from ``top_k_index``:

* ``gate_up_act``: grid (I / 16, pairs); a block's two 16-row tiles are rows n..n+15 of the expert's
  gate and the same rows of its up projection (``codes`` [E, 2I, H/2]: gate rows then up rows), so its
  epilogue writes ``silu(gate) * up`` (fp32, each with its own multiplier ``mul`` [E, 2], rounded once
  to x's dtype) into act [pairs, I].
* ``down``: grid (H / 16, pairs); y [pairs, H] float32 = the down projection of the pair's act row
  times its multiplier and routing weight.

``kernels/moe_decode.py`` sums each token's pair rows (one more launch). ``down_sum`` (grid H / 16 x
tokens, a warp per pair slot, taken up to ``DOWN_SUM_MAX_TOKENS`` tokens) does the down projections and
that sum in one launch.

Past moe_route.INDEXED_MAX_PAIRS pairs several tokens share an expert, and reading its weights once
per pair wastes bandwidth: ``gate_up_act_sorted`` and ``down_sorted`` take the pairs sorted by expert
(``moe_route.route(top_k_index, E, SORTED_BLOCK)``), one block per 8 pairs of one expert, one pair per
token column of the MMA, so the expert's weights are read once for the 8.
A pair whose id is outside [0, E) returns before any work: its rows of act and y are never written.
Same grid for any routing: a CUDA graph replays it with new ids. Needs H and I multiples of 128
(``supports``); the Triton kernels of moe_decode.py run otherwise.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cuda_mma, nvrtc
from .cuda_moe_src import SOURCE
from .device import device_index

#: gate_up: two tiles (gate, up) of 16 rows per block, activations loaded when used (ahead, they
#: spill), single-buffered, two blocks of 4 warps per SM (H100 sweep, benchmarks/RESULTS-moe.md: 16.0
#: against 19.7 us a layer at T = 1 for double-buffered, one block); down: one tile, activations loaded
#: ahead with the weights. Spill-free on sm_80 and sm_90 (tests/test_cuda_mma_compile.py).
#: benchmarks/sweep_moe_tiles.py --cuda sweeps these and the warps (None: cuda_mma.warps_for), read at
#: each launch.
GATE_UP_VARIANT = {"DEPTH": 1, "XPRE": 0, "LOADONLY": 0, "RT": 2, "MINB": 2, "WN": 1}
DOWN_VARIANT = {"DEPTH": 2, "XPRE": 1, "LOADONLY": 0, "RT": 1, "MINB": 2, "WN": 1}
GATE_UP_WARPS: int | None = 4
DOWN_WARPS: int | None = None
#: Up to this many tokens, sum each token's pairs inside the down kernel (``down_sum``: one launch, no
#: fp32 pair rows) instead of ``down`` + moe_decode.sum_pairs. H100, Qwen3-30B-A3B experts, 8 layers
#: (benchmarks/RESULTS-moe.md): 19.6 against 22.4 us a layer at T = 1, equal at 2, slower from 4.
DOWN_SUM_MAX_TOKENS = 1
DOWN_SUM_WARPS = 8  # the pair slots of one token (top-8) side by side; fewer slots split K
#: One block per 16 columns of H and token (~1 per SM at decode): registers for one block per SM (the
#: two accumulator sets spill under the down variant's two-block cap on sm_90).
DOWN_SUM_VARIANT = {**DOWN_VARIANT, "MINB": 1, "PAIR_SUM": 1}
_RW_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
#: Pairs of one expert per block of the sorted kernels (``*_sorted``): the 8 token columns of one MMA.
SORTED_BLOCK = 8


def source(dtype: torch.dtype, variant: dict[str, int]) -> str:
    return cuda_mma.source(dtype, 1, variant) + SOURCE


def _kernel(dtype: torch.dtype, name: str, device: torch.device, variant: dict[str, int]) -> nvrtc.Kernel:
    return _compiled(dtype, name, device_index(device), tuple(sorted(variant.items())))


@functools.cache
def _compiled(dtype: torch.dtype, name: str, device_index: int, variant: tuple) -> nvrtc.Kernel:
    major, minor = torch.cuda.get_device_capability(device_index)
    cubin = nvrtc.compile_cubin(source(dtype, dict(variant)), f"sm_{major}{minor}")
    return nvrtc.Kernel(cubin, name, torch.device("cuda", device_index))


def shapes_supported(x: torch.Tensor, h: int, i: int) -> bool:
    """The part of ``supports`` that needs no data pointers (a traced call has none): CUDA, fp16/bf16
    x, H and I multiples of 128."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and h % 128 == 0 and i % 128 == 0


def supports(
    x: torch.Tensor,
    h: int,
    i: int,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
) -> bool:
    """Whether this call can run here: CUDA sm_80+ with NVRTC (cuda_mma usable), fp16/bf16 x with
    16-byte aligned rows, H and I multiples of 128, int32/int64 ids, float routing weights, at most
    65535 (token, expert) pairs, and 16-byte aligned expert ``weights`` (codes and scales: the kernels
    read them with 16-byte vector loads)."""
    return (
        shapes_supported(x, h, i)
        and x.stride(1) == 1
        and x.stride(0) % 8 == 0
        and x.data_ptr() % 16 == 0
        and top_k_index.dtype in (torch.int32, torch.int64)
        and 0 < top_k_index.numel() <= 65535  # one grid row per pair
        and top_k_weights.dtype in _RW_KINDS
        and all(w.data_ptr() % 16 == 0 for w in weights)
        and cuda_mma.supports_shape(device_index(x.device), x.dtype, 1, h)
    )


def _i64(v: int) -> ctypes.c_int64:
    return ctypes.c_int64(v)


def gate_up_act(
    x: torch.Tensor, top_k_index: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, mul: torch.Tensor
) -> torch.Tensor:
    """act [pairs, I] = silu(gate_e(x_t)) * up_e(x_t) for pair p = t * topk + k, e = top_k_index[t, k]."""
    t, h = x.shape
    e, two_i, _ = codes.shape
    i = two_i // 2
    topk = top_k_index.shape[1]
    pairs = t * topk
    act = torch.empty(pairs, i, dtype=x.dtype, device=x.device)
    kern = _kernel(x.dtype, "nvfp4_moe_gate_up", x.device, GATE_UP_VARIANT)
    warps = GATE_UP_WARPS or cuda_mma.warps_for(i * pairs, h, x.device)
    kern.launch(
        (i // 16, pairs, 1), (32 * warps, 1, 1),
        x, x.stride(0), codes, scales.view(torch.uint8), _i64(codes.stride(0)), _i64(scales.stride(0)),
        mul, mul.stride(0), top_k_index, int(top_k_index.dtype == torch.int64),
        _i64(top_k_index.stride(0)), _i64(top_k_index.stride(1)), topk, e, act, act.stride(0), i, h,
    )  # fmt: skip
    return act


def down(
    act: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mul: torch.Tensor,
) -> torch.Tensor:
    """y [pairs, H] float32 = down_e(act[p]) * top_k_weights[t, k] (rows of unrouted pairs unwritten)."""
    pairs, i = act.shape
    h = codes.shape[1]
    y = torch.empty(pairs, h, dtype=torch.float32, device=act.device)
    rows = 16 * DOWN_VARIANT["RT"]
    warps = DOWN_WARPS or cuda_mma.warps_for(h * pairs, i, act.device, rows)
    _launch_down("nvfp4_moe_down", DOWN_VARIANT, pairs, warps, act, top_k_index, top_k_weights, codes, scales,
                 mul, y)  # fmt: skip
    return y


def gate_up_act_sorted(
    x: torch.Tensor,
    pairs: torch.Tensor,
    block_expert: torch.Tensor,
    topk: int,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mul: torch.Tensor,
) -> torch.Tensor:
    """``gate_up_act`` for pairs sorted by expert: ``pairs`` [blocks * SORTED_BLOCK] int32 pair ids in
    expert order (the pair count marks padding) and ``block_expert`` [blocks] int32, as
    ``moe_route.route(top_k_index, E, SORTED_BLOCK)`` lays them out. act rows of pairs in no block
    (routed to no expert) are not written."""
    t, h = x.shape
    e, two_i, _ = codes.shape
    i = two_i // 2
    num_pairs = t * topk
    _check_sorted(pairs, block_expert)
    act = torch.empty(num_pairs, i, dtype=x.dtype, device=x.device)
    kern = _kernel(x.dtype, "nvfp4_moe_gate_up_sorted", x.device, GATE_UP_VARIANT)
    warps = GATE_UP_WARPS or cuda_mma.warps_for(i * num_pairs, h, x.device)
    kern.launch(
        (i // 16, block_expert.numel(), 1), (32 * warps, 1, 1),
        x, x.stride(0), codes, scales.view(torch.uint8), _i64(codes.stride(0)), _i64(scales.stride(0)),
        mul, mul.stride(0), pairs, block_expert, num_pairs, topk, e, act, act.stride(0), i, h,
    )  # fmt: skip
    return act


def down_sorted(
    act: torch.Tensor,
    pairs: torch.Tensor,
    block_expert: torch.Tensor,
    top_k_weights: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mul: torch.Tensor,
) -> torch.Tensor:
    """``down`` for pairs sorted by expert (``gate_up_act_sorted``'s layout): y [pairs, H] float32."""
    num_pairs, i = act.shape
    e, h, _ = codes.shape
    topk = top_k_weights.shape[1]
    _check_sorted(pairs, block_expert)
    if num_pairs != top_k_weights.numel():
        raise ValueError(
            f"down_sorted: act {tuple(act.shape)} for routing weights {tuple(top_k_weights.shape)}"
        )
    y = torch.empty(num_pairs, h, dtype=torch.float32, device=act.device)
    rows = 16 * DOWN_VARIANT["RT"]
    warps = DOWN_WARPS or cuda_mma.warps_for(h * num_pairs, i, act.device, rows)
    _kernel(act.dtype, "nvfp4_moe_down_sorted", act.device, DOWN_VARIANT).launch(
        (-(-h // rows), block_expert.numel(), 1), (32 * warps, 1, 1),
        act, act.stride(0), codes, scales.view(torch.uint8), _i64(codes.stride(0)), _i64(scales.stride(0)),
        mul, mul.stride(0), pairs, block_expert, num_pairs, topk, e,
        top_k_weights, _RW_KINDS[top_k_weights.dtype], _i64(top_k_weights.stride(0)),
        _i64(top_k_weights.stride(1)), y, y.stride(0), h, i,
    )  # fmt: skip
    return y


def _check_sorted(pairs: torch.Tensor, block_expert: torch.Tensor) -> None:
    ok = (
        pairs.dtype == block_expert.dtype == torch.int32
        and pairs.is_contiguous()
        and block_expert.is_contiguous()
    )
    if (
        not ok
        or pairs.numel() != block_expert.numel() * SORTED_BLOCK
        or not 0 < block_expert.numel() <= 65535
    ):
        raise ValueError(
            f"sorted experts: pairs {pairs.dtype} {tuple(pairs.shape)} and block_expert {block_expert.dtype} "
            f"{tuple(block_expert.shape)}: need contiguous int32, {SORTED_BLOCK} pair slots per block"
        )


def down_sum(
    act: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mul: torch.Tensor,
) -> torch.Tensor:
    """out [T, H] in act's dtype = sum over k of down_e(act[t * topk + k]) * top_k_weights[t, k]
    (pairs routed to no expert add nothing), one launch."""
    pairs, h = act.shape[0], codes.shape[1]
    t, topk = top_k_index.shape
    if pairs != t * topk or not 1 <= DOWN_SUM_WARPS <= 8:
        raise ValueError(
            f"down_sum: act {tuple(act.shape)} for {t} x {topk} pairs, {DOWN_SUM_WARPS} warps (1 to 8)"
        )
    out = torch.empty(t, h, dtype=act.dtype, device=act.device)
    _launch_down("nvfp4_moe_down_sum", DOWN_SUM_VARIANT, t, DOWN_SUM_WARPS, act, top_k_index, top_k_weights,
                 codes, scales, mul, out)  # fmt: skip
    return out


def _launch_down(
    name: str,
    variant: dict[str, int],
    grid_y: int,
    warps: int,
    act: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mul: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """down and down_sum take the same arguments (both read their weights through ``down_rows``);
    grid (H / rows, ``grid_y``): one block row per pair (down) or per token (down_sum)."""
    i = act.shape[1]
    e, h, _ = codes.shape
    rows = 16 * variant["RT"]
    _kernel(act.dtype, name, act.device, variant).launch(
        (-(-h // rows), grid_y, 1), (32 * warps, 1, 1),
        act, act.stride(0), codes, scales.view(torch.uint8), _i64(codes.stride(0)), _i64(scales.stride(0)),
        mul, mul.stride(0), top_k_index, int(top_k_index.dtype == torch.int64),
        _i64(top_k_index.stride(0)), _i64(top_k_index.stride(1)), top_k_index.shape[1], e,
        top_k_weights, _RW_KINDS[top_k_weights.dtype], _i64(top_k_weights.stride(0)),
        _i64(top_k_weights.stride(1)),
        out, out.stride(0), h, i,
    )  # fmt: skip
