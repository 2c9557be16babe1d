"""Host-side launchers for the Triton NVFP4 kernels (GPU, or the CPU interpreter under TRITON_INTERPRET=1).

All launchers take x as 2-D [M, K] (fp16 or bf16), the packed weight [N, K/2] uint8 and the e4m3
block scales [N, K/16] in checkpoint layout, the per-tensor multiplier as a float32 tensor (read on
the device: no host sync), and an optional bias [N]. They allocate the output with torch.empty (or
write into ``out``), so they are safe under CUDA-graph capture.
"""

from __future__ import annotations

import os

import torch
import triton

from .. import settings
from .device import device_index, sm_count
from .triton_nvfp4 import _dequant_kernel, _gemv_kernel, _mm_kernel, _splitk_reduce_kernel

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Per-shape tuned configs from benchmarks/bench_kernels.py --tune on an H100 80GB HBM3 (torch 2.11,
# Triton 3.6; benchmarks/RESULTS.md): the Llama-3-8B and -70B layer shapes.
# TUNED_M1[(N, K)] = (kernel, cfg) with kernel "gemv" or "mm" (whichever measured faster at M=1);
# TUNED_SMALL[(N, K)] = cfg of the BM=16 tl.dot kernel measured at M=16 (used for 2 <= M <= 16).
# Shapes not listed fall back to the heuristics below.
TUNED_M1: dict[tuple[int, int], tuple[str, dict]] = {
    (6144, 4096): ("gemv", {"BN": 8, "BKW": 128, "SPLIT": 1, "num_warps": 4, "DEQ": 2, "num_stages": 3}),
    (4096, 4096): ("gemv", {"BN": 8, "BKW": 128, "SPLIT": 1, "num_warps": 4, "DEQ": 2, "num_stages": 3}),
    (28672, 4096): ("gemv", {"BN": 16, "BKW": 128, "SPLIT": 1, "num_warps": 4, "DEQ": 2, "num_stages": 3}),
    (4096, 14336): ("gemv", {"BN": 16, "BKW": 128, "SPLIT": 4, "num_warps": 4, "DEQ": 2, "num_stages": 3}),
    (128256, 4096): ("gemv", {"BN": 16, "BKW": 128, "SPLIT": 1, "num_warps": 4, "DEQ": 2, "num_stages": 3}),
    (10240, 8192): ("gemv", {"BN": 8, "BKW": 128, "SPLIT": 1, "num_warps": 4, "DEQ": 2, "num_stages": 3}),
    (8192, 8192): ("gemv", {"BN": 16, "BKW": 128, "SPLIT": 1, "num_warps": 4, "DEQ": 2, "num_stages": 3}),
    (57344, 8192): ("gemv", {"BN": 16, "BKW": 128, "SPLIT": 1, "num_warps": 4, "DEQ": 2, "num_stages": 3}),
    (8192, 28672): ("gemv", {"BN": 16, "BKW": 128, "SPLIT": 4, "num_warps": 4, "DEQ": 2, "num_stages": 3}),
}
TUNED_SMALL: dict[tuple[int, int], dict] = {
    (6144, 4096): {"BM": 16, "BN": 64, "BK": 128, "SPLIT": 8, "num_warps": 4, "num_stages": 3},
    (4096, 4096): {"BM": 16, "BN": 64, "BK": 128, "SPLIT": 8, "num_warps": 4, "num_stages": 3},
    (28672, 4096): {"BM": 16, "BN": 64, "BK": 128, "SPLIT": 2, "num_warps": 4, "num_stages": 3},
    (4096, 14336): {"BM": 16, "BN": 64, "BK": 256, "SPLIT": 4, "num_warps": 4, "num_stages": 4},
    (128256, 4096): {"BM": 16, "BN": 64, "BK": 128, "SPLIT": 1, "num_warps": 4, "num_stages": 3},
    (10240, 8192): {"BM": 16, "BN": 64, "BK": 128, "SPLIT": 4, "num_warps": 4, "num_stages": 4},
    (8192, 8192): {"BM": 16, "BN": 64, "BK": 128, "SPLIT": 8, "num_warps": 4, "num_stages": 3},
    (57344, 8192): {"BM": 16, "BN": 64, "BK": 128, "SPLIT": 1, "num_warps": 4, "num_stages": 3},
    (8192, 28672): {"BM": 16, "BN": 64, "BK": 128, "SPLIT": 8, "num_warps": 4, "num_stages": 3},
}
# TUNED_MID[(N, K)] = cfg of the tl.dot kernel measured at M=128 (used for 64 < M <= 256).
TUNED_MID: dict[tuple[int, int], dict] = {
    (6144, 4096): {"BM": 128, "BN": 64, "BK": 64, "SPLIT": 4, "num_warps": 4, "num_stages": 3},
    (4096, 4096): {"BM": 128, "BN": 128, "BK": 64, "SPLIT": 8, "num_warps": 8, "num_stages": 3},
    (28672, 4096): {"BM": 128, "BN": 128, "BK": 64, "SPLIT": 1, "num_warps": 8, "num_stages": 3},
    (4096, 14336): {"BM": 64, "BN": 128, "BK": 64, "SPLIT": 8, "num_warps": 4, "num_stages": 3},
    (128256, 4096): {"BM": 128, "BN": 128, "BK": 64, "SPLIT": 1, "num_warps": 8, "num_stages": 3},
    (10240, 8192): {"BM": 128, "BN": 64, "BK": 64, "SPLIT": 2, "num_warps": 4, "num_stages": 3},
    (8192, 8192): {"BM": 128, "BN": 128, "BK": 64, "SPLIT": 4, "num_warps": 4, "num_stages": 3},
    (57344, 8192): {"BM": 128, "BN": 64, "BK": 64, "SPLIT": 2, "num_warps": 4, "num_stages": 3},
    (8192, 28672): {"BM": 128, "BN": 128, "BK": 64, "SPLIT": 4, "num_warps": 8, "num_stages": 3},
}

# TUNED_M64[(N, K)] = cfg of the tl.dot kernel measured at M=64 (used for 32 < M <= 64; M <= 32 runs
# cuda_mma): benchmarks/sweep_mid_m.py --m 64 on an H100 80GB HBM3 (session 9, one device call).
TUNED_M64: dict[tuple[int, int], dict] = {
    # 8B qkv: 21.7 us (untuned 34.3)
    (6144, 4096): {"BM": 64, "BN": 64, "BK": 128, "SPLIT": 4, "num_warps": 4, "num_stages": 3},
    # 8B o: 18.0 us (untuned 23.8)
    (4096, 4096): {"BM": 64, "BN": 128, "BK": 128, "SPLIT": 8, "num_warps": 8, "num_stages": 3},
    # 8B gate_up: 76.9 us (untuned 136.8)
    (28672, 4096): {"BM": 64, "BN": 128, "BK": 64, "SPLIT": 2, "num_warps": 4, "num_stages": 3},
    # 8B down: 43.3 us (untuned 72.7)
    (4096, 14336): {"BM": 64, "BN": 128, "BK": 64, "SPLIT": 16, "num_warps": 4, "num_stages": 3},
    # 30B-A3B expert gate_up: 7.8 us (untuned 11.3)
    (1536, 2048): {"BM": 64, "BN": 64, "BK": 256, "SPLIT": 4, "num_warps": 4, "num_stages": 3},
    # 30B-A3B expert down: 5.4 us (untuned 11.6)
    (2048, 768): {"BM": 32, "BN": 32, "BK": 128, "SPLIT": 1, "num_warps": 4, "num_stages": 3},
    # 70B qkv: 59.8 us (untuned 102.9)
    (10240, 8192): {"BM": 64, "BN": 128, "BK": 64, "SPLIT": 4, "num_warps": 4, "num_stages": 3},
    # 70B o: 46.1 us (untuned 78.5)
    (8192, 8192): {"BM": 64, "BN": 128, "BK": 64, "SPLIT": 8, "num_warps": 4, "num_stages": 3},
    # 70B gate_up: 251.2 us (untuned 465.5)
    (57344, 8192): {"BM": 64, "BN": 128, "BK": 64, "SPLIT": 1, "num_warps": 4, "num_stages": 3},
    # 70B down: 125.4 us (untuned 233.7)
    (8192, 28672): {"BM": 64, "BN": 128, "BK": 64, "SPLIT": 8, "num_warps": 4, "num_stages": 3},
}


def _sms(device: torch.device) -> int:
    if device.type != "cuda" or _INTERPRET:
        return 132
    return sm_count(device_index(device))


def _split_for(
    programs_mn: int, k_iters: int, sms: int, target_waves: float = 4.0, min_iters: int = 4
) -> int:
    """Split K until there are ~target_waves programs per SM, keeping >= min_iters loop trips each."""
    split = 1
    while programs_mn * split < target_waves * sms and k_iters // (split * 2) >= min_iters:
        split *= 2
    return split


def gemv_config(n: int, k: int, device: torch.device) -> dict:
    tuned = TUNED_M1.get((n, k))
    if tuned is not None and tuned[0] == "gemv" and not _INTERPRET:
        return dict(tuned[1])
    bn, bkw, warps = 16, 128, 4
    kw = k // 8
    while bkw > 4 and bkw // 2 >= kw:  # don't pad tiny K with a huge tile (BKW >= 4: no size-1 dims)
        bkw //= 2
    split = _split_for(triton.cdiv(n, bn), triton.cdiv(kw, bkw), _sms(device))
    deq = 0 if _INTERPRET else 2  # 2: packed-PTX decode (measured fastest); 0: plain Triton bit trick
    return {"BN": bn, "BKW": bkw, "SPLIT": split, "num_warps": warps, "DEQ": deq, "num_stages": 3}


def mm_config(m: int, n: int, k: int, device: torch.device) -> dict:
    if m <= 16:
        tuned = TUNED_M1.get((n, k)) if m == 1 else None
        if tuned is not None and tuned[0] == "mm":
            return dict(tuned[1])
        cfg = TUNED_SMALL.get((n, k))
        if cfg is not None:
            return dict(cfg)
        bm, bn, bk, warps, stages = 16, 64, 256, 4, 4
    elif m > 64 and m <= 256 and (n, k) in TUNED_MID:
        return dict(TUNED_MID[(n, k)])
    elif m > 32 and m <= 64 and (n, k) in TUNED_M64:
        return dict(TUNED_M64[(n, k)])
    elif m <= 64:  # the tile most often fastest at M = 64 (TUNED_M64)
        bm, bn, bk, warps, stages = 64, 128, 64, 4, 3
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    while bk > 32 and bk // 2 >= k:  # BK >= 32: no size-1 block dimension
        bk //= 2
    split = _split_for(
        triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, bk), _sms(device), target_waves=2.0
    )
    return {
        "BM": bm,
        "BN": bn,
        "BK": bk,
        "SPLIT": split,
        "num_warps": warps,
        "num_stages": stages,
        "GROUP_M": 8,
    }


