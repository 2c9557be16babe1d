"""FP8Linear against independent references: a numpy float64 dequantization written here from the
format description, and compressed-tensors' own forward for the activation quantization."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import e4m3_to_float

from nvfp4_fix import fp8
from nvfp4_fix.fp8 import FP8Linear, fake_quantize_fp8
from nvfp4_fix.schemes import FP8Spec

N, K = 77, 200  # odd rows; with 32x64 blocks: 3 row blocks (the last of 13 rows), 4 column blocks (last 8)
SPECS = [FP8Spec("tensor"), FP8Spec("channel"), FP8Spec("block", block=(32, 64))]


def _scale_shape(spec: FP8Spec) -> tuple[int, ...]:
    if spec.weights == "tensor":
        return (1,)
    if spec.weights == "channel":
        return (N, 1)
    assert spec.block is not None
    return (math.ceil(N / spec.block[0]), math.ceil(K / spec.block[1]))


def _layer(spec: FP8Spec, scale_dtype: torch.dtype, bias: bool, seed: int = 0) -> FP8Linear:
    g = torch.Generator().manual_seed(seed)
    shape = _scale_shape(spec)
    static = spec.activations == "static"
    layer = FP8Linear(
        K,
        N,
        spec,
        bias=bias,
        scale_shape=shape,
        scale_dtype=scale_dtype,
        input_scale_shape=(1,) if static else None,
        dtype=torch.bfloat16,
    )
    codes = torch.randint(0, 256, (N, K), generator=g, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x11  # no NaN codes
    layer.weight.data = codes.view(torch.float8_e4m3fn)
    layer.weight_scale.data = (torch.rand(shape, generator=g) * 1e-3 + 1e-4).to(scale_dtype)
    if layer.bias is not None:
        layer.bias.data = torch.randn(N, generator=g).bfloat16()
    if layer.input_scale is not None:
        layer.input_scale.data = torch.tensor([0.01])
    return layer


def _reference_weight(layer: FP8Linear) -> np.ndarray:
    """float64 [N, K]: e4m3 decoded bit by bit, each scale spread over its rows/columns by hand."""
    w = e4m3_to_float(layer.weight.data.view(torch.uint8).numpy())
    s = layer.weight_scale.data.to(torch.float64).numpy()
    full = np.empty((N, K))
    for r in range(N):
        for c in range(0, K, 8):
            if layer.spec.weights == "tensor":
                full[r, c : c + 8] = s.reshape(-1)[0]
            elif layer.spec.weights == "channel":
                full[r, c : c + 8] = s.reshape(-1)[r]
            else:
                bn, bk = layer.spec.block
                full[r, c : c + 8] = s[r // bn, c // bk]
    return w * full


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.weights)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_float64_reference(spec: FP8Spec, scale_dtype: torch.dtype) -> None:
    layer = _layer(spec, scale_dtype, bias=False)
    ref = _reference_weight(layer)
    got = layer.dequantized_weight(torch.float32).double().numpy()
    # one float32 product of two exact values: relative error <= 2^-24
    np.testing.assert_allclose(got, ref, rtol=2**-23, atol=0)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.weights)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("chunk", [None, 13 * K], ids=["whole", "chunked"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_forward_weight_only_matches_float64(
    spec: FP8Spec, dtype: torch.dtype, chunk: int | None, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nvfp4_fix import settings

    if chunk is not None:  # 13-row chunks: boundaries inside the 32-row blocks
        monkeypatch.setattr(fp8, "CHUNK_ELEMENTS", chunk)
    layer = _layer(spec, torch.float32, bias=True).to(dtype)
    x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    with settings.override(cpu_compile=compiled, cpu_compile_min_weights=1):
        y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 5, N)
    ref = x.double().numpy() @ _reference_weight(layer).T + layer.bias.double().numpy()
    err = np.linalg.norm(y.double().numpy() - ref) / np.linalg.norm(ref)
    # bf16: weights and output rounded to 8 significant bits (~2^-9 each), float32: ~1e-7
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err


def _ct_args(spec: FP8Spec):  # noqa: ANN202 - a compressed_tensors QuantizationArgs
    from compressed_tensors.quantization import QuantizationArgs

    strategy = {
        "static": "tensor",
        "dynamic-tensor": "tensor",
        "dynamic-token": "token",
        "dynamic-group": "group",
    }
    return QuantizationArgs(
        num_bits=8,
        type="float",
        symmetric=True,
        strategy=strategy[spec.activations],
        dynamic=spec.activations != "static",
        group_size=spec.group_size,
    )


@pytest.mark.parametrize(
    "spec",
    [
        FP8Spec("channel", "static"),
        FP8Spec("channel", "dynamic-token"),
        FP8Spec("channel", "dynamic-tensor"),
        FP8Spec("channel", "dynamic-group", group_size=40),
    ],
    ids=lambda s: s.activations,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_activation_quantization_equals_compressed_tensors(spec: FP8Spec, dtype: torch.dtype) -> None:
    """Bit for bit what compressed-tensors' own forward does to a [batch, seq, K] input."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    x = torch.randn(2, 7, K, generator=torch.Generator().manual_seed(2)).to(dtype) * 3
    x[0, 3] = 0  # an all-zero token: the eps scale
    module = torch.nn.Linear(K, N)
    module.quantization_status = QuantizationStatus.COMPRESSED
    input_scale = torch.tensor([0.012], dtype=dtype)
    module.input_scale = torch.nn.Parameter(input_scale, requires_grad=False)
    expected = forward_quantize(module, x, "input", _ct_args(spec))
    got = fake_quantize_fp8(x, spec, input_scale)
    assert got.dtype == dtype
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert not torch.equal(got, x)  # it did quantize


