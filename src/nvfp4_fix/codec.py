"""The NVFP4 format itself: E2M1 codes, nibble packing, block scales, (de)quantization.

Layout: two E2M1 codes per uint8, the LOW nibble holds the even column. Every 16 consecutive
input-dim elements share one float8_e4m3fn scale; one float32 per-tensor scale sits on top, in one
of two conventions:

* compressed-tensors ``weight_global_scale`` is a DIVISOR:   W = e2m1 * block_scale / global
* ModelOpt ``weight_scale_2`` is a MULTIPLIER:               W = e2m1 * block_scale * scale_2
"""

from __future__ import annotations

import functools

import torch

from .errors import CheckpointError

BLOCK = 16
FP4_MAX = 6.0
FP8_MAX = 448.0

_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: E2M1 value of each 4-bit code; bit 3 is the sign.
E2M1_VALUES: tuple[float, ...] = _E2M1_MAGNITUDES + tuple(-v for v in _E2M1_MAGNITUDES)


class NVFP4FormatError(CheckpointError):
    """A tensor does not have the shape or dtype the NVFP4 format requires."""


def e2m1_table(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16 code values; cached per device so no host-to-device copy happens per call (CUDA graphs)."""
    return _table(E2M1_VALUES, torch.device(device or "cpu"), dtype)


@functools.cache
def _table(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes [..., 2k] (uint8 0..15) into bytes [..., k]; even column in the low nibble."""
    if codes.shape[-1] % 2:
        raise NVFP4FormatError(f"cannot pack an odd last dimension {codes.shape[-1]}")
    codes = codes.to(torch.uint8)
    return (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Unpack bytes [..., k] into 4-bit codes [..., 2k] (uint8 0..15)."""
    if packed.dtype != torch.uint8:
        raise NVFP4FormatError(f"packed codes must be uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def global_to_multiplier(global_scale: torch.Tensor, convention: str) -> torch.Tensor:
    """The per-tensor factor W is multiplied by, in float32, from either convention."""
    g = global_scale.to(torch.float32)
    if convention == "divisor":
        return 1.0 / g
    if convention == "multiplier":
        return g
    raise ValueError(f"unknown global scale convention {convention!r}; expected 'divisor' or 'multiplier'")


def check_shapes(packed: torch.Tensor, block_scale: torch.Tensor, name: str = "weight") -> tuple[int, int]:
    """Validate packed [N, K/2] uint8 against block scales [N, K/16]; return (N, K)."""
    if packed.dtype != torch.uint8:
        raise NVFP4FormatError(f"{name}: packed weight must be uint8, got {packed.dtype}")
    if packed.dim() < 2:
        raise NVFP4FormatError(f"{name}: packed weight must be at least 2-D, got shape {tuple(packed.shape)}")
    n, k = packed.shape[-2], packed.shape[-1] * 2
    if k % BLOCK:
        raise NVFP4FormatError(f"{name}: in_features {k} is not a multiple of the block size {BLOCK}")
    expected = (*packed.shape[:-1], k // BLOCK)
    if tuple(block_scale.shape) != expected:
        raise NVFP4FormatError(
            f"{name}: block scale shape {tuple(block_scale.shape)} does not match packed weight "
            f"{tuple(packed.shape)}; expected {expected}"
        )
    return n, k


def dequantize(
    packed: torch.Tensor,
    block_scale: torch.Tensor,
    global_scale: torch.Tensor,
    convention: str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense weights [..., N, K] from packed codes [..., N, K/2], block scales [..., N, K/16] and a
    per-tensor scale (a scalar, or one per leading index for stacked experts), computed in float32."""
    check_shapes(packed, block_scale)
    values = e2m1_table(packed.device)[unpack(packed).long()]
    scales = block_scale.to(torch.float32).repeat_interleave(BLOCK, dim=-1)
    mul = global_to_multiplier(global_scale, convention)
    if mul.numel() > 1:
        mul = mul.reshape(*mul.shape[: packed.dim() - 2], 1, 1) if mul.dim() < packed.dim() else mul
    return (values * scales * mul).to(dtype)


def round_to_e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code for each value of x (already divided by its scale), ties to even code."""
    mags = _table(_E2M1_MAGNITUDES, x.device, torch.float32)
    a = x.abs().to(torch.float32).clamp(max=FP4_MAX)
    # bucketize puts a value equal to a midpoint on the lower neighbour; ties go to the even code.
    mids = (mags[1:] + mags[:-1]) / 2
    idx = torch.bucketize(a, mids, right=False)
    tie = (idx < 7) & (a == mids[idx.clamp(max=6)])
    idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)
    sign = (x < 0).to(torch.uint8) << 3
    return idx.to(torch.uint8) | sign


def quantize(
    weight: torch.Tensor, convention: str = "divisor", global_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NVFP4 quantizer (tests; the embedding and lm_head options): dense [N, K] -> (packed uint8, e4m3
    block scales, global scale).

    The global scale follows ``convention``; by default it is computed from amax(W) as the producers do
    (divisor 448*6/amax, or multiplier amax/(6*448)).
    """
    w = weight.to(torch.float32)
    n, k = w.shape
    if k % BLOCK:
        raise NVFP4FormatError(f"in_features {k} is not a multiple of the block size {BLOCK}")
    if global_scale is None:
        amax = w.abs().max().clamp(min=1e-12)
        global_scale = (FP8_MAX * FP4_MAX / amax) if convention == "divisor" else (amax / (FP8_MAX * FP4_MAX))
        global_scale = global_scale.reshape(1) if convention == "divisor" else global_scale.reshape(())
    mul = global_to_multiplier(global_scale, convention)
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    block_amax = blocks.abs().amax(dim=-1)
    block_scale = (block_amax / FP4_MAX / mul).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    denom = block_scale.to(torch.float32) * mul
    scaled = torch.where(denom[..., None] > 0, blocks / denom[..., None], torch.zeros_like(blocks))
    codes = round_to_e2m1_codes(scaled).reshape(n, k)
    return pack(codes), block_scale, global_scale.to(torch.float32)
