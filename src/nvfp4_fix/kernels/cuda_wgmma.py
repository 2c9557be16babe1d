"""Two NVRTC-compiled GEMMs for 9 to 512 token rows that read each weight once per token tile of BM rows.

* KIND 0 (sm_90a, ``kernel="cuda_wgmma"``, never picked by ``auto``): a warpgroup's four warps decode
  their 64 weight rows of one 128-wide K chunk straight into the register A operand of eight
  ``wgmma.m64nBMk16`` (cuda_mma's decode and the checkpoint layout: nothing re-laid out, nothing kept
  beside the state_dict); the block's BM token rows are the B operand, written to shared memory once per
  chunk in the matching k order. Correct on an H100 but no faster than the dispatch anywhere: its loads,
  decode and activation stores alone take as long as the dispatch's kernels, and the tensor work is
  serialized behind them (benchmarks/RESULTS-kernels-wgmma.md, sessions 16-17).
* KIND 1 (sm_80+, ``kernel="cuda_tile"``): the same decode into ``mma.sync`` fragments, warps side by
  side over N with RT tiles of 16 rows each, against the block's activations, copied by ``cp.async`` a
  few chunks ahead into a shared ring. ``auto`` runs it on the H100 for wide layers at 17-48 token rows
  (kernels/selection.py), with the plan ``tile_plan`` gives: 1.11-1.88x cuda_mma and 1.23-1.50x the
  tl.dot GEMM there.

Grid: token tiles (fastest, so blocks sharing weights run together), row blocks, and K splits; a split
block stores float32 partial sums and the last of a tile's splits to arrive (a counter per tile, reset by
that block) adds them and writes y, so there is one launch.
"""

from __future__ import annotations

import functools

import torch

from . import nvrtc
from .cuda_mma import _device_index, _sm_count, launch_args
from .cuda_wgmma_src import DTYPES, VARIANT, arch, kernel_name, rows_per_block, shared_bytes, source

__all__ = ["VARIANT", "linear", "supports", "supports_shape", "MIN_M", "MAX_M", "plan_for", "tile_plan"]

#: The call sizes ``kernel="cuda_wgmma"`` runs.
MIN_M, MAX_M = 9, 512
#: Most output tiles of one launch that split K (one arrival counter each).
_MAX_TILES = 1 << 16


@functools.cache
def _kernel(dtype: torch.dtype, device_index: int, variant: tuple) -> nvrtc.Kernel:
    var = dict(variant)
    cubin = nvrtc.compile_cubin(source(dtype, var), arch(var, torch.cuda.get_device_capability(device_index)))
    return nvrtc.Kernel(cubin, kernel_name(var), torch.device("cuda", device_index), shared_bytes(var))


#: The mma.sync kernel's variant by token count (the first row whose bound is >= M): the token tile
#: just covering M. The fastest family at each measured M on an H100 (session 17: M 17 / 24 -> BM 24,
#: 32 -> BM 32, 40 / 48 -> BM 48) for the wide layers ``auto`` sends it.
TILE_PLANS: tuple[tuple[int, dict[str, int]], ...] = (
    (24, {"KIND": 1, "BM": 24, "WG": 1, "RT": 2}),
    (32, {"KIND": 1, "BM": 32, "WG": 2, "RT": 1}),
    (MAX_M, {"KIND": 1, "BM": 48, "WG": 1, "RT": 2}),
)


def tile_plan(m: int) -> dict[str, int]:
    return next(plan for top, plan in TILE_PLANS if m <= top)


@functools.cache
def _compiles(device_index: int, kind: int) -> bool:
    cc = torch.cuda.get_device_capability(device_index)
    if (kind == 0 and cc != (9, 0)) or cc < (8, 0):
        return False  # wgmma is sm_90a only (Blackwell has its own instructions); mma.sync from sm_80
    try:
        _kernel(torch.bfloat16, device_index, _key(None if kind == 0 else TILE_PLANS[0][1]))
        return True
    except (nvrtc.CudaError, OSError) as err:
        import warnings

        warnings.warn(f"nvfp4_fix: {kernel_name({'KIND': kind})} kernel unavailable ({err})", stacklevel=2)
        return False


