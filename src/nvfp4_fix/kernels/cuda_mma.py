"""Decode GEMM for M <= 64 on tensor cores: packed NVFP4 codes are decoded straight into mma.sync
operand registers (sm_80+), compiled at first use with NVRTC.

Why tensor cores for a GEMV: the weight tile is the 16x16 A operand of ``mma.m16n8k16`` and the
activations the 16x8 B operand, so one mma consumes 256 weights and the SIMT work left is the decode
(~2 instructions a weight against ~5.5 in the Triton GEMV, which is issue-bound on Hopper).

Layout: no re-layout. A warp owns 16 weight rows; per 128-wide K chunk, lane (g, t) (g = lane/4,
t = lane%4) loads 16 bytes (32 codes) of rows g and g+8 at column 32t, one coalesced 16-byte load
per row, and the two e4m3 block scales of those codes. The mma's k order inside a chunk is a
permutation of the real one; the B fragment is built from x in the same permutation, so the dot
product is unchanged. Per 32-bit word (8 codes, nibble i = code i), ``dec(w << 4j)`` makes a 16-bit
pair of codes (3-j, 7-j): sign to bit 15, magnitude bits to the exponent/mantissa boundary, which
is the code's value * 2^-126 as bf16 (2^-14 as fp16, subnormal 0.5 included). One packed fma by the
block scale, pre-multiplied by 2^119 (bf16) or 2^7 (fp16), gives value * scale * 2^-7 exactly (at
most 6 significant bits, always a normal or exact subnormal number); the epilogue multiplies the
fp32 sums by 2^7 and the per-tensor (or per-row) multiplier.

Requires K % 128 == 0 and 16-byte aligned rows; ``supports`` says when, the dispatch falls back to
Triton otherwise. Warps of a block split K; a block reduces in shared memory, so there is one
launch and no workspace.
"""

from __future__ import annotations

import functools

import torch

from .. import settings
from . import nvrtc
from .cuda_mma_src import DTYPES, VARIANT, default_variant, source
from .device import device_index, sm_count

__all__ = [
    "VARIANT",
    "default_variant",
    "source",
    "linear",
    "launch_args",
    "supports",
    "supports_shape",
    "TUNED",
    "MAX_M",
]

#: Token-row ranges of the measured table, named by their top M: M 1, 2..8 (one mma column tile, like
#: M = 1; an entry is the variant with the least worst slowdown measured at M = 2, 4 and 8: none measured
#: yet, so these rows run the defaults), 9..16, 17..32, 33..64 (each measured at its top M).
BUCKETS = ((1, 1), (2, 8), (9, 16), (17, 32), (33, 64))

