"""kernels/fp8_act_quant.py: one-launch FP8 activation quantization, codes and scales bit-equal to the
torch ops of fp8_cuda.quantize_activations (themselves held equal to compressed-tensors' forward by
tests/test_fp8.py), on the CPU under the Triton interpreter and on CUDA."""

from __future__ import annotations

import pytest
import torch

from nvfp4_fix.schemes import FP8Spec

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
INTERPRET = __import__("os").environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if CUDA else [])
if not DEVICES:
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def _inputs(m: int, k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(m * 7 + k)
    x = torch.randn(m, k, generator=g) * torch.logspace(-3, 2, m).unsqueeze(1)
    x[0, : k // 2] = 0.0  # a row whose amax is still positive
    if m > 2:
        x[2] = 0.0  # an all-zero row: the eps scale
    return x.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 4096), (5, 80), (3, 5000)])
@pytest.mark.parametrize("mode", ["dynamic-token", "static"])
def test_codes_and_scales_equal_the_torch_ops(device, dtype, m, k, mode):
    from nvfp4_fix.fp8_cuda import quantize_activations
    from nvfp4_fix.kernels.fp8_act_quant import quantize_rows

    x = _inputs(m, k, dtype, device)
    spec = FP8Spec("channel", mode)
    input_scale = torch.tensor([0.0123], dtype=torch.float32, device=device) if mode == "static" else None
    want_q, want_s = quantize_activations(x, spec, input_scale)
    got_q, got_s = quantize_rows(x, input_scale)
    assert got_q.dtype == torch.float8_e4m3fn and got_s.dtype == torch.float32
    assert got_s.shape == (m, 1)
    assert torch.equal(got_s, want_s.float().expand(m, 1)), (got_s.flatten()[:4], want_s.flatten()[:4])
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
    # and against float64 arithmetic: codes * scale within e4m3's half step (relative 2^-4, 2^-10 of the
    # scale for subnormals) of x plus x's own rounding of x / scale, where x / scale is inside +-448;
    # saturated beyond
    xd, sd = x.double(), got_s.double()
    deq = got_q.double() * sd
    inside = (xd / sd).abs() <= 448
    err = (deq - xd).abs()
    assert (err <= xd.abs() * (2**-4 + 2**-7) + sd * 2**-10)[inside].all()
    assert torch.equal(deq[~inside].abs(), (448 * sd).expand_as(deq)[~inside])


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_mm_operands_quantize_in_one_launch(device):
    """The per-token quantization before ``_scaled_mm`` is one Triton launch (about ten torch ops
    before), with the same operands as the torch ops give."""
    from launches import LaunchCounter

    from nvfp4_fix.fp8_cuda import quantize_activations, scaled_mm_operands

    x = _inputs(4, 256, torch.bfloat16, device)
    spec = FP8Spec("channel", "dynamic-token")
    weight_scale = torch.rand(64, 1, device=device) / 448
    with LaunchCounter() as c:
        q, sa, sw = scaled_mm_operands(x, weight_scale, None, spec, "row", 64)
    torch_ops = ("abs", "amax", "div", "where", "clamp")
    quantizing = [n for n in c.names if n.startswith("triton:") or n in torch_ops]
    assert quantizing == ["triton:_quantize_rows_kernel"], c.names
    want_q, want_s = quantize_activations(x, spec, None)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(sa, want_s.float()) and sa.shape == (4, 1) and sw.shape == (1, 64)
