"""``cuda_tile``: an NVRTC-compiled mma.sync GEMM (sm_80+) for 9 to 512 token rows that decodes each weight
once per token tile of BM rows (its C++ and the layout are in ``cuda_tile_src.py``).

``auto`` runs it on the H100 for the wide layers (gate/up, lm_head) at 17-48 rows, with the plan
``tile_plan`` gives (kernels/selection.py ``tile_wins``): 1.07-1.88x the dispatch without it there
(benchmarks/RESULTS-kernels-tile.md, session 17). Grid: token tiles (fastest, so blocks sharing weights run
together), row blocks and K splits.
"""

from __future__ import annotations

import functools

import torch

from . import nvrtc
from .cuda_mma import launch_args
from .cuda_tile_src import DTYPES, KERNEL_NAME, VARIANT, arch, rows_per_block, shared_bytes, source
from .device import arrival_counters, device_index, sm_count

__all__ = ["VARIANT", "TILE_PLANS", "linear", "supports", "supports_shape", "MIN_M", "MAX_M", "tile_plan"]

#: The call sizes ``kernel="cuda_tile"`` runs.
MIN_M, MAX_M = 9, 512
#: Most output tiles of one launch that split K (one arrival counter each).
_MAX_TILES = 1 << 16

#: The variant by token count (the first row whose bound is >= M): the token tile just covering M. The
#: fastest family at each measured M on an H100 (session 17: M 17 / 24 -> BM 24, 32 -> BM 32, 40 / 48 ->
#: BM 48) on the wide layers ``auto`` sends it.
TILE_PLANS: tuple[tuple[int, dict[str, int]], ...] = (
    (24, {"BM": 24, "WG": 1, "RT": 2}),
    (32, {"BM": 32, "WG": 2, "RT": 1}),
    (MAX_M, {"BM": 48, "WG": 1, "RT": 2}),
)


def tile_plan(m: int) -> dict[str, int]:
    return next(plan for top, plan in TILE_PLANS if m <= top)


@functools.cache
def _kernel(dtype: torch.dtype, device_index: int, variant: tuple) -> nvrtc.Kernel:
    var = dict(variant)
    cubin = nvrtc.compile_cubin(source(dtype, var), arch(torch.cuda.get_device_capability(device_index)))
    return nvrtc.Kernel(cubin, KERNEL_NAME, torch.device("cuda", device_index), shared_bytes(var))


@functools.cache
def _compiles(device_index: int) -> bool:
    if torch.cuda.get_device_capability(device_index) < (8, 0):
        return False  # mma.sync m16n8k16 and cp.async need sm_80
    try:
        _kernel(torch.bfloat16, device_index, _key(TILE_PLANS[0][1]))
        return True
    except (nvrtc.CudaError, OSError) as err:
        import warnings

        warnings.warn(f"nvfp4_fix: cuda_tile kernel unavailable ({err})", stacklevel=2)
        return False


def supports_shape(device_index: int, dtype: torch.dtype, m: int, k: int) -> bool:
    """Whether the kernel runs this call on the device (compiling it the first time)."""
    return dtype in DTYPES and MIN_M <= m <= MAX_M and k % 128 == 0 and _compiles(device_index)


def supports(x2: torch.Tensor, n: int, k: int) -> bool:
    return x2.is_cuda and supports_shape(device_index(x2.device), x2.dtype, x2.shape[0], k)


def _key(variant: dict[str, int]) -> tuple:
    return tuple(sorted({**VARIANT, **variant}.items()))


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
def _plan(dtype: torch.dtype, m: int, n: int, k: int, dev: int, variant: tuple, splits: int | None):
    var = {**VARIANT, **dict(variant)}
    splits = splits or splits_for(m, n, k, sm_count(dev), var)
    grid = (-(-m // var["BM"]), -(-n // rows_per_block(var)), splits)
    if splits > 1 and grid[0] * grid[1] > _MAX_TILES:
        raise ValueError(f"cuda_tile: {grid[0] * grid[1]} tiles exceed {_MAX_TILES} for a K split")
    if splits > k // 128:
        raise ValueError(f"cuda_tile: {splits} splits of {k // 128} chunks")
    return _kernel(dtype, dev, _key(var)), grid, (128 * var["WG"], 1, 1)


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
    """y[M, N] = x2[M, K] @ W.T * mul (+ bias). ``mul`` has 1 or N float32 elements; ``variant`` (default
    ``tile_plan(M)``) and ``splits`` (default ``splits_for``) override the plan (benchmarks, tests)."""
    m, k = x2.shape
    n = wp.shape[0]
    if not (m >= 1 and k % 128 == 0 and wp.shape[1] * 2 == k and x2.dtype in DTYPES):
        raise ValueError(
            f"cuda_tile needs K % 128 == 0 and fp16/bf16 activations, got x {tuple(x2.shape)} {x2.dtype}, "
            f"weight {tuple(wp.shape)}"
        )
    x2, wp, ws, mul, bias, y = launch_args("cuda_tile", x2, wp, ws, mul, bias, out)
    dev = device_index(x2.device)
    var = tuple(sorted((variant if variant is not None else tile_plan(m)).items()))
    kern, grid, block = _plan(x2.dtype, m, n, k, dev, var, splits)
    part = None
    if grid[2] > 1:
        part = torch.empty((grid[2], m, n), dtype=torch.float32, device=x2.device)
    counters = arrival_counters(torch.device("cuda", dev), KERNEL_NAME, _MAX_TILES) if grid[2] > 1 else None
    mul_stride = 1 if mul.numel() > 1 else 0
    kern.launch(grid, block, x2, k, wp, ws, mul, mul_stride, bias, y, y.stride(0), m, n, k, part, counters)
    return y