#: (bucket top M, N, K) -> (variant, warps): the fastest spill-free variant measured at the top M
#: (benchmarks/sweep_mma_mid.py); other shapes get ``default_variant`` and ``warps_for``.
#: Measured on an H100 80GB HBM3 (sessions 9 and 11, `benchmarks/device_open_issues.sh` steps mma + apply;
#: benchmarks/RESULTS-kernels-mid-m.md).
TUNED: dict[tuple[int, int, int], tuple[dict[str, int], int]] = {
    (1, 2048, 4096): ({"RT": 1, "DEPTH": 3, "XPRE": 0, "MINB": 2, "WN": 1}, 8),  # 30B-A3B o: 5.2 us
    (1, 4096, 4096): ({"RT": 1, "DEPTH": 1, "XPRE": 0, "MINB": 3, "WN": 1}, 8),  # 8B o: 6.9 us
    (1, 4096, 14336): ({"RT": 1, "DEPTH": 2, "XPRE": 1, "MINB": 2, "WN": 1}, 8),  # 8B down: 15.7 us
    (1, 5120, 2048): ({"RT": 1, "DEPTH": 1, "XPRE": 0, "MINB": 3, "WN": 1}, 8),  # 30B-A3B qkv: 5.4 us
    (1, 6144, 4096): ({"RT": 1, "DEPTH": 1, "XPRE": 0, "MINB": 3, "WN": 1}, 8),  # 8B qkv: 8.5 us
    (1, 8192, 8192): ({"RT": 1, "DEPTH": 2, "XPRE": 1, "MINB": 2, "WN": 1}, 4),  # 70B o: 16.9 us
    (1, 8192, 28672): ({"RT": 1, "DEPTH": 2, "XPRE": 1, "MINB": 2, "WN": 1}, 4),  # 70B down: 53.6 us
    (1, 10240, 8192): ({"RT": 1, "DEPTH": 1, "XPRE": 0, "MINB": 3, "WN": 1}, 4),  # 70B qkv: 20.5 us
    (1, 28672, 4096): ({"RT": 1, "DEPTH": 2, "XPRE": 1, "MINB": 2, "WN": 1}, 2),  # 8B gate_up: 29.2 us
    (1, 57344, 8192): ({"RT": 1, "DEPTH": 2, "XPRE": 1, "MINB": 2, "WN": 1}, 4),  # 70B gate_up: 100.8 us
    (16, 1536, 2048): ({"RT": 1, "DEPTH": 2, "XPRE": 1, "MINB": 1}, 8),  # 30B-A3B expert gate_up: 5.0 us
    (16, 2048, 768): ({"RT": 1, "DEPTH": 1, "XPRE": 0, "MINB": 2}, 8),  # Qwen3-30B-A3B expert down: 3.6 us
    (16, 2048, 4096): ({"RT": 1, "DEPTH": 2, "XPRE": 1, "MINB": 1, "WN": 1}, 8),  # 30B-A3B o: 7.1 us
    (16, 4096, 4096): ({"RT": 1, "DEPTH": 2, "XPRE": 0, "MINB": 2, "WN": 1}, 8),  # 8B o: 9.7 us
    (16, 4096, 14336): ({"RT": 2, "DEPTH": 2, "XPRE": 0, "MINB": 1, "WN": 1}, 8),  # 8B down: 23.3 us
    (16, 5120, 2048): ({"RT": 1, "DEPTH": 2, "XPRE": 0, "MINB": 2, "WN": 1}, 4),  # 30B-A3B qkv: 8.2 us
    (16, 6144, 4096): ({"RT": 4, "DEPTH": 1, "XPRE": 0, "MINB": 1, "WN": 1}, 8),  # 8B qkv: 13.0 us
    (16, 8192, 8192): ({"RT": 2, "DEPTH": 1, "XPRE": 0, "MINB": 2, "WN": 1}, 8),  # 70B o: 22.1 us
    (16, 8192, 28672): ({"RT": 2, "DEPTH": 2, "XPRE": 1, "MINB": 1, "WN": 1}, 4),  # 70B down: 70.4 us
    (16, 10240, 8192): ({"RT": 2, "DEPTH": 1, "XPRE": 0, "MINB": 2, "WN": 1}, 4),  # 70B qkv: 31.2 us
    (16, 28672, 4096): ({"RT": 2, "DEPTH": 1, "XPRE": 0, "MINB": 2, "WN": 4}, 8),  # 8B gate_up: 38.1 us
    (16, 57344, 8192): ({"RT": 2, "DEPTH": 1, "XPRE": 0, "MINB": 2, "WN": 2}, 8),  # 70B gate_up: 135.9 us
    (32, 1536, 2048): ({"RT": 1, "DEPTH": 2, "XPRE": 0, "MINB": 1}, 8),  # 30B-A3B expert gate_up: 6.3 us
    (32, 2048, 768): ({"RT": 1, "DEPTH": 1, "XPRE": 0, "MINB": 1}, 8),  # Qwen3-30B-A3B expert down: 4.4 us
    (32, 2048, 4096): ({"RT": 1, "DEPTH": 1, "XPRE": 0, "MINB": 1, "WN": 1}, 8),  # 30B-A3B o: 9.6 us
    (32, 4096, 4096): ({"RT": 2, "DEPTH": 1, "XPRE": 0, "MINB": 1, "WN": 1}, 8),  # 8B o: 12.2 us
    (32, 4096, 14336): ({"RT": 2, "DEPTH": 1, "XPRE": 0, "MINB": 1, "WN": 1}, 8),  # 8B down: 29.9 us
    (32, 5120, 2048): ({"RT": 2, "DEPTH": 1, "XPRE": 0, "MINB": 1, "WN": 1}, 4),  # 30B-A3B qkv: 11.4 us
    (32, 6144, 4096): ({"RT": 2, "DEPTH": 2, "XPRE": 0, "MINB": 1, "WN": 1}, 4),  # 8B qkv: 17.9 us
    (32, 8192, 8192): ({"RT": 2, "DEPTH": 3, "XPRE": 0, "MINB": 1, "WN": 1}, 4),  # 70B o: 31.3 us
    (32, 8192, 28672): ({"RT": 4, "DEPTH": 1, "XPRE": 0, "MINB": 1, "WN": 1}, 8),  # 70B down: 96.0 us
    (32, 10240, 8192): ({"RT": 2, "DEPTH": 3, "XPRE": 0, "MINB": 1, "WN": 1}, 8),  # 70B qkv: 50.8 us
    (32, 28672, 4096): ({"RT": 4, "DEPTH": 1, "XPRE": 0, "MINB": 1, "WN": 2}, 4),  # 8B gate_up: 58.1 us
    (32, 57344, 8192): ({"RT": 4, "DEPTH": 1, "XPRE": 0, "MINB": 1, "WN": 4}, 4),  # 70B gate_up: 188.0 us
}


