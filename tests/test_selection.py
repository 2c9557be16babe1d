"""What ``auto`` picks on each kind of card, from the pure selection function (no card needed): the
table of benchmarks/KERNEL_NOTES.md's "Older GPUs" section, row by row."""

from __future__ import annotations

import pytest
import torch

import nvfp4_fix.kernels as K
from nvfp4_fix import settings
from nvfp4_fix.kernels import selection as S

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
DEFAULT = settings.Settings()
HUMMING = settings.Settings(humming=True)


def card(cc, triton=True, nvrtc=True, humming=True):
    return S.Card(cc, triton, nvrtc, humming)


H100 = card((9, 0))


def test_cpu():
    for dtype in (BF16, FP32):
        assert S.choose(None, dtype, 1, 4096, 4096, DEFAULT) == "cpu_gemv"
        assert S.choose(None, dtype, 7, 4096, 4096, HUMMING) == "chunked"


def test_cpu_dispatch_uses_the_same_function():
    for m in (1, 3):
        x = torch.zeros(m, 48, dtype=BF16)
        assert K.select_kernel(x, 33, 48) == S.choose(None, BF16, m, 33, 48, settings.current())


@pytest.mark.parametrize("cc", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)])
def test_sm80_and_newer_without_humming(cc):
    c = card(cc)
    for s in (DEFAULT, settings.Settings(humming=True) if cc != (9, 0) else DEFAULT):
        assert [S.choose(c, BF16, m, 4096, 4096, s) for m in (1, 8, 9, 32)] == ["cuda_mma"] * 4
        assert S.choose(c, FP16, 33, 4096, 4096, s) == "triton_mm"
        assert S.choose(c, BF16, 255, 4096, 4096, s) == "triton_mm"
        assert S.choose(c, BF16, 256, 4096, 4096, s) == "dequant_mm"
        assert S.choose(c, FP32, 1, 4096, 4096, s) == "dequant_mm"
        # K not a multiple of 128 (or cuda_mma off, or no NVRTC): Triton at M == 1
        assert S.choose(c, BF16, 1, 1000, 1520, s) == "triton_gemv"
        assert S.choose(c, BF16, 1, 1000, 1520, s, m1_kernel="mm") == "triton_mm"
        assert S.choose(c, BF16, 4, 1000, 1520, s) == "triton_mm"
    assert S.choose(card(cc, nvrtc=False), BF16, 1, 4096, 4096, DEFAULT) == "triton_gemv"
    off = settings.Settings(cuda_mma=False)
    assert S.choose(c, BF16, 1, 4096, 4096, off) == "triton_gemv"
    assert S.choose(c, BF16, 300, 4096, 4096, settings.Settings(dequant_mm_min_m=512)) == "triton_mm"


def test_tiny_layers_dequantize_from_96_rows():
    """Tiny layers (N*K < 4M, the MoE experts) take dequantize + cuBLAS from M = 96, unless
    ``dequant_mm_min_m`` asks for it earlier; the next class up keeps ``dequant_mm_min_m``."""
    tiny, small = (1000, 1520), (1024, 4096)
    assert S.TINY_DEQUANT_MM_MIN_M == 96
    tri, deq = "triton_mm", "dequant_mm"
    assert [S.choose(H100, BF16, m, *tiny, DEFAULT) for m in (95, 96, 300)] == [tri, deq, deq]
    assert [S.choose(H100, BF16, m, *small, DEFAULT) for m in (96, 255, 256)] == [tri, tri, deq]
    assert S.choose(H100, BF16, 40, *tiny, settings.Settings(dequant_mm_min_m=40)) == "dequant_mm"
    assert S.choose(H100, BF16, 16, *tiny, settings.Settings(dequant_mm_min_m=1)) == "triton_mm"


