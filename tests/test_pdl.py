"""Programmatic dependent launch (``settings.pdl``): cuda_mma and cuda_moe kernels that start while the
kernel before them finishes and wait for it inside themselves. The GPU tests run chains of dependent
launches in a CUDA graph and compare them bit for bit with the same chain launched plainly (the
arithmetic is the same: a missing wait would show as a race), and with the float64 reference."""

from __future__ import annotations

import ctypes
import importlib.util

import pytest
import torch

from nvfp4_fix import settings
from nvfp4_fix.kernels import cuda_mma, nvrtc
from nvfp4_fix.kernels.device import PDL_MIN_CC

CUDA = torch.cuda.is_available()
HOPPER = CUDA and torch.cuda.get_device_capability() >= PDL_MIN_CC
gpu = pytest.mark.gpu
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs a CUDA device of compute capability 9.0+")


def _nvrtc_available() -> bool:
    try:
        nvrtc.nvrtc()
    except nvrtc.CudaError:
        return False
    return True


def test_launch_config_has_cuda_h_layout():
    """CUlaunchAttribute is 72 bytes (id, padding, a 64-byte value union); CUlaunchConfig 56 with the
    stream at 32, the attributes at 40 and their count at 48 (cuda.h, 64-bit)."""
    assert ctypes.sizeof(nvrtc._LaunchAttribute) == 72
    assert nvrtc._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(nvrtc._LaunchConfig) == 56
    assert (nvrtc._LaunchConfig.stream.offset, nvrtc._LaunchConfig.attrs.offset) == (32, 40)
    assert nvrtc._LaunchConfig.num_attrs.offset == 48
    cfg = nvrtc.pdl_config((7, 3, 1), (256, 1, 1), 0xABC0)
    assert list(cfg.grid) == [7, 3, 1] and list(cfg.block) == [256, 1, 1]
    assert cfg.stream == 0xABC0 and cfg.num_attrs == 1 and cfg.shared_bytes == 0
    assert cfg.attrs.contents.id == 6 and cfg.attrs.contents.value[0] == 1


def test_setting_reads_the_environment():
    assert settings.from_environ({}).pdl is False
    assert settings.from_environ({"NVFP4_FIX_PDL": "1"}).pdl is True
    with pytest.raises(ValueError, match="NVFP4_FIX_PDL"):
        settings.from_environ({"NVFP4_FIX_PDL": "sometimes"})


@pytest.mark.skipif(not _nvrtc_available(), reason="libnvrtc not found")
def test_prologue_is_compiled_in_for_sm90_only():
    """The PDL source differs from the plain one only on sm_90+ (``griddepcontrol`` is Hopper's); both
    compile without spills; cuda_moe's kernels too."""
    from nvfp4_fix.kernels import cuda_moe

    variant = {"RT": 1, "DEPTH": 1, "XPRE": 0, "MINB": 3, "WN": 1}
    assert "#define PDL 0" in cuda_mma.source(torch.bfloat16, 1, variant)
    assert "#define PDL 1" in cuda_mma.source(torch.bfloat16, 1, variant, pdl=True)
    for make in (
        lambda pdl: cuda_mma.source(torch.bfloat16, 1, variant, pdl),
        lambda pdl: cuda_moe.source(torch.float16, cuda_moe.DOWN_SUM_VARIANT, pdl),
    ):
        cubins = {}
        for arch in ("sm_80", "sm_90"):
            for pdl in (False, True):
                cubin, log = nvrtc.compile_with_log(make(pdl), arch, ("--ptxas-options=-v",))
                assert " 0 bytes spill stores" in log and "bytes spill stores" in log
                assert all(" 0 bytes spill" in line for line in log.splitlines() if "spill" in line), log
                cubins[arch, pdl] = cubin
        assert len(cubins["sm_80", True]) == len(cubins["sm_80", False])
        assert cubins["sm_90", True] != cubins["sm_90", False]


