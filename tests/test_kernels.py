"""Correctness of every NVFP4 kernel against an independent float64 reference.

The reference below decodes E2M1 codes and e4m3 scales from their bit fields in float64 (it does not
use nvfp4_fix.codec). Inputs are fresh random draws for every case: random packed bytes (all 16 codes,
both nibbles), random positive and negative e4m3 scales over their whole range (subnormals included,
NaN excluded), a random per-tensor multiplier, random activations; never zeros.

Tolerance, relative Frobenius error ||y - ref|| / ||ref|| against the float64 result of the same
(already rounded) x: 1e-2 for bf16 outputs, 2e-3 for fp16, 1e-5 for fp32. Every output element must
be finite; kernels that take ``out=`` get a NaN-poisoned buffer and must overwrite all of it.

On a machine without CUDA the Triton kernels run through the Triton interpreter (TRITON_INTERPRET=1,
set below before triton is imported; skipped when triton is not installed) on small shapes; the
full-size cases are marked ``gpu`` and run on a CUDA machine: ``pytest tests/test_kernels.py``.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if not HAS_CUDA and HAS_TRITON:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nvfp4_fix.kernels as K  # noqa: E402
from nvfp4_fix import settings  # noqa: E402
from nvfp4_fix.kernels import cpu as kcpu  # noqa: E402

if HAS_TRITON:
    from nvfp4_fix.kernels import triton_ops as T  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
interp_only = pytest.mark.skipif(HAS_CUDA, reason="interpreter variant; the gpu tests cover this on CUDA")

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


# ----------------------------------------------------------------------------- independent reference
def _e2m1_f64(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.int64)
    sign = 1.0 - 2.0 * ((c >> 3) & 1).to(torch.float64)
    e = ((c >> 1) & 3).to(torch.float64)
    m = (c & 1).to(torch.float64)
    mag = torch.where(e == 0, 0.5 * m, torch.pow(2.0, e - 1) * (1.0 + 0.5 * m))
    return sign * mag


def _e4m3_f64(bits: torch.Tensor) -> torch.Tensor:
    b = bits.to(torch.int64)
    sign = 1.0 - 2.0 * ((b >> 7) & 1).to(torch.float64)
    e = ((b >> 3) & 15).to(torch.float64)
    m = (b & 7).to(torch.float64)
    mag = torch.where(e == 0, m / 8.0 * 2.0**-6, torch.pow(2.0, e - 7) * (1.0 + m / 8.0))
    return sign * mag


def ref_weight_f64(wp: torch.Tensor, ws: torch.Tensor, mul: torch.Tensor) -> torch.Tensor:
    """float64 W [N, K] on wp's device (float64 math on the GPU too: exact enough and fast)."""
    n, k2 = wp.shape
    codes = torch.empty((n, 2 * k2), dtype=torch.int64, device=wp.device)
    codes[:, 0::2] = (wp & 15).to(torch.int64)  # low nibble = even column
    codes[:, 1::2] = (wp >> 4).to(torch.int64)
    scale = _e4m3_f64(ws.view(torch.uint8)).repeat_interleave(16, dim=1)
    return _e2m1_f64(codes) * scale * mul.to(wp.device).double()


def ref_linear_f64(x, wp, ws, mul, bias=None):
    y = x.double() @ ref_weight_f64(wp, ws, mul).t()
    if bias is not None:
        y = y + bias.double()
    return y