def test_h100_with_humming_follows_the_table():
    """kernels/table.py's sm_90 rows, through the selection function."""
    small, medium, large, tiny = (6144, 4096), (4096, 14336), (28672, 4096), (1536, 2048)
    assert S.choose(H100, BF16, 1, *small, HUMMING) == "cuda_mma"
    assert S.choose(H100, BF16, 16, *small, HUMMING) == "cuda_mma"
    assert S.choose(H100, BF16, 17, *small, HUMMING) == "humming"
    assert S.choose(H100, FP16, 512, *small, HUMMING) == "humming"
    assert S.choose(H100, BF16, 513, *small, HUMMING) == "dequant_mm"
    assert S.choose(H100, BF16, 1024, *medium, HUMMING) == "humming"
    assert S.choose(H100, BF16, 2048, *medium, HUMMING) == "dequant_mm"
    assert S.choose(H100, BF16, 1, *large, HUMMING) == "humming"
    assert S.choose(H100, BF16, 4096, *large, HUMMING) == "dequant_mm"
    assert S.choose(H100, BF16, 32, *tiny, HUMMING) == "cuda_mma"
    assert S.choose(H100, BF16, 64, *tiny, HUMMING) == "triton_mm"
    assert S.choose(H100, BF16, 128, *tiny, HUMMING) == "dequant_mm"
    assert S.choose(H100, FP32, 64, *small, HUMMING) == "dequant_mm"  # Humming takes fp16/bf16 only
    # off by default, or not installed: our kernels everywhere
    assert S.choose(H100, BF16, 64, *small, DEFAULT) == "triton_mm"
    assert S.choose(card((9, 0), humming=False), BF16, 64, *small, HUMMING) == "triton_mm"
    # Humming's fallback is ours(): the same answer as with Humming off
    for m in (1, 9, 33, 64, 300, 2048):
        assert S.ours(H100, BF16, m, *large, HUMMING) == S.choose(H100, BF16, m, *large, DEFAULT)


def test_h100_wide_layers_take_cuda_tile_at_17_to_48_rows():
    """selection.tile_wins: the large class with N >= 16384 (8B / 70B gate_up, lm_heads), 17-48 rows, sm_90
    only (measured there); everything else keeps cuda_mma / tl.dot."""
    gate_up, lm_head, down70, qkv70 = (28672, 4096), (128256, 4096), (8192, 28672), (10240, 8192)
    for wide in (gate_up, lm_head, (57344, 8192)):
        picks = [S.choose(H100, BF16, m, *wide, DEFAULT) for m in (16, 17, 32, 33, 48, 49)]
        assert picks == ["cuda_mma", "cuda_tile", "cuda_tile", "cuda_tile", "cuda_tile", "triton_mm"], wide
        assert S.choose(H100, FP16, 24, *wide, DEFAULT) == "cuda_tile"
    for other in (down70, qkv70, (6144, 4096), (1536, 2048)):
        assert S.choose(H100, BF16, 24, *other, DEFAULT) == "cuda_mma", other
    for cc in ((8, 0), (8, 9), (10, 0), (12, 0)):  # not measured there
        assert S.choose(card(cc), BF16, 24, *gate_up, DEFAULT) == "cuda_mma", cc
    assert S.choose(H100, BF16, 24, *gate_up, settings.Settings(cuda_tile=False)) == "cuda_mma"
    assert S.choose(card((9, 0), nvrtc=False), BF16, 24, *gate_up, DEFAULT) == "triton_mm"
    assert S.choose(H100, BF16, 24, 28672, 4160, DEFAULT) == "triton_mm"  # K % 128 != 0
    assert S.choose(H100, FP32, 24, *gate_up, DEFAULT) == "dequant_mm"
    assert S.choose(H100, BF16, 24, *gate_up, HUMMING) == "humming"  # the table's Humming row first
    assert S.ours(H100, BF16, 24, *gate_up, HUMMING) == "cuda_tile"  # and its fallback


def test_h100_with_humming_skips_shapes_humming_cannot_run():
    """An N that is not a multiple of 8 goes to our kernels where the table gives the call to Humming,
    and ``humming_refusal`` says why; N a multiple of 8 (padded to 128 by Humming) still goes to it."""
    assert S.choose(H100, BF16, 64, 333, 16384, HUMMING) == "triton_mm"
    assert S.choose(H100, BF16, 64, 333, 16384, HUMMING) == S.ours(H100, BF16, 64, 333, 16384, HUMMING)
    reason = S.humming_refusal(H100, BF16, 64, 333, 16384, HUMMING)
    assert reason is not None and reason.startswith("N = 333 is not a multiple of 8")
    for n in (336, 2880, 1000):
        assert S.choose(H100, BF16, 64, n, 16384, HUMMING) == "humming", n
        assert S.humming_refusal(H100, BF16, 64, n, 16384, HUMMING) is None
    # no refusal to report where the table would not have taken Humming anyway
    assert S.humming_refusal(H100, BF16, 1, 333, 16384, HUMMING) is None
    assert S.humming_refusal(H100, BF16, 64, 333, 16384, DEFAULT) is None
    assert S.humming_refusal(None, BF16, 64, 333, 16384, HUMMING) is None