def m1_kernel(n: int, k: int) -> str:
    """ "gemv" or "mm" for M == 1 on this shape (tuned table; default gemv)."""
    tuned = TUNED_M1.get((n, k))
    return tuned[0] if tuned is not None else "gemv"


def _check(x2: torch.Tensor, wp: torch.Tensor, ws: torch.Tensor) -> tuple[int, int, int]:
    m, k = x2.shape
    n = wp.shape[0]
    if k % 16:
        raise ValueError(f"nvfp4 kernels need K to be a multiple of 16, got K={k}")
    if wp.shape != (n, k // 2) or ws.shape != (n, k // 16):
        raise ValueError(
            f"packed weight {tuple(wp.shape)} / scales {tuple(ws.shape)} do not match x [..., {k}]"
        )
    if x2.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"triton nvfp4 kernels take fp16/bf16 activations, got {x2.dtype}")
    return m, n, k


def _prep(x2, wp, ws):
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if not wp.is_contiguous():
        wp = wp.contiguous()
    if not ws.is_contiguous():
        ws = ws.contiguous()
    s8 = ws.view(torch.uint8)
    return x2, wp, s8


def _mul_arg(mul: torch.Tensor, n: int) -> tuple[torch.Tensor, bool]:
    """The multiplier as the kernels take it: a float32 scalar, or [N] per-row values (fused groups)."""
    if mul.numel() == 1:
        return mul.reshape(()), False
    if mul.numel() != n:
        raise ValueError(f"weight_mul has {mul.numel()} elements; expected 1 or N = {n}")
    return mul.reshape(n).to(torch.float32).contiguous(), True