def bucket(m: int) -> int | None:
    return next((hi for lo, hi in BUCKETS if lo <= m <= hi), None)


def bucket_nts(top: int) -> range:
    """The column-tile counts NT whose calls take bucket ``top``'s tuned variant."""
    lo = next(lo for lo, hi in BUCKETS if hi == top)
    return range(-(-lo // 8), -(-top // 8) + 1)


def tuned(m: int, n: int, k: int) -> tuple[dict[str, int] | None, int | None]:
    entry = TUNED.get((bucket(m) or 0, n, k))
    return entry if entry is not None else (None, None)


def _variant_key(nt: int, variant: dict[str, int] | None = None) -> tuple:
    """The full variant (defaults filled in) as a hashable key: one compile per distinct kernel."""
    return tuple(sorted({**default_variant(nt), **(variant or {})}.items()))


@functools.cache
def _kernel(dtype: torch.dtype, nt: int, device_index: int, variant: tuple) -> nvrtc.Kernel:
    major, minor = torch.cuda.get_device_capability(device_index)
    cubin = nvrtc.compile_cubin(source(dtype, nt, dict(variant)), f"sm_{major}{minor}")
    return nvrtc.Kernel(cubin, "nvfp4_mma", torch.device("cuda", device_index))


def _usable(device_index: int) -> bool:
    return settings.current().cuda_mma and _compiles(device_index)


@functools.cache
def _compiles(device_index: int) -> bool:
    if torch.cuda.get_device_capability(device_index) < (8, 0):
        return False
    try:
        _kernel(torch.bfloat16, 1, device_index, _variant_key(1))
        _kernel(torch.float16, 1, device_index, _variant_key(1))
        return True
    except (nvrtc.CudaError, OSError) as err:  # no NVRTC / driver too old: Triton kernels instead
        import warnings

        warnings.warn(f"nvfp4_fix: CUDA mma kernel unavailable ({err}); using Triton", stacklevel=2)
        return False


#: Largest M the dispatch sends here: up to 32 rows the tuned variants beat the tl.dot GEMM on every
#: measured shape (1.3-2.9x at M = 16 and 32, H100); at 64 the tuned tl.dot tiles win on every shape.
MAX_M = 32

#: Most token rows one launch computes (NT = 8 column tiles of 8).
MAX_ROWS = 64


def supports(x2: torch.Tensor, n: int, k: int) -> bool:
    return x2.is_cuda and supports_shape(device_index(x2.device), x2.dtype, x2.shape[0], k)


def supports_shape(device_index: int, dtype: torch.dtype, m: int, k: int) -> bool:
    return dtype in DTYPES and m <= MAX_ROWS and k % 128 == 0 and _usable(device_index)


def warps_for(n: int, k: int, device: torch.device, rows: int = 16) -> int:
    """Warps per block of ``rows`` rows (they split K): 8 while the grid is under two blocks per SM,
    else 4; never fewer than 4 chunks of 128 per warp. Measured on the H100 (benchmarks/RESULTS.md)."""
    sms = sm_count(device_index(device))
    w = 8 if -(-n // rows) <= 2 * sms else 4
    while w > 1 and k // 128 < 4 * w:
        w //= 2
    return w


@functools.cache
def _plan(
    dtype: torch.dtype, m: int, n: int, k: int, dev: int, warps: int | None, override: tuple | None
) -> tuple:
    """(kernel, grid, block) for one call shape: everything but the pointers, computed once. Without
    an ``override`` (the caller's variant as sorted items) or ``warps``: the measured ``tuned`` entry."""
    variant = dict(override) if override is not None else None
    if variant is None and warps is None:
        variant, warps = tuned(m, n, k)
    key = _variant_key(-(-m // 8), variant)
    var = dict(key)
    wn = var["WN"]
    rows = 16 * var["RT"] * wn
    w = warps or max(wn, warps_for(n, k, torch.device("cuda", dev), rows) // wn * wn)
    if not 1 <= w <= 8 or w % wn:
        raise ValueError(f"cuda_mma runs 1 to 8 warps per block, a multiple of WN = {wn}; got {w}")
    kern = _kernel(dtype, -(-m // 8), dev, key)
    return kern, (-(-n // rows), 1, 1), (32 * w, 1, 1)


def launch_args(
    name: str,
    x2: torch.Tensor,
    wp: torch.Tensor,
    ws: torch.Tensor,
    mul: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(x2, wp, ws, mul, bias, y) as the NVRTC kernels read them: 16-byte aligned contiguous activations,
    codes and scales (a misaligned view, rare, is copied), float32 multipliers, bias in x2's dtype, and the
    output (``out`` checked, else a new [M, N] tensor)."""
    m, n = x2.shape[0], wp.shape[0]
    if not x2.is_contiguous() or x2.data_ptr() % 16:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    if not wp.is_contiguous() or wp.data_ptr() % 16:
        wp = wp.clone(memory_format=torch.contiguous_format)
    if not ws.is_contiguous() or ws.data_ptr() % 16:
        ws = ws.clone(memory_format=torch.contiguous_format)
    if mul.dtype != torch.float32:
        mul = mul.to(torch.float32)
    if out is not None and (out.shape != (m, n) or out.dtype != x2.dtype or out.stride(1) != 1):
        raise ValueError(f"{name}: out must be [{m}, {n}] {x2.dtype} with unit column stride")
    y = out if out is not None else torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if bias is not None and (bias.dtype != x2.dtype or not bias.is_contiguous()):
        bias = bias.to(x2.dtype).contiguous()
    return x2, wp, ws, mul, bias, y


def linear(
    x2: torch.Tensor,
    wp: torch.Tensor,
    ws: torch.Tensor,
    mul: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    warps: int | None = None,
    out: torch.Tensor | None = None,
    variant: dict[str, int] | None = None,
) -> torch.Tensor:
    """y[M, N] = x2[M, K] @ W.T * mul (+ bias) for M <= 64. ``mul`` has 1 or N float32 elements."""
    m, k = x2.shape
    n = wp.shape[0]
    if not (1 <= m <= MAX_ROWS and k % 128 == 0 and wp.shape[1] * 2 == k):
        raise ValueError(
            f"cuda_mma needs 1 <= M <= {MAX_ROWS} and K % 128 == 0, "
            f"got M={m}, K={k}, weight {tuple(wp.shape)}"
        )
    x2, wp, ws, mul, bias, y = launch_args("cuda_mma", x2, wp, ws, mul, bias, out)
    override = tuple(sorted(variant.items())) if variant is not None else None
    kern, grid, block = _plan(x2.dtype, m, n, k, device_index(x2.device), warps, override)
    kern.launch(grid, block, x2, k, wp, ws, mul, 1 if mul.numel() > 1 else 0, bias, y, y.stride(0), m, n, k)
    return y
