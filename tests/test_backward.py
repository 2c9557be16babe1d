"""grad_x = grad_y @ W from the packed bytes (kernels/backward.py) against float64, on every path:
CPU row chunks, the reference, the CUDA dequantize-into-scratch + cuBLAS code (through the Triton
interpreter without a GPU; column blocks when W exceeds the scratch budget), and the custom op's
registered autograd through the layer. GPU tests (marker ``gpu``) repeat it at Llama-3-8B shapes and
train LoRA on the demo model with the fused q/k/v and gate/up groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nvfp4_fix import settings
from nvfp4_fix.codec import dequantize, quantize
from nvfp4_fix.kernels import backward

HAS_CUDA = torch.cuda.is_available()
FIXTURES = Path(__file__).parent / "fixtures"


def packed(n: int, k: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    wp, ws, g = quantize(w.to(device), "multiplier")
    return wp, ws, g.reshape(())


def reference(g: torch.Tensor, wp, ws, mul) -> torch.Tensor:  # noqa: ANN001
    """float64: grad_y @ W with W = e2m1 * e4m3 * multiplier (per-row multipliers on grad_y's columns)."""
    scalar = mul.reshape(()) if mul.numel() == 1 else torch.ones((), device=mul.device)
    w = dequantize(wp, ws, scalar, "multiplier", torch.float64)
    g64 = g.double() * (mul.double().reshape(1, -1) if mul.numel() > 1 else 1.0)
    return g64 @ w


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("kernel", ["auto", "reference"])
def test_cpu_grad_input_matches_float64(per_row: bool, kernel: str) -> None:
    wp, ws, mul = packed(272, 688, 0)
    if per_row:  # a fused group: one multiplier per row
        mul = torch.rand(272, generator=torch.Generator().manual_seed(1)) + 0.5
    g = torch.randn(9, 272, generator=torch.Generator().manual_seed(2))
    with settings.override(cpu_chunk_mb=1):  # 272 x 688 float32 = 0.7 MiB: one chunk; below forces more
        got = backward.grad_input(g, wp, ws, mul, kernel)
    from nvfp4_fix.kernels import cpu

    chunked = cpu.grad_input_chunked(g, wp, ws.view(torch.float8_e4m3fn), mul, chunk_bytes=688 * 4 * 50)
    want = reference(g, wp, ws, mul)
    assert got.dtype == g.dtype and got.shape == (9, 688)
    assert rel(got, want) < 1e-6 and rel(chunked, want) < 1e-6


@pytest.mark.skipif(backward._tops is None or HAS_CUDA, reason="interpreter variant (needs triton, no GPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_path_through_triton_interpreter(dtype: torch.dtype) -> None:
    wp, ws, mul = packed(1024, 1024, 3)
    g = torch.randn(5, 1024, generator=torch.Generator().manual_seed(4)).to(dtype)
    want = reference(g, wp, ws, mul)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    whole = backward._grad_input_cuda(g, wp, ws.view(torch.float8_e4m3fn), mul.float())
    with settings.override(scratch_mb=1):  # 1024 x 1024 x 2-4 bytes > 1 MiB: column blocks
        blocks = backward._grad_input_cuda(g, wp, ws.view(torch.float8_e4m3fn), mul.float())
    assert whole.dtype == dtype and rel(whole, want) < tol and rel(blocks, want) < tol


@pytest.mark.parametrize("path", ["eager Function", "custom op"])
def test_linear_autograd_matches_float64(path: str) -> None:
    """x.grad through nvfp4_linear (eager: backward.PackedLinear) and through the custom op with its
    registered autograd (what torch.compile traces) equals float64; bias gets its grad; the packed
    weight gets none."""
    from nvfp4_fix.kernels import nvfp4_linear

    wp, ws, mul = packed(64, 128, 5)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(6)).requires_grad_()
    x = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(7)).requires_grad_()
    if path == "custom op":
        y = torch.ops.nvfp4_fix.linear(x.reshape(21, 128), wp, ws.view(torch.uint8), mul, bias, "auto")
        assert "nvfp4_fix_linear" in y.grad_fn.name()
    else:
        y = nvfp4_linear(x, wp, ws, mul, bias)
        assert y.grad_fn.next_functions[0][0].name() == "PackedLinearBackward"
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(8))
    (y * r).sum().backward()
    want = reference(r.reshape(-1, 64), wp, ws, mul).reshape(3, 7, 128)
    assert rel(x.grad, want) < 1e-6
    assert torch.allclose(bias.grad, r.reshape(-1, 64).sum(0), rtol=1e-5, atol=1e-5)
    assert not wp.requires_grad and wp.grad is None


gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (28672, 4096)])
def test_gpu_grad_input_at_8b_shapes(n: int, k: int) -> None:
    wp, ws, mul = packed(n, k, 9, "cuda")
    g = torch.randn(2048, n, device="cuda", generator=torch.Generator("cuda").manual_seed(10))
    want = reference(g, wp, ws, mul)
    got = backward.grad_input(g.bfloat16(), wp, ws, mul)
    assert got.dtype == torch.bfloat16 and rel(got, want) < 1e-2
    assert rel(backward.grad_input(g, wp, ws, mul), want) < 1e-5


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_gpu_lora_gradients_match_dense_reference(dtype: torch.dtype, tol: float) -> None:
    """On CUDA (bf16: q/k/v and gate/up fused, one launch each, forward and backward)."""
    import lora_helpers as tl

    import nvfp4_fix

    path = FIXTURES / "demo" / "ct-nvfp4a16"
    model = nvfp4_fix.from_pretrained(path, dtype=dtype, device_map="cuda")
    packed_model = tl.peft.get_peft_model(model, tl.lora_config())
    if dtype == torch.bfloat16:
        assert packed_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer._fused is not None
    dense = tl.peft.get_peft_model(tl.densify(tl.load(path)), tl.lora_config())
    values = tl.randomize_adapters(dense)
    assert not packed_model.load_state_dict(values, strict=False).unexpected_keys
    dense.cuda()
    ids = tl.batch(dense).cuda()
    gp, gd = tl.step_grads(packed_model, ids), tl.step_grads(dense, ids)
    worst = max(rel(gp[n].float(), gd[n].double()) for n in gd)
    assert worst < tol, worst