def supports_shape(device_index: int, dtype: torch.dtype, m: int, k: int, kind: int = 0) -> bool:
    """Whether KIND ``kind`` runs this call on the device (compiling it the first time)."""
    return dtype in DTYPES and MIN_M <= m <= MAX_M and k % 128 == 0 and _compiles(device_index, kind)


def supports(x2: torch.Tensor, n: int, k: int, kind: int = 0) -> bool:
    return x2.is_cuda and supports_shape(_device_index(x2.device), x2.dtype, x2.shape[0], k, kind)


def _key(variant: dict[str, int] | None) -> tuple:
    return tuple(sorted({**VARIANT, **(variant or {})}.items()))


def plan_for(m: int, n: int, k: int, sms: int) -> tuple[dict[str, int], int]:
    """(variant, K splits) for one call shape: token tiles of 32 rows up to M = 32, 64 up to 64, else
    128; two warpgroups a block."""
    bm = 32 if m <= 32 else 64 if m <= 64 else 128
    variant = {"BM": bm, "WG": 2}
    return variant, splits_for(m, n, k, sms, variant)


def splits_for(m: int, n: int, k: int, sms: int, variant: dict[str, int]) -> int:
    """K splits: doubled while the grid is under one block per SM and each split keeps at least 8 chunks
    of 128."""
    var = {**VARIANT, **variant}
    tiles = -(-m // var["BM"]) * -(-n // rows_per_block(var))
    splits, chunks = 1, k // 128
    while tiles * splits < sms and chunks // (2 * splits) >= 8:
        splits *= 2
    return splits


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    """Arrival counters of the split-K tiles, zero between calls (each tile's last block resets its own).
    One set per device: calls on one device run in stream order."""
    return torch.zeros(_MAX_TILES, dtype=torch.int32, device=device)


@functools.cache
def _plan(dtype: torch.dtype, m: int, n: int, k: int, dev: int, override: tuple | None, splits: int | None):
    variant, _ = plan_for(m, n, k, _sm_count(dev))
    if override is not None:
        variant = {**variant, **dict(override)}
    splits = splits or splits_for(m, n, k, _sm_count(dev), variant)
    bm, wg = variant["BM"], variant["WG"]
    grid = (-(-m // bm), -(-n // rows_per_block(variant)), splits)
    if splits > 1 and grid[0] * grid[1] > _MAX_TILES:
        raise ValueError(f"cuda_wgmma: {grid[0] * grid[1]} tiles exceed {_MAX_TILES} for a K split")
    if splits > k // 128:
        raise ValueError(f"cuda_wgmma: {splits} splits of {k // 128} chunks")
    return _kernel(dtype, dev, _key(variant)), grid, (128 * wg, 1, 1)


def linear(
    x2: torch.Tensor,
    wp: torch.Tensor,
    ws: torch.Tensor,
    mul: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    variant: dict[str, int] | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """y[M, N] = x2[M, K] @ W.T * mul (+ bias). ``mul`` has 1 or N float32 elements; ``variant`` and
    ``splits`` override the plan (benchmarks, tests)."""
    m, k = x2.shape
    n = wp.shape[0]
    if not (m >= 1 and k % 128 == 0 and wp.shape[1] * 2 == k and x2.dtype in DTYPES):
        raise ValueError(
            f"cuda_wgmma needs K % 128 == 0 and fp16/bf16 activations, got x {tuple(x2.shape)} {x2.dtype}, "
            f"weight {tuple(wp.shape)}"
        )
    x2, wp, ws, mul, bias, y = launch_args("cuda_wgmma", x2, wp, ws, mul, bias, out)
    dev = _device_index(x2.device)
    override = tuple(sorted(variant.items())) if variant is not None else None
    kern, grid, block = _plan(x2.dtype, m, n, k, dev, override, splits)
    part = None
    if grid[2] > 1:
        part = torch.empty((grid[2], m, n), dtype=torch.float32, device=x2.device)
    counters = _counters(torch.device("cuda", dev)) if grid[2] > 1 else None
    mul_stride = 1 if mul.numel() > 1 else 0
    kern.launch(grid, block, x2, k, wp, ws, mul, mul_stride, bias, y, y.stride(0), m, n, k, part, counters)
    return y