def _chain(weights, x, pdl: bool) -> list[torch.Tensor]:
    """x -> linear -> linear -> tanh -> linear ...: dependent kernels back to back and across a torch op."""
    outs = []
    with settings.override(pdl=pdl):
        for i, (wp, ws, mul) in enumerate(weights):
            x = cuda_mma.linear(x, wp, ws, mul)
            outs.append(x)
            if i % 2:
                x = torch.tanh(x)
    return outs


@gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_cuda_mma_chain_in_a_graph_equals_plain_launches(dtype):
    from cuda_graphs import captured
    from test_kernels import make_weight, ref_linear_f64

    shapes = [(6144, 4096), (4096, 6144), (2048, 4096), (4096, 2048), (1024, 4096), (4096, 1024)] * 2
    weights = [make_weight(n, k, "cuda", seed=i) for i, (n, k) in enumerate(shapes)]
    x = torch.randn(1, 4096, device="cuda").to(dtype)
    graph, outs = captured(lambda: _chain(weights, x, pdl=True))
    for seed in range(3):
        x.copy_(torch.randn(1, 4096, generator=torch.Generator().manual_seed(seed)).to(dtype))
        graph.replay()
        plain = _chain(weights, x, pdl=False)
        torch.cuda.synchronize()
        for got, want in zip(outs, plain, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        first = ref_linear_f64(x.cpu(), *(t.cpu() for t in weights[0]))
        err = (outs[0].double().cpu() - first).norm() / first.norm()
        assert err < 1e-2, err


@gpu
@needs_hopper
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("down_sum", [False, True], ids=["down+sum_pairs", "down_sum"])
def test_gpu_cuda_moe_layers_in_a_graph_equal_plain_launches(down_sum, monkeypatch):
    """Four Qwen3-30B-A3B-sized expert layers in a row, each one's output the next one's input."""
    from cuda_graphs import captured
    from test_moe_decode import E30, H30, I30, TOPK30, _experts, _routing, reference_moe, rel

    from nvfp4_fix.kernels import cuda_moe
    from nvfp4_fix.kernels.moe_decode import decode_experts

    monkeypatch.setattr(cuda_moe, "DOWN_SUM_MAX_TOKENS", 1 if down_sum else 0)
    layers = [_experts(E30, H30, I30, seed=10 + j, device="cuda") for j in range(4)]
    x = torch.randn(1, H30, device="cuda", dtype=torch.bfloat16)
    routes = [[a.cuda() for a in _routing(1, TOPK30, E30, seed=j, invalid=j == 2)] for j in range(4)]
    for r in routes:
        r[1] = r[1].to(torch.bfloat16)

    def layer_chain(pdl: bool) -> list[torch.Tensor]:
        outs, h = [], x
        with settings.override(pdl=pdl):
            for st, (idx, w) in zip(layers, routes, strict=True):
                gate_up = (st.gate_up_codes, st.gate_up_scales, st.gate_up_mul)
                down = (st.down_codes, st.down_scales, st.down_mul)
                h = decode_experts(h, idx, w, gate_up, down, backend="cuda")
                outs.append(h)
                h = h * 4.0  # keep the magnitudes up layer after layer
        return outs

    graph, outs = captured(lambda: layer_chain(True))
    for seed in range(3):
        x.copy_(torch.randn(1, H30, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
        graph.replay()
        plain = layer_chain(False)
        torch.cuda.synchronize()
        for got, want in zip(outs, plain, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        st, (idx, w) = layers[0], routes[0]
        assert rel(outs[0], reference_moe(st, x, idx, w)) <= 1e-2


def test_triton_kernels_get_the_pdl_switch_only_on_hopper_cuda():
    from nvfp4_fix.kernels.device import triton_pdl

    cpu = torch.zeros(1)
    with settings.override(pdl=True):
        assert triton_pdl(cpu) == {"PDL": False}
        if CUDA:
            want = {"PDL": True, "launch_pdl": True} if HOPPER else {"PDL": False}
            assert triton_pdl(cpu.cuda()) == want
    if CUDA:
        with settings.override(pdl=False):
            assert triton_pdl(cpu.cuda()) == {"PDL": False}
