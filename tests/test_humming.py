"""Humming as an optional backend: the dispatch table, the fallbacks (missing, broken import, refused,
compile failure) and, on a CUDA card with humming-kernels installed, its results against a float64
reference, CUDA-graph capture and torch.compile."""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import nvfp4_fix.kernels as K
from nvfp4_fix import settings
from nvfp4_fix.codec import E2M1_VALUES
from nvfp4_fix.kernels import humming as H
from nvfp4_fix.kernels import table as T

CUDA = torch.cuda.is_available()
HAS_HUMMING = importlib.util.find_spec("humming") is not None


def make_weight(n: int, k: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    wp = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g)
    ws = (torch.rand((n, k // 16), generator=g) * 2 + 0.05).to(torch.float8_e4m3fn)
    mul = torch.tensor(0.37, dtype=torch.float32)
    return wp.to(device), ws.to(device), mul.to(device)


def ref_f64(x, wp, ws, mul):
    """Independent float64 decoding: low nibble first, e2m1 * e4m3 block scale * multiplier."""
    tab = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    b = wp.cpu().long()
    codes = torch.stack((b & 15, b >> 4), dim=-1).reshape(wp.shape[0], -1)
    w = tab[codes] * ws.cpu().to(torch.float64).repeat_interleave(16, dim=1) * float(mul)
    return x.cpu().to(torch.float64) @ w.T


def rel_err(y, ref):
    return float((y.cpu().double() - ref).norm() / ref.norm())


# ------------------------------------------------------------------------------------- the table
def test_table_rows():
    """The H100 rows of benchmarks/RESULTS-kernels-humming.md: ours for decode on all but the largest
    layers (to M = 16 on q/k/v and o, 8 on the 8B down and 70B o), Humming above, ours again for large
    M; ours at every M on the experts."""
    assert T.shape_class(2048, 768) == "tiny" and T.shape_class(6144, 4096) == "small"
    assert T.shape_class(4096, 14336) == "medium" and T.shape_class(28672, 4096) == "large"
    assert T.shape_class(10240, 8192) == "big" and T.shape_class(8192, 8192) == "medium"
    h100 = (9, 0)
    assert T.backend_for(h100, 1, 6144, 4096) == "nvfp4"
    assert T.backend_for(h100, 1, 28672, 4096) == "humming"
    assert T.backend_for(h100, 8, 4096, 14336) == "nvfp4"
    assert T.backend_for(h100, 9, 4096, 14336) == "humming"
    assert T.backend_for(h100, 16, 6144, 4096) == "nvfp4"
    assert T.backend_for(h100, 17, 6144, 4096) == "humming"
    for m in (1, 32, 64, 65, 128, 129, 1024):  # the experts: ours at every M
        assert T.backend_for(h100, m, 1536, 2048) == T.backend_for(h100, m, 2048, 768) == "nvfp4", m
    assert T.backend_for(h100, 512, 4096, 4096) == "humming"
    assert T.backend_for(h100, 1024, 4096, 4096) == "nvfp4"
    assert T.backend_for(h100, 1024, 4096, 14336) == "humming"
    assert T.backend_for(h100, 1025, 4096, 14336) == "nvfp4"
    assert T.backend_for(h100, 2048, 57344, 8192) == "humming"
    # 70B q/k/v: ours at M = 1 (0.90x Humming's time), Humming from M = 2
    assert T.backend_for(h100, 1, 10240, 8192) == "nvfp4"
    assert T.backend_for(h100, 2, 10240, 8192) == T.backend_for(h100, 2048, 10240, 8192) == "humming"
    assert T.backend_for(h100, 2049, 10240, 8192) == "nvfp4"
    assert T.backend_for(h100, 4096, 57344, 8192) == "nvfp4"
    for cc in ((7, 5), (8, 0), (8, 9), (10, 0), (12, 0)):  # unmeasured cards: our kernels
        assert T.backend_for(cc, 128, 4096, 4096) == "nvfp4", cc
    for row in T.TABLE:
        assert row.m_min <= row.m_max and row.cc_min <= row.cc_max and row.backend in ("nvfp4", "humming")
    assert len(T.humming_ranges(h100)) == sum(r.backend == "humming" for r in T.TABLE)


def test_table_has_no_holes_on_the_h100():
    """Every M from 1 to 8192 and every shape class hit an explicit row on sm_90."""
    for n, k in ((2048, 768), (4096, 4096), (4096, 14336), (10240, 8192), (28672, 4096)):
        cls = T.shape_class(n, k)
        for m in range(1, 8193):
            assert any(
                r.cc_min <= (9, 0) <= r.cc_max and r.m_min <= m <= r.m_max and r.shape in (None, cls)
                for r in T.TABLE
            ), (m, cls)


# ------------------------------------------------------------------------------ shapes, on CPU
def test_shapes_humming_cannot_run_are_refused_with_the_reason():
    """N not a multiple of 8: Humming pads N to a multiple of 128 and its kernels need the padding
    rows in multiples of 8 (333 -> 384 pads 51 rows: its build raised a bare AssertionError on an
    H200). The refusal names the shape, the padding and the rule."""
    assert H.padded_shape(333, 2064) == (384, 2176)
    assert H.shape_refusal(333, 2064) == (
        "N = 333 is not a multiple of 8: Humming pads N to 384 and needs the 51 padding rows to be a"
        " multiple of 8"
    )
    assert H.shape_refusal(33, 48) is not None and H.shape_refusal(4100, 4096) is not None
    assert H.shape_refusal(1000, 40) == "K = 40 is not a multiple of 16 (one NVFP4 scale block)"
    for n, k in ((1000, 1520), (336, 2064), (2880, 2880), (4096, 4096), (8, 16), (128256, 4096)):
        assert H.shape_refusal(n, k) is None, (n, k)


def test_padding_meets_hummings_shape_rules():
    """What humming-kernels 0.1.20 checks before compiling (``HummingKernel.check_shape`` and its sm_90
    tile seeds), for every N a multiple of 8 and K a multiple of 16 up to 4096: padded N and K whole
    multiples of 128 (its smallest sm_90 N tile; K tiles of 32-128 divide them), the padding a
    multiple of 8 and smaller than the padded size; N, K already multiples of 128 are not padded."""
    for n in range(8, 4097, 8):
        for k in (16, 48, 128, 1520, 2064, 2880, 4096):
            pn, pk = H.padded_shape(n, k)
            assert H.shape_refusal(n, k) is None
            assert pn % 128 == 0 and pk % 128 == 0 and pn >= n and pk >= k
            assert (pn - n) % 8 == 0 and (pk - k) % 8 == 0
            assert pn - n < 128 and pk - k < 128
    for k in range(16, 4097, 16):
        assert H.padded_shape(256, k)[1] - k < 128 and H.shape_refusal(256, k) is None
    assert H.padded_shape(4096, 14336) == (4096, 14336)
    assert H.padded_shape(2880, 2064) == (2944, 2176)  # an odd multiple of 64: padded to 128, not 64
    assert all(H.shape_refusal(n, 4096) is not None for n in range(1, 4097) if n % 8)


# ------------------------------------------------------------------------------ fallbacks on CPU
@pytest.mark.skipif(HAS_HUMMING, reason="checks the behaviour without humming-kernels")
def test_missing_humming_is_reported_and_forced_kernel_errors():
    reason = H.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "humming-kernels is not installed" in reason
    wp, ws, mul = make_weight(33, 48)
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    with pytest.raises(
        RuntimeError, match=r"kernel 'humming' cannot run this 33x48 weight: humming-kernels is"
    ):
        K.nvfp4_linear(x, wp, ws, mul, kernel="humming")
    with settings.override(kernel="humming"), pytest.raises(RuntimeError, match="humming-kernels is not"):
        K.nvfp4_linear(x, wp, ws, mul)


def test_auto_with_humming_on_keeps_cpu_kernels_correct():
    wp, ws, mul = make_weight(33, 48, seed=1)
    x = torch.randn(3, 48, dtype=torch.float32)
    with settings.override(humming=True, cpu_compile=False):
        assert K.select_kernel(x, 33, 48) == "chunked"
        y = K.nvfp4_linear(x, wp, ws, mul)
    assert rel_err(y, ref_f64(x, wp, ws, mul)) < 1e-6


def test_failed_plan_is_cached_per_weight_and_dropped_with_it(caplog):
    wp, ws, mul = make_weight(64, 64, seed=2)
    with caplog.at_level(logging.WARNING, logger="nvfp4_fix.kernels"):
        first = H.plan_for(wp, ws, mul, torch.bfloat16)
        second = H.plan_for(wp, ws, mul, torch.bfloat16)
    assert isinstance(first, str) and first == second
    assert sum("Humming cannot run a 64x64 weight" in r.message for r in caplog.records) == 1  # logged once
    key = (wp.device, wp.data_ptr(), tuple(wp.shape), tuple(wp.stride()), torch.bfloat16)
    assert key in H._entries
    del wp
    gc.collect()
    assert key not in H._entries  # a freed weight's address can never match a later weight


def test_broken_humming_install_falls_back(tmp_path):
    """A humming package whose import raises (as one built for another CUDA does) is reported, and
    auto keeps running our kernels with the right result."""
    pkg = tmp_path / "humming"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise OSError('libcuda.so.1: cannot open shared object file')\n")
    code = textwrap.dedent(
        """
        import torch
        from nvfp4_fix import settings
        from nvfp4_fix.kernels import humming as H
        import nvfp4_fix.kernels as K
        print(H.unavailable_reason(torch.device("cpu")))
        wp = torch.randint(0, 256, (8, 16), dtype=torch.uint8)
        ws = torch.ones((8, 2)).to(torch.float8_e4m3fn)
        with settings.override(humming=True, cpu_compile=False):
            y = K.nvfp4_linear(torch.ones(2, 32), wp, ws, torch.tensor(1.0))
        print(tuple(y.shape))
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert (
        lines[0] == "humming-kernels failed to import: OSError: libcuda.so.1: cannot open shared object file"
    )
    assert lines[1] == "(2, 8)"


# ------------------------------------------------------------------------------ on a CUDA card
needs_humming = pytest.mark.skipif(not (CUDA and HAS_HUMMING), reason="needs CUDA and humming-kernels")


@pytest.mark.gpu
@needs_humming
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m, n, k", [(1, 4096, 4096), (16, 28672, 4096), (77, 1000, 1520), (300, 2880, 2064)])
def test_gpu_humming_matches_reference(m, n, k, dtype):
    """N and K that Humming pads (1000 x 1520 -> 1024 x 1536; 2880 x 2064 -> 2944 x 2176: N an odd
    multiple of 64, K not a multiple of 128); memory poisoned with NaN first so an unwritten output
    shows. (The other shapes are ones bench_humming.py compiles, so Humming's disk cache serves them
    in benchmarks/device_humming.sh.)"""
    wp, ws, mul = make_weight(n, k, seed=m, device="cuda")
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    poison = torch.full((64 << 20,), float("nan"), dtype=dtype, device="cuda")
    del poison
    y = K.nvfp4_linear(x, wp, ws, mul, kernel="humming")
    assert torch.isfinite(y).all()
    assert rel_err(y, ref_f64(x, wp, ws, mul)) < 1e-2


@pytest.mark.gpu
@needs_humming
def test_gpu_shape_humming_cannot_run(caplog):
    """333 x 2064 (N not a multiple of 8): the forced kernel raises the refusal without calling
    Humming, auto with Humming on takes our kernels (one log line) and matches the reference, and
    Humming's own build does fail on it (so the refusal is not stricter than Humming)."""
    n, k, m = 333, 2064, 64
    wp, ws, mul = make_weight(n, k, seed=5, device="cuda")
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    reason = H.shape_refusal(n, k)
    assert reason is not None
    with pytest.raises(
        RuntimeError, match=r"kernel 'humming' cannot run this 333x2064 weight: N = 333 is not"
    ):
        K.nvfp4_linear(x, wp, ws, mul, kernel="humming")
    with settings.override(humming=True), caplog.at_level(logging.WARNING, logger="nvfp4_fix.kernels"):
        assert K.select_kernel(x, n, k) == "triton_mm"
        y = K.nvfp4_linear(x, wp, ws, mul)
        y2 = K.nvfp4_linear(x, wp, ws, mul)
    ref = ref_f64(x, wp, ws, mul)
    assert rel_err(y, ref) < 1e-2 and rel_err(y2, ref) < 1e-2
    assert sum(H.fallback_line(n, k, reason) in r.message for r in caplog.records) <= 1
    assert any(H.fallback_line(n, k, reason) in line for line in H._logged)
    with pytest.raises(AssertionError):  # humming-kernels 0.1.20: HummingKernel.check_shape
        H.build(wp, ws, mul, torch.bfloat16)


@pytest.mark.gpu
@needs_humming
def test_gpu_humming_in_cuda_graph_and_compile():
    wp, ws, mul = make_weight(4096, 4096, device="cuda")
    x = torch.randn(32, 4096, dtype=torch.bfloat16, device="cuda")
    ref = ref_f64(x, wp, ws, mul)
    with settings.override(humming=True):
        assert K.select_kernel(x, 4096, 4096) == "humming"
        y0 = K.nvfp4_linear(x, wp, ws, mul)  # builds the plan outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = K.nvfp4_linear(x, wp, ws, mul)
        x.copy_(x * 2)
        graph.replay()
        assert rel_err(y, 2 * ref) < 1e-2 and rel_err(y0, ref) < 1e-2
        f = torch.compile(lambda a: K.nvfp4_linear(a, wp, ws, mul), fullgraph=True)
        assert rel_err(f(x), 2 * ref) < 1e-2


@pytest.mark.gpu
@needs_humming
def test_gpu_compile_failure_falls_back(tmp_path):
    """A Humming cache directory that cannot be created (a file stands in its way) makes every JIT
    compile fail: auto logs it and the result still comes, from our kernels. The call shape is one that
    kernels/table.py sends to Humming on this card."""
    cc = torch.cuda.get_device_capability()
    n, k = 4096, 4096
    m = next((m for m in (64, 128, 512, 1, 16) if T.backend_for(cc, m, n, k) == "humming"), None)
    if m is None:
        pytest.skip(f"kernels/table.py sends no {n}x{k} call to Humming on sm_{cc[0]}{cc[1]}")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    code = textwrap.dedent(
        f"""
        import logging, torch
        logging.basicConfig(level=logging.INFO)
        from nvfp4_fix import settings
        import nvfp4_fix.kernels as K
        wp = torch.randint(0, 256, ({n}, {k // 2}), dtype=torch.uint8, device="cuda")
        ws = (torch.rand(({n}, {k // 16}), device="cuda") + 0.5).to(torch.float8_e4m3fn)
        x = torch.randn({m}, {k}, dtype=torch.bfloat16, device="cuda")
        with settings.override(humming=True):
            y = K.nvfp4_linear(x, wp, ws, torch.tensor(1.0, device="cuda"))
            ref = K.nvfp4_linear(x, wp, ws, torch.tensor(1.0, device="cuda"), kernel="reference")
        print("relerr", float((y.float() - ref.float()).norm() / ref.float().norm()))
        """
    )
    env = dict(os.environ, HUMMING_CACHE_DIR=str(blocker / "cache"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"Humming cannot run a {n}x{k} weight" in res.stderr, res.stderr[-3000:]
    assert float(res.stdout.split("relerr")[-1]) < 1e-2