def make_weight(n: int, k: int, device="cpu", seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    wp = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    # positive and negative e4m3 scales over the whole range, subnormals included, never NaN (0x7F)
    sb = torch.randint(0, 0x7F, (n, k // 16), dtype=torch.uint8, generator=g)
    neg = torch.rand((n, k // 16), generator=g) < 0.1
    sb = torch.where(neg, sb | 0x80, sb)
    ws = sb.view(torch.float8_e4m3fn)
    mul = torch.tensor(1.0 / 2688.0 * (0.5 + torch.rand((), generator=g).item()), dtype=torch.float32)
    return wp.to(device), ws.to(device), mul.to(device)


def make_x(m: int, k: int, dtype, device="cpu"):
    x = torch.randn(m, k, dtype=torch.float32) + 0.1  # never zero-mean-exact, never zeros
    return x.to(dtype).to(device)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double().to(ref.device) - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(y, ref, dtype, what=""):
    assert y.dtype == dtype, what
    assert torch.isfinite(y).all(), f"{what}: non-finite output (unwritten or overflow)"
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"{what}: relative error {err:.3e} >= {TOL[dtype]}"
    return err


@pytest.fixture(autouse=True)
def _eager_cpu_by_default(request):
    """torch.compile costs ~20 s per first compile on a 2-core CI machine: the CPU paths run eagerly
    (same math) except in test_cpu_compiled_paths."""
    if not request.node.name.startswith("test_cpu_compiled"):
        with settings.override(cpu_compile=False):
            yield
    else:
        yield


# ----------------------------------------------------------------------------- reference sanity
def test_independent_reference_matches_codec():
    """The test's float64 decoding agrees with the package's own codec (both are checked elsewhere)."""
    from nvfp4_fix.codec import dequantize

    wp, ws, mul = make_weight(33, 48)
    ours = ref_weight_f64(wp, ws, mul)
    theirs = dequantize(wp, ws, mul, "multiplier", torch.float32)
    assert torch.allclose(ours, theirs.double(), rtol=1e-6, atol=0)


def test_e2m1_table_exact():
    vals = _e2m1_f64(torch.arange(16))
    assert vals.tolist() == [
        0.0,
        0.5,
        1.0,
        1.5,
        2.0,
        3.0,
        4.0,
        6.0,
        -0.0,
        -0.5,
        -1.0,
        -1.5,
        -2.0,
        -3.0,
        -4.0,
        -6.0,
    ]


# ----------------------------------------------------------------------------- CPU paths
CPU_SHAPES = [(97, 16), (33, 48), (97, 272), (64, 4096 + 16)]


@pytest.mark.parametrize("n,k", CPU_SHAPES)
@pytest.mark.parametrize("m", [1, 2, 7, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_chunked(n, k, m, dtype):
    wp, ws, mul = make_weight(n, k)
    x = make_x(m, k, dtype)
    bias = torch.randn(n).to(dtype) if m == 7 else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    y = kcpu.linear_chunked(x, wp, ws, mul, bias, out=out, chunk_bytes=k * 4 * 16)  # 16-row chunks
    assert y is out
    check(y, ref_linear_f64(x, wp, ws, mul, bias), dtype, "chunked")


@pytest.mark.parametrize("n,k", [(97, 16), (33, 272), (64, 4096 + 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_gemv(n, k, dtype):
    wp, ws, mul = make_weight(n, k)
    x = make_x(1, k, dtype)
    bias = torch.randn(n).to(dtype)
    check(kcpu.gemv_compiled(x, wp, ws, mul, bias), ref_linear_f64(x, wp, ws, mul, bias), dtype, "cpu_gemv")


def test_cpu_compiled_paths():
    """The torch.compile'd GEMV and chunk dequantization (dynamic shapes: one compile each), forced on
    for these small layers."""
    for n, k in [(97, 272), (64, 4096 + 16)]:
        wp, ws, mul = make_weight(n, k)
        with settings.override(cpu_compile_min_weights=1):
            x = make_x(1, k, torch.bfloat16)
            check(kcpu.gemv_compiled(x, wp, ws, mul), ref_linear_f64(x, wp, ws, mul), torch.bfloat16, "gemv")
            x = make_x(5, k, torch.float16)
            y = kcpu.linear_chunked(x, wp, ws, mul, chunk_bytes=k * 4 * 32)
            check(y, ref_linear_f64(x, wp, ws, mul), torch.float16, "chunked")


def test_cpu_compiles_only_layers_where_it_pays(monkeypatch):
    """Layers under settings.cpu_compile_min_weights run eagerly (the same values), larger ones compiled."""
    compiled_calls = []
    real = kcpu._compiled_gemv

    def counted():
        compiled_calls.append(1)
        return real()

    monkeypatch.setattr(kcpu, "_compiled_gemv", counted)
    wp, ws, mul = make_weight(97, 272)
    x = make_x(1, 272, torch.bfloat16)
    with settings.override(cpu_compile=True):
        small = kcpu.gemv_compiled(x, wp, ws, mul)
    assert compiled_calls == []
    with settings.override(cpu_compile=True, cpu_compile_min_weights=97 * 272):
        at_threshold = kcpu.gemv_compiled(x, wp, ws, mul)
    assert compiled_calls == [1]
    check(small, ref_linear_f64(x, wp, ws, mul), torch.bfloat16, "eager gemv")
    check(at_threshold, ref_linear_f64(x, wp, ws, mul), torch.bfloat16, "compiled gemv")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantize_weight(dtype):
    wp, ws, mul = make_weight(97, 272)
    w = K.dequantize_weight(wp, ws, mul, dtype)
    ref = ref_weight_f64(wp, ws, mul)
    assert w.shape == ref.shape and w.dtype == dtype
    # one rounding of the exact value to dtype
    eps = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-23}[dtype]
    atol = 2.0**-25 if dtype == torch.float16 else 1e-45  # fp16 subnormal spacing / 2
    assert torch.all((w.double() - ref).abs() <= eps * ref.abs() + atol)


@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dispatch_cpu(m, dtype):
    wp, ws, mul = make_weight(97, 272)
    x = make_x(m, 272, dtype).view(1, m, 272)
    bias = torch.randn(97).to(dtype)
    y = K.nvfp4_linear(x, wp, ws, mul, bias)
    assert y.shape == (1, m, 97)
    check(y.reshape(-1, 97), ref_linear_f64(x.reshape(-1, 272), wp, ws, mul, bias), dtype, "auto")
    assert K.select_kernel(x.reshape(-1, 272), 97, 272) == ("cpu_gemv" if m == 1 else "chunked")


def test_dispatch_reference_forced(monkeypatch):
    calls = []
    real = K.linear_reference

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(K, "linear_reference", spy)
    wp, ws, mul = make_weight(33, 48)
    x = make_x(1, 48, torch.bfloat16)
    with settings.override(kernel="reference"):
        y = K.nvfp4_linear(x, wp, ws, mul)
    assert calls, "settings kernel='reference' did not reach the reference path"
    check(y, ref_linear_f64(x, wp, ws, mul), torch.bfloat16, "reference")
    calls.clear()
    K.nvfp4_linear(x, wp, ws, mul, kernel="reference")
    assert calls


def test_errors():
    wp, ws, mul = make_weight(33, 48)
    with pytest.raises(ValueError, match="multiple of 16|holds"):
        K.nvfp4_linear(make_x(1, 40, torch.bfloat16), wp[:, :20], ws[:, :2], mul)
    with pytest.raises(ValueError, match="unknown"):
        K.nvfp4_linear(make_x(1, 48, torch.bfloat16), wp, ws, mul, kernel="nope")
    if HAS_TRITON:
        with pytest.raises(ValueError, match="multiple of 16"):
            T.gemv(make_x(1, 40, torch.bfloat16), torch.zeros(3, 20, dtype=torch.uint8), ws[:3, :2], mul)


def test_custom_op_compiles_cpu():
    wp, ws, mul = make_weight(33, 48)
    x = make_x(4, 48, torch.bfloat16)
    f = torch.compile(lambda t: K.nvfp4_linear(t, wp, ws, mul) * 2.0, fullgraph=True, backend="eager")
    check(f(x) / 2, ref_linear_f64(x, wp, ws, mul), torch.bfloat16, "compiled op")
    torch.library.opcheck(
        torch.ops.nvfp4_fix.linear.default, (x, wp, ws.view(torch.uint8), mul, None, "chunked")
    )


# ----------------------------------------------------------------------------- Triton, interpreter
INTERP_CASES = [  # (m, n, k)
    (1, 97, 16),
    (1, 33, 48),
    (2, 97, 272),
    (7, 33, 272),
    (16, 97, 48),
    (17, 33, 272),
    (1, 64, 4096 + 16),
]


def _poisoned(m, n, dtype, device):
    return torch.full((m, n), float("nan"), dtype=dtype, device=device)


def _run_all_triton(m, n, k, dtype, device, with_bias, extra_cfgs=True):
    wp, ws, mul = make_weight(n, k, device)
    x = make_x(m, k, dtype, device)
    bias = torch.randn(n).to(dtype).to(device) if with_bias else None
    ref = ref_linear_f64(x, wp, ws, mul, bias)
    runs = [("mm", T.mm, None), ("dequant_mm", T.dequant_mm, None)]
    if m <= 4:
        runs.append(("gemv", T.gemv, None))
        if extra_cfgs:
            runs.append(("gemv_deq1", T.gemv, {**T.gemv_config(n, k, x.device), "DEQ": 1}))
            runs.append(("gemv_split", T.gemv, {"BN": 16, "BKW": 4, "SPLIT": 3, "num_warps": 4, "DEQ": 0}))
        if device == "cuda":  # packed-PTX decode (GPU only)
            runs.append(("gemv_deq2", T.gemv, {**T.gemv_config(n, k, x.device), "DEQ": 2}))
            runs.append(
                ("gemv_deq2_split", T.gemv, {"BN": 8, "BKW": 4, "SPLIT": 3, "num_warps": 4, "DEQ": 2})
            )
    if extra_cfgs and k <= 512:
        runs.append(("mm_split", T.mm, {"BM": 16, "BN": 32, "BK": 32, "SPLIT": 3, "num_warps": 4}))
    if device == "cuda" and m in (1, 17, 128):  # the plain-Triton dequantization too (the GPU default is PTX)
        runs.append(("mm_noasm", T.mm, {**T.mm_config(m, n, k, x.device), "ASM": False}))
    for name, fn, cfg in runs:
        out = _poisoned(m, n, dtype, device)
        kw = {"out": out}
        if cfg is not None:
            kw["cfg"] = cfg
        y = fn(x, wp, ws, mul, bias, **kw)
        assert y is out
        check(y, ref, dtype, f"{name} m={m} n={n} k={k} {dtype}")


@needs_triton
@interp_only
@pytest.mark.parametrize("m,n,k", INTERP_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_interpreter(m, n, k, dtype):
    _run_all_triton(m, n, k, dtype, "cpu", with_bias=(m % 2 == 1), extra_cfgs=(k <= 512))


@needs_triton
@interp_only
def test_triton_interpreter_dequant_chunks():
    wp, ws, mul = make_weight(97, 48)
    x = make_x(5, 48, torch.bfloat16)
    y = T.dequant_mm(x, wp, ws, mul, scratch_bytes=48 * 2 * 128)  # 128-row chunks: 97 rows -> 1 chunk
    check(y, ref_linear_f64(x, wp, ws, mul), torch.bfloat16, "dequant_mm")
    w = T.dequantize_rows(wp, ws, mul, torch.float32, 5, 40)
    assert torch.allclose(w.double(), ref_weight_f64(wp, ws, mul)[5:45], rtol=1e-7, atol=0)


def _per_row_case(m, n, k, device, dtype=torch.bfloat16):
    """A weight with one multiplier per output row (a fused q/k/v or gate/up group) and its float64
    reference: each row's own product times its multiplier."""
    wp, ws, _ = make_weight(n, k, device, seed=n + k + m)
    g = torch.Generator().manual_seed(m)
    rows = (torch.rand(n, generator=g) + 0.5).div(2688.0).to(torch.float32).to(device)
    x = make_x(m, k, dtype, device)
    bias = torch.randn(n, generator=g).to(dtype).to(device)
    ref = ref_linear_f64(x.cpu(), wp.cpu(), ws.cpu(), torch.tensor(1.0))
    ref = ref * rows.double().cpu()[None, :] + bias.double().cpu()
    return x, wp, ws, rows, bias, ref


def _check_per_row(m, n, k, device):
    x, wp, ws, rows, bias, ref = _per_row_case(m, n, k, device)
    for name, fn in (("gemv", T.gemv), ("mm", T.mm), ("dequant_mm", T.dequant_mm)):
        if name == "gemv" and m > 4:
            continue
        check(fn(x, wp, ws, rows, bias), ref, torch.bfloat16, f"{name} per-row multipliers m={m}")
    # row chunks of the dequantize pass index the multipliers by absolute row
    y = T.dequant_mm(x, wp, ws, rows, bias, scratch_bytes=k * 2 * 128)
    check(y, ref, torch.bfloat16, "dequant_mm in row chunks, per-row multipliers")
    with pytest.raises(ValueError, match="expected 1 or N"):
        T.mm(x, wp, ws, rows[:-1])


@needs_triton
@interp_only
@pytest.mark.parametrize("m", [1, 5])
def test_triton_interpreter_per_row_multipliers(m):
    _check_per_row(m, 300, 64, "cpu")


# ----------------------------------------------------------------------------- Triton, CUDA
GPU_NK = [(97, 16), (4097, 48), (97, 272), (4096, 4096 + 16), (4097, 14336), (1024, 4096)]
GPU_M = [1, 2, 7, 16, 17, 128, 1000]


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("m", [1, 3, 17, 300])
def test_triton_gpu_per_row_multipliers(m):
    _check_per_row(m, 4097, 4096 + 16, "cuda")


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("n,k", GPU_NK)
@pytest.mark.parametrize("m", GPU_M)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_gpu(m, n, k, dtype):
    _run_all_triton(m, n, k, dtype, "cuda", with_bias=(m % 2 == 1), extra_cfgs=(m <= 2 and k <= 4112))


# ----------------------------------------------------------------------------- CUDA mma (NVRTC)
MMA_NK = [(16, 128), (97, 384), (4097, 4096), (6144, 4096), (4096, 14336), (1000, 1152)]


@gpu
@needs_cuda
@pytest.mark.parametrize("n,k", MMA_NK)
@pytest.mark.parametrize("m", [1, 2, 7, 8, 9, 16, 17, 33, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_mma_gpu(m, n, k, dtype):
    from nvfp4_fix.kernels import cuda_mma

    wp, ws, mul = make_weight(n, k, "cuda")
    x = make_x(m, k, dtype, "cuda")
    bias = torch.randn(n).to(dtype).cuda() if m % 2 else None
    ref = ref_linear_f64(x, wp, ws, mul, bias)
    for warps in (1, 3, 8, None):
        out = _poisoned(m, n, dtype, "cuda")
        y = cuda_mma.linear(x, wp, ws, mul, bias, warps=warps, out=out)
        assert y is out
        check(y, ref, dtype, f"cuda_mma warps={warps} m={m} n={n} k={k} {dtype}")
    # per-row multipliers (fused q/k/v, gate/up)
    row_mul = mul * (torch.rand(n, device="cuda") + 0.5)
    y = cuda_mma.linear(x, wp, ws, row_mul, bias)
    check(y, ref_linear_f64(x, wp, ws, row_mul[:, None], bias), dtype, "cuda_mma per-row mul")
    assert (K.select_kernel(x, n, k) == "cuda_mma") == (m <= cuda_mma.MAX_M)


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [9, 16, 24, 32, 40, 64])
@pytest.mark.parametrize(
    "rt,depth,xpre,minb,wn",
    [
        (1, 1, 0, 1, 1),
        (1, 3, 0, 2, 1),
        (2, 2, 0, 1, 1),
        (2, 1, 1, 1, 1),
        (4, 1, 0, 1, 1),
        (2, 1, 0, 2, 2),
        (2, 2, 0, 1, 4),
        (4, 1, 0, 1, 2),
    ],
)
def test_cuda_mma_variants_gpu(m, rt, depth, xpre, minb, wn):
    """Every compile variant the tuning may pick, at 9..64 token rows: row tiles per warp (RT, with
    the shared-memory reduction of NT * RT > 8), load depth, activations ahead or when used, warps
    side by side over N (WN) with the other warps splitting K."""
    from nvfp4_fix.kernels import cuda_mma

    variant = {"RT": rt, "DEPTH": depth, "XPRE": xpre, "MINB": minb, "LOADONLY": 0, "WN": wn}
    for n, k in [(4097, 4096), (1000, 1152)]:
        wp, ws, mul = make_weight(n, k, "cuda")
        row_mul = mul * (torch.rand(n, device="cuda") + 0.5)
        for dtype in (torch.bfloat16, torch.float16):
            x = make_x(m, k, dtype, "cuda")
            ref = ref_linear_f64(x, wp, ws, row_mul[:, None])
            for warps in (3 if wn == 1 else wn, 8):
                out = _poisoned(m, n, dtype, "cuda")
                y = cuda_mma.linear(x, wp, ws, row_mul, warps=warps, out=out, variant=variant)
                check(y, ref, dtype, f"cuda_mma {variant} warps={warps} m={m} n={n} k={k} {dtype}")


def test_cuda_mma_refuses_an_out_it_cannot_write():
    """``out`` is written with row stride only: a column-strided, wrongly shaped or typed buffer is an
    error before any launch (checked on the CPU)."""
    from nvfp4_fix.kernels import cuda_mma

    wp, ws, mul = make_weight(32, 128)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    for out in (
        torch.empty(32, 2, dtype=torch.bfloat16).T,  # [2, 32], column stride 2
        torch.empty(2, 16, dtype=torch.bfloat16),
        torch.empty(2, 32, dtype=torch.float16),
    ):
        with pytest.raises(
            ValueError, match="out must be \\[2, 32\\] torch.bfloat16 with unit column stride"
        ):
            cuda_mma.linear(x, wp, ws, mul, out=out)


@gpu
@needs_cuda
def test_cuda_mma_subnormal_scales_and_extremes():
    """e4m3 subnormal block scales, the largest scale and every code, exactly."""
    from nvfp4_fix.kernels import cuda_mma

    n, k = 64, 256
    g = torch.Generator().manual_seed(5)
    wp = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    sb = torch.randint(1, 8, (n, k // 16), dtype=torch.uint8, generator=g)  # subnormal e4m3
    sb[::2] = torch.randint(0x70, 0x7F, (n // 2, k // 16), dtype=torch.uint8, generator=g)  # up to 448
    ws = sb.view(torch.float8_e4m3fn)
    mul = torch.tensor(3.0e-3)
    for dtype in (torch.bfloat16, torch.float16):
        x = make_x(3, k, dtype)
        ref = ref_linear_f64(x, wp, ws, mul)
        y = cuda_mma.linear(x.cuda(), wp.cuda(), ws.cuda(), mul.cuda())
        check(y.cpu(), ref, dtype, f"cuda_mma extremes {dtype}")


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("n,k", [(97, 272), (4097, 4096), (128256 // 8, 4096)])
@pytest.mark.parametrize("m", [1, 3, 16, 64, 300])
def test_dispatch_gpu(m, n, k):
    wp, ws, mul = make_weight(n, k, "cuda")
    x = make_x(m, k, torch.bfloat16, "cuda")
    y = K.nvfp4_linear(x, wp, ws, mul)
    check(y, ref_linear_f64(x, wp, ws, mul), torch.bfloat16, f"auto {K.select_kernel(x, n, k)}")
    xf = make_x(m, k, torch.float32, "cuda")
    check(K.nvfp4_linear(xf, wp, ws, mul), ref_linear_f64(xf, wp, ws, mul), torch.float32, "auto fp32")


@gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("m", [1, 4, 200, 600])
def test_gpu_no_sync_graph_and_compile(m):
    n, k = (4097, 4096) if m < 600 else (8193, 4096)  # 600: dequant_mm on a larger weight
    wp, ws, mul = make_weight(n, k, "cuda")
    bias = torch.randn(n, device="cuda").bfloat16()
    x = make_x(m, k, torch.bfloat16, "cuda")
    ref = ref_linear_f64(x, wp, ws, mul, bias)
    K.nvfp4_linear(x, wp, ws, mul, bias)  # warm up (compiles the Triton kernels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = K.nvfp4_linear(x, wp, ws, mul, bias)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(y, ref, torch.bfloat16, "no-sync")
    # CUDA graph capture and replay on new data
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        K.nvfp4_linear(x, wp, ws, mul, bias)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = K.nvfp4_linear(x, wp, ws, mul, bias)
    x.copy_(make_x(m, k, torch.bfloat16, "cuda"))
    g.replay()
    torch.cuda.synchronize()
    check(yg, ref_linear_f64(x, wp, ws, mul, bias), torch.bfloat16, "graph replay")
    f = torch.compile(lambda t: K.nvfp4_linear(t, wp, ws, mul, bias), fullgraph=True)
    check(f(x), ref_linear_f64(x, wp, ws, mul, bias), torch.bfloat16, "torch.compile")


@gpu
@needs_cuda
def test_blackwell_fp4():
    from nvfp4_fix.kernels import blackwell

    if not blackwell.available(torch.device("cuda")):
        pytest.skip("needs compute capability >= 10.0 and torch.float4_e2m1fn_x2")
    n, k, m = 4097, 4096, 33
    wp, ws, mul = make_weight(n, k, "cuda")
    ws = (ws.view(torch.uint8) & 0x7F).view(torch.float8_e4m3fn)  # cuBLAS block scales: positive
    x = make_x(m, k, torch.bfloat16, "cuda")
    in_mul = torch.tensor(x.float().abs().max().item() / (6 * 448), device="cuda")
    xq, xs = blackwell.quantize_activations(x, in_mul)
    xd = ref_weight_f64(xq, xs, in_mul)  # the fp4 activations, exactly
    ref = xd @ ref_weight_f64(wp, ws, mul).t()
    y = K.nvfp4_linear(x, wp, ws, mul, input_mul=in_mul)
    check(y, ref, torch.bfloat16, "blackwell fp4")


def test_tolerance_is_meaningful():
    """A wrong nibble order must fail the tolerance: guards against a vacuous check."""
    wp, ws, mul = make_weight(97, 272)
    x = make_x(3, 272, torch.bfloat16)
    swapped = ((wp & 15) << 4) | (wp >> 4)
    y = kcpu.linear_chunked(x, swapped, ws, mul)
    assert rel_err(y, ref_linear_f64(x, wp, ws, mul)) > 0.5
    assert math.isfinite(rel_err(y, ref_linear_f64(x, wp, ws, mul)))
