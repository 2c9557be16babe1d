"""CPU paths for packed NVFP4 linears.

* ``gemv_compiled``: the torch.compile'd fused GEMV from packed bytes, for M == 1 (measured on the
  2-core CI machine: 4096x4096 95-160 ms against 180-500 ms for chunked dequantize+matmul; see
  benchmarks/KERNEL_NOTES.md).
* ``linear_chunked``: dequantize a chunk of rows of W to float32 (torch.compile'd when possible),
  matmul, next chunk; for M > 1. Never materializes the whole dense layer.
* ``dequantize_dense``: dense weight once, for the "fast CPU, bf16 memory" load mode.
"""

from __future__ import annotations

import functools

import torch

from .. import settings
from ..codec import E2M1_VALUES


def _chunk_bytes() -> int:
    """Bytes of float32 dense weight the chunked path dequantizes at once."""
    return settings.current().cpu_chunk_mb << 20


@functools.cache
def _table(device: str) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def _dequant_rows_f32(
    wp: torch.Tensor, ws: torch.Tensor, mul: torch.Tensor | None, tab: torch.Tensor
) -> torch.Tensor:
    """float32 [rows, K] = e2m1 * e4m3 (* multiplier) for a slice of rows; tab = _table(device)."""
    rows, k2 = wp.shape
    vals = torch.stack((tab[(wp & 15).long()], tab[(wp >> 4).long()]), dim=-1).view(rows, k2 // 8, 16)
    vals = vals * ws.to(torch.float32).unsqueeze(-1)
    if mul is not None:
        vals = vals * mul.to(torch.float32)
    return vals.view(rows, k2 * 2)


def _compile_ok(weights: int | None = None) -> bool:
    """Compile for a layer of ``weights`` weights (None: any size)? Small layers run eagerly."""
    s = settings.current()
    big = weights is None or weights >= s.cpu_compile_min_weights
    return big and s.cpu_compile and not torch.compiler.is_compiling()


@functools.lru_cache(maxsize=1)
def _compiled_dequant():
    return torch.compile(_dequant_rows_f32, dynamic=True)


def _dequant_chunk(wp, ws, layer_weights: int):
    if _compile_ok(layer_weights):
        try:
            return _compiled_dequant()(wp, ws, None, _table(str(wp.device)))
        except Exception:  # no C++ compiler, unsupported platform: eager is exact too
            pass
    return _dequant_rows_f32(wp, ws, None, _table(str(wp.device)))


def _rows_per_chunk(n: int, k: int, chunk_bytes: int) -> int:
    return max(1, min(n, chunk_bytes // (k * 4)))


def linear_chunked(x2, wp, ws, mul, bias=None, *, out=None, chunk_bytes=None):
    """y = x @ W.T (+ bias) with W dequantized to float32 a chunk of rows at a time."""
    m, k = x2.shape
    n = wp.shape[0]
    rows = _rows_per_chunk(n, k, _chunk_bytes() if chunk_bytes is None else chunk_bytes)
    xf = x2.to(torch.float32)
    mulf = mul.to(torch.float32).reshape(())
    y = (
        torch.empty((m, n), dtype=torch.float32, device=x2.device)
        if out is None or out.dtype != torch.float32
        else out
    )
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = _dequant_chunk(wp[r0:r1], ws[r0:r1], 2 * wp.numel())
        torch.matmul(xf, w.t(), out=y[:, r0:r1])
    y.mul_(mulf)
    if bias is not None:
        y.add_(bias.to(torch.float32))
    if y.dtype != x2.dtype:
        if out is not None:
            out.copy_(y)
            return out
        y = y.to(x2.dtype)
    return y


def _gemv_fused(x2: torch.Tensor, wp: torch.Tensor, ws: torch.Tensor, mul: torch.Tensor, table: torch.Tensor):
    m, k = x2.shape
    n = wp.shape[0]
    lo = table[(wp & 15).long()]
    hi = table[(wp >> 4).long()]
    vals = torch.stack((lo, hi), dim=-1).view(1, n, k // 16, 16)
    xb = x2.to(torch.float32).view(m, 1, k // 16, 16)
    part = (vals * xb).sum(-1)  # [m, n, K/16] per-block partial sums
    y = (part * ws.to(torch.float32).unsqueeze(0)).sum(-1)
    return (y * mul.to(torch.float32)).to(x2.dtype)


@functools.lru_cache(maxsize=1)
def _compiled_gemv():
    return torch.compile(_gemv_fused, dynamic=True, fullgraph=True)


def gemv_compiled(x2, wp, ws, mul, bias=None, *, force_compile: bool = False):
    """torch.compile'd fused GEMV from packed bytes (no dense copy of W); meant for M == 1. Layers under
    ``settings.cpu_compile_min_weights`` run the same math eagerly unless ``force_compile``."""
    # detach(): as plain tensors, not Parameters, the weights get dynamic shapes (one compilation
    # for all layers instead of one per weight shape).
    args = (x2, wp.detach(), ws.detach().view(torch.float8_e4m3fn), mul.reshape(()), _table(str(x2.device)))
    y = None
    if _compile_ok(None if force_compile else wp.numel() * 2):
        try:
            y = _compiled_gemv()(*args)
        except Exception:  # no C++ compiler etc.: the same math eagerly
            y = None
    if y is None:
        y = _gemv_fused(*args)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def dequantize_dense(wp, ws, mul, dtype=torch.bfloat16, *, chunk_bytes=None):
    """Dense W [N, K] in ``dtype`` (value * scale * multiplier, one rounding), built in row chunks so
    only one float32 chunk exists at a time. For the "dequantize once at load" mode."""
    n, k2 = wp.shape
    k = k2 * 2
    out = torch.empty((n, k), dtype=dtype, device=wp.device)
    mulf = mul.to(torch.float32).reshape(())
    rows = _rows_per_chunk(n, k, _chunk_bytes() if chunk_bytes is None else chunk_bytes)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        out[r0:r1] = _dequant_chunk(wp[r0:r1], ws[r0:r1], 2 * wp.numel()).mul_(mulf)
    return out


def grad_input_chunked(g, wp, ws, mul, *, chunk_bytes=None):
    """grad_x = g [M, N] @ W [N, K] (the linear's backward) with row chunks of W dequantized to
    float32 and accumulated in float32; ``mul`` a float32 scalar or per-row [N] multiplier."""
    m, n = g.shape
    k = wp.shape[1] * 2
    rows = _rows_per_chunk(n, k, _chunk_bytes() if chunk_bytes is None else chunk_bytes)
    gf = g.to(torch.float32)
    per_row = mul.numel() > 1
    if per_row:
        gf = gf * mul.to(torch.float32).reshape(1, n)
    gx = torch.zeros((m, k), dtype=torch.float32, device=g.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        gx.addmm_(gf[:, r0:r1], _dequant_chunk(wp[r0:r1], ws[r0:r1], 2 * wp.numel()))
    if not per_row:
        gx.mul_(mul.to(torch.float32).reshape(()))
    return gx.to(g.dtype)
