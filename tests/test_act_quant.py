"""The fused W4A4 activation quantization (nvfp4_fix.kernels.act_quant) against the torch reference
(``layer.fake_quantize_activations``, itself checked against compressed-tensors' own forward in
test_loading.py): the same bits, NaN where the reference has NaN. Inputs are random with group
magnitudes from 1e-7 to 1e4 (e4m3 subnormal scales, the 448 clamp), plus hand-made groups for the
ties of the E2M1 rounding, all-zero groups, inf and NaN. An independent float64 check confirms that
every output is the nearest grid point of x / step. Without CUDA the kernel runs in the Triton
interpreter; without Triton (the legacy environment) these tests skip.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from nvfp4_fix import settings
from nvfp4_fix.layer import fake_quantize_activations

HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def act_quant():
    from nvfp4_fix.kernels import act_quant

    return act_quant


def random_groups(shape, dtype, seed, device=DEVICE):
    """Random values whose 16-groups have magnitudes spread over 1e-7 .. 1e4."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    groups = x.reshape(-1, 16)
    groups *= 10.0 ** (torch.rand(groups.shape[0], 1, generator=g, dtype=torch.float64) * 11 - 7)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype).to(device)


def divisor_for(x, factor=1.0):
    """compressed-tensors' global divisor 448 * 6 / amax, times factor."""
    return (448.0 * 6.0 / x.float().abs().amax() * factor).reshape(1).to(torch.float32)


def assert_same(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 64), (7, 48), (3, 5, 272), (130, 16), (2, 1040)])
@pytest.mark.parametrize("factor", [1.0, 1e-3, 1e3])
def test_equals_reference(shape, dtype, factor):
    x = random_groups(shape, dtype, seed=sum(shape))
    g = divisor_for(x, factor).to(x.device)
    out = act_quant().fake_quantize(x, g)
    assert_same(out, fake_quantize_activations(x, g))
    assert not torch.equal(out, x)  # it did quantize


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_zeros_inf_nan(dtype):
    mids = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
    tie_group = [6.0] + mids + [-m for m in mids] + [-6.0]  # amax 6 * 0.5: step 0.5, g = 1
    rows = [
        [v * 0.5 for v in tie_group],
        [0.0] * 16,  # scale 0 -> e4m3 eps
        [float("inf")] + [1.0] * 15,
        [float("nan")] + [1.0] * 15,  # the whole group becomes NaN
        [-0.0] * 8 + [1e-30] * 8,
    ]
    x = torch.tensor(rows, dtype=torch.float64).to(dtype).to(DEVICE)
    g = torch.ones(1, dtype=torch.float32, device=DEVICE)
    out = act_quant().fake_quantize(x, g)
    assert_same(out, fake_quantize_activations(x, g))
    rounded = [0.0, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0]  # the midpoints, ties to the even code
    expect_ties = [3.0] + rounded + [-v for v in rounded] + [-3.0]
    assert out[0].float().tolist() == expect_ties
    assert torch.isnan(out[3]).all() and not torch.isnan(out[:3]).any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outputs_are_nearest_grid_points_float64(dtype):
    """Independent of both implementations: y / step is an E2M1 grid point nearest to x / step."""
    x = random_groups((9, 160), dtype, seed=7)
    g = divisor_for(x)
    y = act_quant().fake_quantize(x, g.to(x.device))
    xs = x.double().cpu().numpy().reshape(-1, 16)
    ys = y.double().cpu().numpy().reshape(-1, 16)
    gd = float(g)
    amax = np.abs(xs).max(axis=1, keepdims=True)
    local = torch.from_numpy(amax / 6).to(dtype).double().numpy()  # rounded to the dtype, as producers do
    scale = torch.from_numpy(np.clip(gd * local, -448, 448)).to(torch.float8_e4m3fn).double().numpy()
    scale[scale == 0] = 0.125
    step = scale / gd
    v = np.clip(xs / step, -6, 6)
    q = ys / step
    dist = np.abs(np.abs(v)[..., None] - GRID).min(axis=-1)
    rel = np.finfo(np.float32).eps * 8  # fp32 step and division; y rounded to dtype below
    tol = {torch.float32: rel, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    assert np.allclose(np.abs(np.abs(v) - np.abs(q)), dist, rtol=0, atol=6 * tol)
    assert np.all(np.sign(q) * np.sign(v) >= 0)


def test_under_compile_and_opcheck():
    x = random_groups((4, 64), torch.bfloat16, seed=3)
    g = divisor_for(x).to(x.device)
    torch.library.opcheck(torch.ops.nvfp4_fix.fake_quantize, (x, g))
    compiled = torch.compile(lambda t: act_quant().fake_quantize(t * 2, g), backend="eager", fullgraph=True)
    assert_same(compiled(x), fake_quantize_activations(x * 2, g))


def test_rejects_what_it_cannot_take():
    with pytest.raises(ValueError, match="multiple of 16"):
        act_quant().fake_quantize(torch.ones(2, 24, device=DEVICE), torch.ones(1, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k", [(1, 4096), (2048, 4096), (17, 14336), (1000, 1040)])
def test_gpu_full_shapes(m, k, dtype):
    x = random_groups((m, k), dtype, seed=m + k)
    g = divisor_for(x)
    assert_same(act_quant().fake_quantize(x, g), fake_quantize_activations(x, g))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_layer_path_and_graph_capture():
    from nvfp4_fix.layer import quantize_activations

    x = random_groups((3, 4096), torch.bfloat16, seed=11)
    g = divisor_for(x)
    ref = fake_quantize_activations(x, g)
    assert_same(quantize_activations(x, g), ref)
    with settings.override(kernel="reference"):
        assert_same(quantize_activations(x, g), ref)
    static_x = x.clone()
    quantize_activations(static_x, g)  # warm up (compile) outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = quantize_activations(static_x, g)
    fresh = random_groups((3, 4096), torch.bfloat16, seed=12)
    static_x.copy_(fresh)
    graph.replay()
    assert_same(static_y, fake_quantize_activations(fresh, g))
