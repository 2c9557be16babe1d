"""kernels/cuda_tile.py: the tiled mma.sync GEMM.

On the CPU: every plan and swept variant compiles with NVRTC for sm_80 and sm_90 without register spills,
the source refuses tiles it cannot copy, the plan (token tile, K splits) follows its rules, and the kernel
asked for by name off a GPU says what it needs. On an sm_90 GPU (``gpu``): the product against the float64
reference of the same packed weight at odd N, K not a power of two, M not a multiple of the tile, both
dtypes, per-row multipliers, bias and split K (twice, so the arrival counters were reset), output poisoned
before each run; the dispatch's choice of it on wide layers; CUDA-graph replay.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_kernels import TOL, make_weight, make_x, ref_linear_f64, rel_err

import nvfp4_fix.kernels as K
from nvfp4_fix.kernels import cuda_tile, nvrtc
from nvfp4_fix.kernels.cuda_tile_src import KERNEL_NAME, arch, source

try:
    nvrtc.nvrtc()
    HAS_NVRTC = True
except nvrtc.CudaError:  # pragma: no cover - depends on the environment
    HAS_NVRTC = False

HAS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_nvrtc = pytest.mark.skipif(not HAS_NVRTC, reason="no NVRTC")
needs_sm90 = pytest.mark.skipif(not HAS_SM90, reason="needs an sm_90 GPU (where it was measured)")

#: the (BM, WG, RT) families the sweep times (benchmarks/sweep_tile.py), at depth 1 and 2
SWEPT = [
    {"BM": bm, "WG": wg, "RT": rt, "DEPTH": d}
    for bm, wg, rt in (
        (16, 2, 2),
        (24, 1, 2),
        (32, 2, 1),
        (32, 2, 2),
        (32, 1, 2),
        (48, 2, 1),
        (48, 1, 2),
        (64, 2, 1),
        (64, 2, 2),
        (64, 1, 1),
        (128, 2, 1),
        (128, 1, 1),
    )
    for d in (1, 2)
]


def _compile(dtype: torch.dtype, variant: dict[str, int], capability=(9, 0)) -> tuple[int, int, int]:
    _, log = nvrtc.compile_with_log(source(dtype, variant), arch(capability), ("--ptxas-options=-v",))
    i = log.index(f"Function properties for {KERNEL_NAME}")
    block = log[i : i + 400]
    regs = re.search(r"Used (\d+) registers", block)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
    assert regs and spills, log
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


@needs_nvrtc
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_plans_and_swept_variants_compile_without_spills(dtype):
    variants = {tuple(sorted(plan.items())) for _, plan in cuda_tile.TILE_PLANS}
    variants |= {tuple(sorted(v.items())) for v in SWEPT}
    for key in sorted(variants):
        for cc in ((8, 0), (9, 0)):
            regs, stores, loads = _compile(dtype, dict(key), cc)
            assert stores == 0 and loads == 0, (key, cc, regs, stores, loads)


@needs_nvrtc
def test_spill_report_is_read():
    """The check above can fail: two 16-row tiles a warp against 128 token rows spill."""
    assert _compile(torch.bfloat16, {"BM": 128, "WG": 2, "RT": 2})[1] > 0


def test_source_refuses_a_tile_it_cannot_copy():
    for bm in (0, 12, 264):
        with pytest.raises(ValueError, match="BM must be a multiple of 8"):
            source(torch.bfloat16, {"BM": bm})
    with pytest.raises(ValueError, match="copies BM"):
        source(torch.bfloat16, {"BM": 8, "WG": 2})


@pytest.mark.parametrize("m", [9, 17, 24, 32, 33, 48, 64, 200, 512])
@pytest.mark.parametrize(
    "n,k", [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336), (1536, 2048), (520, 384)]
)
def test_splits_only_while_the_grid_is_small(m, n, k):
    sms = 132
    variant = cuda_tile.tile_plan(m)
    splits = cuda_tile.splits_for(m, n, k, sms, variant)
    tiles = -(-m // variant["BM"]) * -(-n // (64 * variant["WG"] * variant["RT"]))
    assert splits >= 1 and (splits == 1 or tiles * splits // 2 < sms)  # the last doubling was needed
    assert k // 128 // splits >= 8 or splits == 1  # every split keeps 8 chunks of 128


def test_tile_plan_covers_the_rows_with_the_least_padding():
    """The token tile is the smallest of 24 / 32 / 48 that covers M up to 48 (the dispatch's range), and
    every plan is a variant the source accepts."""
    for m in range(cuda_tile.MIN_M, 49):
        bm = cuda_tile.tile_plan(m)["BM"]
        assert bm >= m and bm == min(b for b in (24, 32, 48) if b >= m), m
    for _, plan in cuda_tile.TILE_PLANS:
        assert source(torch.bfloat16, plan)
    assert cuda_tile.tile_plan(cuda_tile.MAX_M)["BM"] == 48


def test_explicit_kernel_off_a_gpu_is_a_clear_error():
    wp, ws, mul = make_weight(64, 256)
    x = make_x(16, 256, torch.bfloat16)
    with pytest.raises(RuntimeError, match="kernel 'cuda_tile' needs CUDA sm_80"):
        K.nvfp4_linear(x, wp, ws, mul, kernel="cuda_tile")
    assert K.select_kernel(x, 64, 256) != "cuda_tile"


# ----------------------------------------------------------------------------- on an sm_90 GPU
def _poisoned(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype, device="cuda")


CASES = [  # (M, N, K, variant, splits)
    (9, 1000, 384, None, None),
    (17, 28672, 4096, None, None),
    (21, 6144, 4096, {"BM": 24, "WG": 1, "RT": 2}, None),
    (33, 1544, 1152, {"BM": 32, "WG": 1, "RT": 2}, 2),
    (45, 4104, 2048, {"BM": 48, "WG": 2, "RT": 1}, 2),
    (16, 4096, 4096, {"BM": 16, "WG": 2, "RT": 2}, 2),
    (64, 6144, 4096, {"BM": 64, "WG": 2, "RT": 2}, None),
    (100, 4096, 14336, {"BM": 64, "WG": 2, "RT": 1, "DEPTH": 1}, 4),
    (100, 2048, 768, {"BM": 48, "WG": 1, "RT": 2}, None),
    (200, 2048, 768, {"BM": 128, "WG": 2, "RT": 1}, 2),
    (512, 3000, 1024, {"BM": 128, "WG": 1, "RT": 1, "XST": 3}, None),
]


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("m,n,k,variant,splits", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_matches_float64(m, n, k, variant, splits, dtype):
    wp, ws, mul = make_weight(n, k, "cuda")
    x = make_x(m, k, dtype, "cuda")
    bias = torch.randn(n).to(dtype).cuda() if m % 2 else None
    row_mul = mul * (torch.rand(n, device="cuda") + 0.5)
    for mult, ref in (
        (mul, ref_linear_f64(x, wp, ws, mul, bias)),
        (row_mul, ref_linear_f64(x, wp, ws, row_mul[:, None], bias)),
    ):
        for _ in range(2):  # a split-K call leaves its counters at zero for the next
            out = _poisoned(m, n, dtype)
            y = cuda_tile.linear(x, wp, ws, mult, bias, out=out, variant=variant, splits=splits)
            assert y is out
            err = rel_err(y, ref)
            assert err <= TOL[dtype], (m, n, k, variant, splits, dtype, err)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("m", [17, 24, 29, 40, 48])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_auto_runs_cuda_tile_on_wide_layers(m, dtype):
    """The dispatch sends a wide large layer (N*K >= 96M, N >= 16384; N odd multiple of 8) at 17-48 rows
    to the kernel with tile_plan's variant, and the product matches float64; the same call by name gives
    the same bytes; the dispatch replays in a CUDA graph on new inputs and runs under torch.compile."""
    n, k = 24584, 4096
    wp, ws, mul = make_weight(n, k, "cuda")
    x = make_x(m, k, dtype, "cuda")
    bias = torch.randn(n).to(dtype).cuda()
    assert K.select_kernel(x, n, k) == "cuda_tile"
    y = K.nvfp4_linear(x, wp, ws, mul, bias)
    assert rel_err(y, ref_linear_f64(x, wp, ws, mul, bias)) <= TOL[dtype]
    out = _poisoned(m, n, dtype)
    cuda_tile.linear(x, wp, ws, mul, bias, out=out)
    assert torch.equal(out, y)
    assert torch.equal(K.nvfp4_linear(x, wp, ws, mul, bias, kernel="cuda_tile"), y)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        yg = K.nvfp4_linear(x, wp, ws, mul, bias)
    x.copy_(make_x(m, k, dtype, "cuda"))
    yg.fill_(float("nan"))
    g.replay()
    ref = ref_linear_f64(x, wp, ws, mul, bias)
    assert rel_err(yg, ref) <= TOL[dtype]
    compiled = torch.compile(lambda a: K.nvfp4_linear(a, wp, ws, mul, bias), fullgraph=True)
    assert rel_err(compiled(x), ref) <= TOL[dtype]


@pytest.mark.gpu
@needs_sm90
def test_gpu_graph_replay_of_a_split_call():
    """Captured in a CUDA graph, a split-K call replays correctly on new inputs (the counters reset)."""
    m, n, k = 24, 4096, 4096
    wp, ws, mul = make_weight(n, k, "cuda")
    x = make_x(m, k, torch.bfloat16, "cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert cuda_tile.splits_for(m, n, k, sms, cuda_tile.tile_plan(m)) > 1
    cuda_tile.linear(x, wp, ws, mul)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = cuda_tile.linear(x, wp, ws, mul)
    for _ in range(3):
        x.copy_(make_x(m, k, torch.bfloat16, "cuda"))
        y.fill_(float("nan"))
        g.replay()
        assert rel_err(y, ref_linear_f64(x, wp, ws, mul)) <= TOL[torch.bfloat16]


@pytest.mark.gpu
@needs_sm90
def test_gpu_split_call_is_bit_reproducible():
    """The last split to arrive adds the partial sums in split order, so repeated split-K calls give the
    same bytes whichever split finishes last (4 splits, 2 x 32 tiles racing)."""
    m, n, k = 40, 4096, 8192
    wp, ws, mul = make_weight(n, k, "cuda")
    x = make_x(m, k, torch.bfloat16, "cuda")
    first = cuda_tile.linear(x, wp, ws, mul, splits=4)
    assert rel_err(first, ref_linear_f64(x, wp, ws, mul)) <= TOL[torch.bfloat16]
    for _ in range(30):
        assert torch.equal(cuda_tile.linear(x, wp, ws, mul, splits=4), first)