def _alloc_out(out, m, n, dtype, device):
    if out is None:
        return torch.empty((m, n), dtype=dtype, device=device)
    if out.shape != (m, n) or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError("out must be [M, N] in x.dtype with unit column stride")
    return out


def _reduce(ws_buf, y, bias, split):
    m, n = y.shape
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
        ws_buf,
        y,
        bias if bias is not None else ws_buf,
        m,
        n,
        y.stride(0),
        split,
        BLOCK=block,
        HAS_BIAS=bias is not None,
        num_warps=4,
    )


def gemv(x2, wp, ws, mul, bias=None, *, out=None, cfg=None):
    """Decode kernel (CUDA-core FMA); each program row handles one row of x (meant for M == 1)."""
    m, n, k = _check(x2, wp, ws)
    x2, wp, s8 = _prep(x2, wp, ws)
    w32 = wp.view(torch.int32)
    cfg = dict(cfg) if cfg is not None else gemv_config(n, k, x2.device)
    kw, kb = k // 8, k // 16
    bkw = cfg["BKW"]
    wps = triton.cdiv(triton.cdiv(kw, cfg["SPLIT"]), bkw) * bkw
    split = triton.cdiv(kw, wps)
    even = kw % bkw == 0
    y = _alloc_out(out, m, n, x2.dtype, x2.device)
    mul, mul_rows = _mul_arg(mul, n)
    dst = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(n, cfg["BN"]), split, m)
    _gemv_kernel[grid](
        x2,
        w32,
        s8,
        dst,
        mul,
        bias if bias is not None else mul,
        m,
        n,
        kw,
        kb,
        x2.stride(0),
        y.stride(0),
        wps,
        BN=cfg["BN"],
        BKW=bkw,
        USE_WS=split > 1,
        EVEN_K=even,
        DEQ=cfg.get("DEQ", 0),
        HAS_BIAS=bias is not None,
        MUL_ROWS=mul_rows,
        num_warps=cfg["num_warps"],
        num_stages=cfg.get("num_stages", 3),
    )
    if split > 1:
        _reduce(dst, y, bias, split)
    return y