def test_humming_only_where_measured():
    assert S.humming_allowed(H100, HUMMING)
    assert not S.humming_allowed(H100, DEFAULT)
    for cc in ((7, 5), (8, 0), (8, 9), (10, 0), (12, 0)):  # supported by Humming, never measured here
        assert not S.humming_allowed(card(cc), HUMMING), cc
    assert not S.humming_allowed(card((7, 0)), HUMMING)


@pytest.mark.parametrize("cc", [(7, 0), (7, 5)])
def test_older_than_sm80_runs_the_torch_path(cc):
    """Below sm_80 nothing here uses our PTX (its decode needs sm_80) or Humming (no measured rows)."""
    for m in (1, 8, 64, 2048):
        for dtype in (BF16, FP16, FP32):
            assert S.choose(card(cc), dtype, m, 4096, 4096, HUMMING) == "chunked"


def test_no_triton():
    for m in (1, 64):
        assert S.choose(card((9, 0), triton=False, humming=False), BF16, m, 4096, 4096, DEFAULT) == "chunked"


def test_cuda_tile_that_does_not_compile_falls_back(monkeypatch):
    """The dispatch's compile check (kernels/__init__._nvrtc_checked): where cuda_tile cannot be built on
    the device, the call goes to what ``ours`` picks without it (cuda_mma up to 32 rows, tl.dot from 33),
    and cuda_mma's own check still applies after that. The device probes are replaced; the choice is real."""
    import nvfp4_fix.kernels as kernels

    gate_up = (28672, 4096)
    monkeypatch.setattr(kernels._cuda_tile, "supports_shape", lambda *a: False)
    monkeypatch.setattr(kernels._cuda_mma, "supports_shape", lambda *a: True)
    for m, want in ((17, "cuda_mma"), (32, "cuda_mma"), (33, "triton_mm"), (48, "triton_mm")):
        assert S.choose(H100, BF16, m, *gate_up, DEFAULT) == "cuda_tile"
        assert kernels._nvrtc_checked(H100, 0, "cuda_tile", BF16, m, *gate_up, DEFAULT) == want, m
    monkeypatch.setattr(kernels._cuda_mma, "supports_shape", lambda *a: False)
    assert kernels._nvrtc_checked(H100, 0, "cuda_tile", BF16, 24, *gate_up, DEFAULT) == "triton_mm"
    monkeypatch.setattr(kernels._cuda_tile, "supports_shape", lambda *a: True)
    assert kernels._nvrtc_checked(H100, 0, "cuda_tile", BF16, 24, *gate_up, DEFAULT) == "cuda_tile"


def test_cuda_mma_buckets_cover_every_row_count_once():
    """Every M that cuda_mma runs (1..64) falls in exactly one TUNED bucket, named by its top M, and the
    bucket's column-tile counts are exactly those of its M; M = 2..8 share M = 1's one tile but not its
    bucket, so a variant measured only at M = 1 never runs at M = 8."""
    from nvfp4_fix.kernels import cuda_mma

    for m in range(1, cuda_mma.MAX_ROWS + 1):
        owners = [hi for lo, hi in cuda_mma.BUCKETS if lo <= m <= hi]
        assert owners == [cuda_mma.bucket(m)], m
        assert -(-m // 8) in cuda_mma.bucket_nts(owners[0]), m
    for lo, hi in cuda_mma.BUCKETS:
        assert set(cuda_mma.bucket_nts(hi)) == {-(-m // 8) for m in range(lo, hi + 1)}
    assert [cuda_mma.bucket(m) for m in (1, 2, 8, 9)] == [1, 8, 8, 16]
    assert cuda_mma.bucket(cuda_mma.MAX_ROWS + 1) is None
