"""Which kernel ``auto`` runs for one call shape, as a pure function of the card and the settings.

Everything the choice depends on is an argument (``Card``: compute capability and what is installed),
so the choice for any card can be computed, and tested, on a machine without that card. The
dispatch (kernels/__init__.py) fills ``Card`` in from the real device once per device and caches
the result per call shape.

Per card (benchmarks/KERNEL_NOTES.md, "Older GPUs"):

* sm_90 (measured on the H100; the H200 shares its compute capability): ``cuda_tile`` (the tiled
  mma.sync kernel) for wide layers (``tile_wins``) at 17-48 rows, fp16/bf16, K % 128 == 0, NVRTC
  present; the rows below otherwise.
* sm_80 and newer: ``cuda_mma`` for M <= 32 (fp16/bf16, K % 128 == 0, NVRTC present), else the Triton
  kernels (GEMV at M == 1, the tl.dot GEMM up to ``dequant_mm_min_m`` (``TINY_DEQUANT_MM_MIN_M`` on
  tiny layers), dequantize + cuBLAS beyond);
  with ``settings.humming`` on, Humming where kernels/table.py has a measured row (sm_90 only) and
  the shape is one Humming can run (``humming.shape_refusal``: N a multiple of 8).
* sm_75 to sm_79 (and older): ``chunked`` (torch ops: row chunks dequantized to float32, cuBLAS
  matmul). The Triton GEMM and dequantization decode with packed PTX that needs sm_80
  (``cvt.rn.f16x2.f32``, ``fma.rn.bf16x2``), ``cuda_mma`` uses sm_80 tensor-core instructions, and
  Humming (which claims sm_75) has no measured rows there.
* fp32 activations: ``dequant_mm`` (dequantize into the activation dtype, cuBLAS) on sm_80+.
* No Triton: ``chunked``. CPU: ``cpu_gemv`` for one row, ``chunked`` otherwise.
"""

from __future__ import annotations

import dataclasses

import torch

from .. import settings
from . import table
from .cuda_mma import MAX_M as CUDA_MMA_MAX_M
from .humming import MIN_CC as HUMMING_MIN_CC
from .humming import shape_refusal as humming_shape_refusal

#: the first compute capability our packed-PTX decoders (Triton) and cuda_mma's mma.sync code run on
OURS_MIN_CC = (8, 0)
#: tiny layers (table.shape_class, e.g. MoE experts) dequantize + cuBLAS from this M when
#: ``dequant_mm_min_m`` is larger: H100, Qwen3-30B-A3B expert gate_up / down
#: (benchmarks/RESULTS-kernels-humming.md, session 12): the tl.dot GEMM takes 8.3 / 5.8 us at M = 64 and
#: 12.3 / 12.0 at 128, dequantize + cuBLAS ~10.3 / ~7.3 at both; the lines cross near M = 96 / 80.
TINY_DEQUANT_MM_MIN_M = 96

#: Where ``cuda_tile`` beats cuda_mma (M <= 32) and the tl.dot GEMM (33-48) on the H100: layers of the
#: "large" class with at least TILE_MIN_N output features (8B gate_up, 70B gate_up, the lm_heads).
#: auto / cuda_tile time at M = 17 / 24 / 32 / 40 / 48 (benchmarks/RESULTS-kernels-tile.md, session 17):
#: 8B gate_up 1.11 / 1.14 / 1.20 / 1.34 / 1.23, 8B lm_head 1.59 / 1.81 / 1.88 / 1.50 / 1.29, 70B gate_up
#: 0.98 / 1.03 / 1.02 / 1.42 / 1.25; at M = 64 it loses (0.91 / 0.96). The narrow large layer (70B down,
#: N = 8192) is 0.90-1.06 and every smaller class 0.39-1.02, so they keep cuda_mma / tl.dot.
TILE_CC = (9, 0)
TILE_MIN_M, TILE_MAX_M = 17, 48
TILE_MIN_N = 16384

_HALF = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Card:
    """What the choice needs to know about one CUDA device."""

    capability: tuple[int, int]
    triton: bool  # Triton imports
    nvrtc: bool  # cuda_mma's NVRTC kernels compile on this card
    humming: bool  # humming-kernels imports


def humming_allowed(card: Card, s: settings.Settings) -> bool:
    """Whether ``auto`` may send any call on this card to Humming."""
    return (
        s.humming
        and card.humming
        and card.capability >= HUMMING_MIN_CC
        and bool(table.humming_ranges(card.capability))
    )


def choose(
    card: Card | None,
    dtype: torch.dtype,
    m: int,
    n: int,
    k: int,
    s: settings.Settings,
    m1_kernel: str = "gemv",
) -> str:
    """The kernel for x [M, K] (``dtype``) times an N x K weight. ``card`` None means the CPU;
    ``m1_kernel`` is the Triton tuning's "gemv" or "mm" for this shape at M == 1."""
    if card is None:
        return "cpu_gemv" if m == 1 else "chunked"
    if _table_picks_humming(card, dtype, m, n, k, s) and humming_shape_refusal(n, k) is None:
        return "humming"
    return ours(card, dtype, m, n, k, s, m1_kernel)


def humming_refusal(
    card: Card | None, dtype: torch.dtype, m: int, n: int, k: int, s: settings.Settings
) -> str | None:
    """Why ``choose`` did not take Humming for a call the table gives it: a shape Humming cannot run
    (``humming.shape_refusal``); None otherwise."""
    if card is None or not _table_picks_humming(card, dtype, m, n, k, s):
        return None
    return humming_shape_refusal(n, k)


def _table_picks_humming(
    card: Card, dtype: torch.dtype, m: int, n: int, k: int, s: settings.Settings
) -> bool:
    return (
        dtype in _HALF
        and humming_allowed(card, s)
        and table.backend_for(card.capability, m, n, k) == "humming"
    )


def ours(
    card: Card,
    dtype: torch.dtype,
    m: int,
    n: int,
    k: int,
    s: settings.Settings,
    m1_kernel: str = "gemv",
) -> str:
    """This package's kernel for the call (the choice without Humming, and the fallback from it)."""
    if not card.triton or card.capability < OURS_MIN_CC:
        return "chunked"
    if dtype not in _HALF:
        return "dequant_mm"
    if s.cuda_tile and card.nvrtc and k % 128 == 0 and tile_wins(card.capability, m, n, k):
        return "cuda_tile"
    if m <= CUDA_MMA_MAX_M and s.cuda_mma and card.nvrtc and k % 128 == 0:
        return "cuda_mma"
    if m == 1:
        return "triton_gemv" if m1_kernel == "gemv" else "triton_mm"
    # dequant_mm_min_m: where dequantize + cuBLAS overtakes the tl.dot GEMM (H100, RESULTS.md)
    min_m = s.dequant_mm_min_m
    if table.shape_class(n, k) == "tiny":
        min_m = min(min_m, TINY_DEQUANT_MM_MIN_M)
    if m <= 16 or m < min_m:
        return "triton_mm"
    return "dequant_mm"


def tile_wins(capability: tuple[int, int], m: int, n: int, k: int) -> bool:
    """Whether ``cuda_tile`` was measured faster than our other kernels for this call shape."""
    return (
        capability == TILE_CC
        and TILE_MIN_M <= m <= TILE_MAX_M
        and n >= TILE_MIN_N
        and table.shape_class(n, k) == "large"
    )