def mm(x2, wp, ws, mul, bias=None, *, out=None, cfg=None):
    """Tensor-core kernel: dequantize [BN, BK] tiles in registers, tl.dot with fp32 accumulation."""
    m, n, k = _check(x2, wp, ws)
    x2, wp, s8 = _prep(x2, wp, ws)
    cfg = dict(cfg) if cfg is not None else mm_config(m, n, k, x2.device)
    bk = cfg["BK"]
    kps = triton.cdiv(triton.cdiv(k, cfg["SPLIT"]), bk) * bk
    split = triton.cdiv(k, kps)
    even = k % bk == 0
    y = _alloc_out(out, m, n, x2.dtype, x2.device)
    mul, mul_rows = _mul_arg(mul, n)
    dst = y if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]), split)
    _mm_kernel[grid](
        x2,
        wp,
        s8,
        dst,
        mul,
        bias if bias is not None else mul,
        m,
        n,
        k,
        x2.stride(0),
        y.stride(0),
        kps,
        BM=cfg["BM"],
        BN=cfg["BN"],
        BK=bk,
        USE_WS=split > 1,
        EVEN_K=even,
        HAS_BIAS=bias is not None,
        GROUP_M=cfg.get("GROUP_M", 8),
        ASM=cfg.get("ASM", not _INTERPRET),
        DOT_F32=_INTERPRET,
        MUL_ROWS=mul_rows,
        num_warps=cfg["num_warps"],
        num_stages=cfg.get("num_stages", 3),
    )
    if split > 1:
        _reduce(dst, y, bias, split)
    return y