def test_static_activations_against_float64() -> None:
    """x' = e4m3(clamp(x / s, +-448)) * s, with e4m3 rounding checked against the decoded grid."""
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(3)) * 4
    x[0, 0] = 1e4  # clamps to 448 * s
    s = torch.tensor([0.01])
    got = fake_quantize_fp8(x, FP8Spec("tensor", "static"), s).double().numpy()
    grid = e4m3_to_float(np.arange(256))
    grid = np.unique(grid[np.isfinite(grid)])
    v = np.clip(x.double().numpy() / float(np.float32(0.01)), -448, 448)
    nearest = grid[np.abs(v[..., None] - grid).argmin(-1)]
    ref = nearest * float(np.float32(0.01))
    np.testing.assert_allclose(got, ref, rtol=2**-22)
    assert got[0, 0] == pytest.approx(448 * 0.01, rel=1e-6)


def test_activation_mode_bf16_skips_quantization() -> None:
    layer = _layer(FP8Spec("channel", "dynamic-token"), torch.float32, bias=False)
    x = torch.randn(2, 3, K).bfloat16()
    quantized = layer(x)
    layer.activation_mode = "bf16"
    plain = layer(x)
    assert torch.equal(plain, torch.nn.functional.linear(x, layer.dequantized_weight(torch.bfloat16)))
    assert not torch.equal(plain, quantized)


def test_formats_survive_model_casts_and_state_dict() -> None:
    layer = _layer(FP8Spec("tensor", "static"), torch.bfloat16, bias=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.half()
    layer.to(torch.float32)
    sd = layer.state_dict()
    assert list(sd) == ["weight", "weight_scale", "input_scale", "bias"]
    assert sd["weight"].dtype == torch.float8_e4m3fn and sd["weight_scale"].dtype == torch.bfloat16
    assert sd["input_scale"].dtype == torch.float32 and sd["bias"].dtype == torch.float32
    for k in ("weight", "weight_scale", "input_scale"):
        assert torch.equal(sd[k].view(torch.uint8), before[k].view(torch.uint8))


def test_static_without_input_scale_is_refused() -> None:
    with pytest.raises(ValueError, match="input_scale"):
        FP8Linear(K, N, FP8Spec("tensor", "static"))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.weights)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_token_on_cpu_runs_the_compiled_gemv(spec: FP8Spec, dtype: torch.dtype, monkeypatch) -> None:  # noqa: ANN001
    """M = 1 on the CPU: the torch.compile'd GEMV (codes decoded in its loop, float32 sums), against the
    float64 reference; the chunked path gives the same within the dtype's rounding."""
    from nvfp4_fix import settings

    calls = []
    real = fp8._compiled_gemv

    def counted():  # noqa: ANN202
        fn = real()
        return lambda *a: (calls.append(1), fn(*a))[1]

    monkeypatch.setattr(fp8, "_compiled_gemv", counted)
    layer = _layer(spec, torch.float32, bias=True).to(dtype)
    x = torch.randn(1, 1, K, generator=torch.Generator().manual_seed(4)).to(dtype)
    ref = x.double().numpy() @ _reference_weight(layer).T + layer.bias.double().numpy()
    with settings.override(cpu_compile=True, cpu_compile_min_weights=1):
        y = layer(x)
    assert calls and y.shape == (1, 1, N) and y.dtype == dtype
    err = np.linalg.norm(y.double().numpy() - ref) / np.linalg.norm(ref)
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-6), err
    with settings.override(cpu_compile=False):
        chunked = layer(x)
    assert len(calls) == 1
    assert float((chunked.double() - y.double()).norm() / y.double().norm()) < (
        1e-2 if dtype == torch.bfloat16 else 1e-5
    )