# (BN, BK, num_warps) of the dequantize kernel, from benchmarks/bench_kernels.py --tune-dequant.
DEQUANT_CFG: tuple[int, int, int] = (16, 512, 4)


def dequantize_rows(wp, ws, mul, dtype, row0=0, rows=None, *, out=None, cfg=None):
    """Dense rows [row0, row0+rows) of W (value * scale * multiplier, one rounding to dtype)."""
    n, k2 = wp.shape
    k = k2 * 2
    rows = n - row0 if rows is None else rows
    wp = wp.contiguous()
    s8 = ws.contiguous().view(torch.uint8)
    if out is None:
        out = torch.empty((rows, k), dtype=dtype, device=wp.device)
    bn, bk, warps = cfg if cfg is not None else DEQUANT_CFG
    while bk > 32 and bk // 2 >= k:
        bk //= 2
    grid = (triton.cdiv(rows, bn), triton.cdiv(k, bk))
    mul, mul_rows = _mul_arg(mul, n)
    _dequant_kernel[grid](
        wp,
        s8,
        mul,
        out,
        row0,
        rows,
        n,
        k,
        BN=bn,
        BK=bk,
        ASM=not _INTERPRET,
        MUL_ROWS=mul_rows,
        num_warps=warps,
    )
    return out


def scratch_bytes_default() -> int:
    """Largest bf16 scratch the dequantize-then-cuBLAS path uses at once (settings.scratch_mb); bigger
    layers go in row chunks so no full dense copy of e.g. the lm_head is materialized."""
    return settings.current().scratch_mb << 20


def dequant_mm(x2, wp, ws, mul, bias=None, *, out=None, scratch_bytes=None):
    """Prefill path: dequantize W (in row chunks) into a bf16/fp16 scratch buffer, then cuBLAS.

    (A side stream dequantizing chunk i+1 while cuBLAS multiplied chunk i was tried and removed: its
    events and stream waits made a whole eager 8B forward at 2048 tokens 1.44x slower on the H100,
    99 ms against 68.8 ms; benchmarks/RESULTS-generation.md.)"""
    m, k = x2.shape
    n = wp.shape[0]
    if k % 16 or wp.shape != (n, k // 2) or ws.shape != (n, k // 16):
        raise ValueError(
            f"packed weight {tuple(wp.shape)} / scales {tuple(ws.shape)} do not match x [..., {k}]"
        )
    budget = scratch_bytes_default() if scratch_bytes is None else scratch_bytes

    def rows(r0: int, r: int, scratch: torch.Tensor) -> torch.Tensor:
        return dequantize_rows(wp, ws, mul, x2.dtype, r0, r, out=scratch)

    y = _alloc_out(out, m, n, x2.dtype, x2.device)
    return scratch_matmul(x2, n, rows, bias, budget, 128, y)


def scratch_matmul(x2, n, dequantize, bias, budget, align, y=None):
    """y [M, N] = x2 @ W.T (+ bias) for a weight only ``dequantize(r0, r, scratch)`` can produce (rows
    r0 .. r0+r into ``scratch`` [r, K], x2's dtype): W whole if it fits ``budget`` bytes, else chunks of
    a multiple of ``align`` rows, each multiplied by cuBLAS into its columns of y."""
    m, k = x2.shape
    dtype = x2.dtype
    esize = torch.finfo(dtype).bits // 8
    step = n if n * k * esize <= budget else max(align, budget // (k * esize) // align * align)
    y = torch.empty((m, n), dtype=dtype, device=x2.device) if y is None else y
    scratch = torch.empty((min(step, n), k), dtype=dtype, device=x2.device)
    for r0 in range(0, n, step):
        r = min(step, n - r0)
        wd = dequantize(r0, r, scratch[:r])
        if bias is not None:
            torch.addmm(bias[r0 : r0 + r].to(dtype), x2, wd.t(), out=y[:, r0 : r0 + r])
        else:
            torch.mm(x2, wd.t(), out=y[:, r0 : r0 + r])
    return y
