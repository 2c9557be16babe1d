"""FP8Linear's GPU paths against a float64 reference: the Triton W8A16 kernel (on the CPU through
Triton's interpreter, on an H100 at full shapes) and torch._scaled_mm on FP8 tensor cores for the
activation kinds whose quantization it reproduces (the codes are checked bit-equal to the emulation's).

Reference: e4m3 bytes decoded by ``reference.e4m3_to_float`` (numpy, from the format description), each
scale spread over its rows / 128-column blocks, float64 products. Tolerance: relative L2 1e-2 in bf16
(outputs and, in the emulation, operands rounded to 8 significant bits), 2e-3 in fp16.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from reference import e4m3_to_float, rel_err

from nvfp4_fix import fp8_cuda, settings
from nvfp4_fix.fp8 import FP8Linear, dequantize_fp8, fake_quantize_fp8
from nvfp4_fix.schemes import FP8Spec

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_layer(n: int, k: int, spec: FP8Spec, device: str = DEVICE, seed: int = 0) -> FP8Linear:
    """Random e4m3 codes (no NaN) and positive scales of the spec's shape, built on ``device``."""
    if spec.weights == "tensor":
        shape: tuple[int, ...] = (1,)
    elif spec.weights == "channel":
        shape = (n, 1)
    else:
        bn, bk = spec.block or (128, 128)
        shape = (math.ceil(n / bn), math.ceil(k / bk))
    layer = FP8Linear(
        k,
        n,
        spec,
        scale_shape=shape,
        input_scale_shape=(1,) if spec.activations == "static" else None,
        device=device,
    )
    g = torch.Generator(device).manual_seed(seed)
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.uint8, device=device)
    codes[(codes & 0x7F) == 0x7F] = 0x31
    layer.weight.data.copy_(codes.view(torch.float8_e4m3fn))
    layer.weight_scale.data.copy_(torch.rand(shape, generator=g, device=device) * 1e-3 + 1e-4)
    if layer.input_scale is not None:
        layer.input_scale.data.fill_(0.02)
    return layer


def reference_weight(layer: FP8Linear) -> torch.Tensor:
    """float64 W [N, K] on the layer's device (NaN where a code is NaN)."""
    w = torch.from_numpy(e4m3_to_float(np.arange(256))).to(layer.weight.device)
    w = w[layer.weight.view(torch.uint8).long()]
    s = layer.weight_scale.detach().double()
    n, k = w.shape
    if layer.spec.weights == "block":
        bn, bk = layer.spec.block or (128, 128)
        s = s.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return w * (s.reshape(()) if s.numel() == 1 else s.reshape(n, -1))


def reference(layer: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    """float64 x @ W.T on x's device (x already quantized where the reference wants that)."""
    return x.double() @ reference_weight(layer).to(x.device).T


def _inputs(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return (torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 2).to(DEVICE, dtype)


BLOCK = FP8Spec("block", block=(32, 64))


@pytest.mark.skipif(fp8_cuda._triton is None, reason="needs triton")
@pytest.mark.parametrize("spec", [FP8Spec("tensor"), FP8Spec("channel"), BLOCK], ids=lambda s: s.weights)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_triton_w8a16_small(spec: FP8Spec, m: int) -> None:
    """77 x 200 (partial row blocks, a partial K tile, block scales changing inside a split)."""
    layer = make_layer(77, 200, spec)
    x = _inputs(m, 200, torch.float16)  # the CPU interpreter's tl.dot is wrong in bf16; the GPU test has it
    y = fp8_cuda._triton.fp8_linear(x, layer.weight, layer.weight_scale, spec, None)
    assert y.dtype == torch.float16 and y.shape == (m, 77)
    assert rel_err(y, reference(layer, x)) < TOL[torch.float16]


ODD_BLOCK = FP8Spec("block", block=(48, 80))  # dequantized in tiles 16 columns wide
GATHER_BLOCK = FP8Spec("block", block=(8, 20))  # no power-of-two tile >= 16 fits a block: per-value scales
DEQ_SPECS = [FP8Spec("tensor"), FP8Spec("channel"), BLOCK, ODD_BLOCK, GATHER_BLOCK]


def _all_codes(layer: FP8Linear) -> FP8Linear:
    """Every byte 0..255 (NaN, subnormals, both zeros) spread over the weight."""
    n, k = layer.weight.shape
    codes = (torch.arange(n * k, device=layer.weight.device) * 7 % 256).to(torch.uint8)
    layer.weight.data.copy_(codes.reshape(n, k).view(torch.float8_e4m3fn))
    return layer


@pytest.mark.skipif(fp8_cuda._triton is None, reason="needs triton")
@pytest.mark.parametrize("spec", DEQ_SPECS, ids=lambda s: f"{s.weights}{s.block or ''}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [(0, None), (5, 40), (70, 7)], ids=str)
def test_dequantize_rows(spec: FP8Spec, dtype: torch.dtype, rows: tuple[int, int | None]) -> None:
    """Rows of a 77 x 200 weight holding every e4m3 byte: float32 within 1e-6 of float64 (NaN where the
    code is NaN), and bit-equal to the torch path's fp8.dequantize_fp8 (one rounding; Triton's CPU
    interpreter truncates float32 -> bf16 where the GPU rounds to nearest: there within one bf16 step)."""
    layer = _all_codes(make_layer(77, 200, spec))
    r0, r = rows
    r1 = 77 if r is None else r0 + r
    got = fp8_cuda._triton.dequantize_rows(layer.weight, layer.weight_scale, spec, dtype, r0, r)
    assert got.dtype == dtype and got.shape == (r1 - r0, 200)
    ref = reference_weight(layer)[r0:r1]
    nan = ref.isnan()
    assert torch.equal(got.isnan(), nan) and nan.any()
    if dtype == torch.float32:
        assert rel_err(got.double()[~nan], ref[~nan]) < 1e-6
    torch_path = dequantize_fp8(layer.weight, layer.weight_scale, spec, dtype, (r0, r1))
    if dtype == torch.bfloat16 and not CUDA:
        step = torch_path[~nan].float().abs() * 2.0**-7
        assert bool(((got[~nan].float() - torch_path[~nan].float()).abs() <= step).all())
    else:
        assert torch.equal(got[~nan], torch_path[~nan])


@pytest.mark.skipif(fp8_cuda._triton is None, reason="needs triton")
@pytest.mark.parametrize("spec", DEQ_SPECS, ids=lambda s: f"{s.weights}{s.block or ''}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scratch", [None, 64 * 200 * 2], ids=["one-chunk", "chunks-of-64"])
def test_dequant_mm(spec: FP8Spec, dtype: torch.dtype, scratch: int | None) -> None:
    """77 x 200 (partial row and column blocks; chunks of 64 rows start inside a 48-row block), M=70,
    with a bias, against float64."""
    layer = make_layer(77, 200, spec, seed=3)
    bias = torch.randn(77, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    x = _inputs(70, 200, dtype)
    y = fp8_cuda._triton.dequant_mm(x, layer.weight, layer.weight_scale, spec, bias, scratch_bytes=scratch)
    assert y.dtype == dtype and y.shape == (70, 77)
    assert rel_err(y, reference(layer, x) + bias.double()) < TOL[dtype]


@pytest.mark.skipif(fp8_cuda._triton is None, reason="needs triton")
def test_w8a16_dispatch() -> None:
    """M <= MAX_M takes the tl.dot kernel, larger M the dequantize + cuBLAS path; both agree."""
    layer = make_layer(96, 256, BLOCK)
    max_m = fp8_cuda._triton.MAX_M
    small, large = _inputs(max_m, 256, torch.float16), _inputs(max_m + 1, 256, torch.float16)
    assert fp8_cuda.w8a16_path(small, BLOCK, 256) == "dot"
    assert fp8_cuda.w8a16_path(large, BLOCK, 256) == "dequant"
    for x in (small, large):
        for path in ("dot", "dequant"):
            y = fp8_cuda.w8a16_linear(x, layer.weight, layer.weight_scale, BLOCK, None, path)
            assert y is not None and rel_err(y, reference(layer, x)) < TOL[torch.float16]


def _traced(fn, *args):  # noqa: ANN001, ANN002
    """fn(*args) under torch.compile(fullgraph=True), and the calls of the graph it traced."""
    graphs: list[torch.fx.GraphModule] = []

    def keep(gm: torch.fx.GraphModule, _inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=keep, fullgraph=True)(*args)
    calls = [str(n.target) for g in graphs for n in g.graph.nodes if n.op.startswith("call_")]
    return out, calls


GROUPED = FP8Spec("block", "dynamic-group", (32, 64), 64)


@pytest.mark.skipif(fp8_cuda._triton is None, reason="needs triton")
@pytest.mark.parametrize("spec,mode", [(BLOCK, "bf16"), (GROUPED, "quantize")], ids=["w8a16", "w8a8"])
@pytest.mark.parametrize("m", [5, 200], ids=["tl.dot", "dequant"])
def test_layer_under_torch_compile_is_one_custom_op(spec: FP8Spec, mode: str, m: int) -> None:
    """While torch.compile traces, the layer's GPU forward is the opaque op ``nvfp4_fix::fp8_linear``
    (one graph, no dequantized weight in it; the path is chosen when it runs) with the eager output, the
    float64 reference's within tolerance; opcheck validates the op's fake and AOT dispatch."""
    layer = make_layer(96, 256, spec)
    layer.activation_mode = mode
    layer.bias = torch.nn.Parameter(torch.randn(96).to(DEVICE, torch.float16), requires_grad=False)
    x = _inputs(m, 256, torch.float16)
    with torch.no_grad():
        eager = fp8_cuda.layer_forward(layer, x)
        compiled, calls = _traced(lambda x: fp8_cuda.layer_forward(layer, x), x)
    quantized = layer.prepare_input(x) if mode == "quantize" else x
    assert rel_err(eager, reference(layer, quantized) + layer.bias.double()) < TOL[torch.float16]
    assert torch.equal(compiled, eager)
    assert [c for c in calls if c != "reshape"] == ["nvfp4_fix.fp8_linear"], calls
    args = (x, layer.weight, layer.weight_scale, None, layer.bias, spec.weights, spec.activations,
            list(spec.block or []), spec.group_size or 0, mode == "quantize")  # fmt: skip
    # schema check mode is left out: it intercepts Triton's interpreter's own fp8 tensor ops on the CPU
    checks = ("test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.nvfp4_fix.fp8_linear, args, test_utils=checks)


@pytest.mark.parametrize("spec", [BLOCK, FP8Spec("channel", "dynamic-token")], ids=lambda s: s.activations)
def test_gradient_flows_through_the_gpu_forward(spec: FP8Spec) -> None:
    """Training through a layer (LoRA on a mixed checkpoint): the GPU forward takes the differentiable
    path (the kernels have no backward), activation quantization is straight-through, and x's gradient
    is dy @ W against the float64 reference, through the GPU forward and the module's own."""
    layer = make_layer(96, 256, spec)
    dy = _inputs(6, 96, torch.float32, seed=7)
    for forward in (lambda x: fp8_cuda.layer_forward(layer, x), layer):  # the GPU forward, the module's
        x = _inputs(6, 256, torch.float32).requires_grad_()
        forward(x).backward(dy)
        assert x.grad is not None
        assert rel_err(x.grad, dy.double() @ reference_weight(layer)) < 1e-5


@pytest.mark.parametrize(
    "spec",
    [FP8Spec("tensor", "static"), FP8Spec("channel", "dynamic-token"), FP8Spec("tensor", "dynamic-tensor")],
    ids=lambda s: s.activations,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scaled_mm_codes_are_the_emulations(spec: FP8Spec, dtype: torch.dtype) -> None:
    """codes * scale from the _scaled_mm path equal fake_quantize_fp8 bit for bit (all-zero row too)."""
    x = _inputs(9, 64, dtype) * 3
    x[4] = 0
    s_in = torch.tensor([0.02], device=DEVICE)
    q, s = fp8_cuda.quantize_activations(x, spec, s_in)
    assert q.dtype == torch.float8_e4m3fn and q.is_contiguous()
    assert torch.equal(q.to(dtype) * s, fake_quantize_fp8(x, spec, s_in))


ROW_SPECS = [
    (FP8Spec("tensor", "static"), "tensor"),
    (FP8Spec("tensor", "dynamic-tensor"), "tensor"),
    (FP8Spec("channel", "dynamic-token"), "row"),
    (FP8Spec("channel", "static"), "row"),
    (FP8Spec("tensor", "dynamic-token"), "row"),
]


@pytest.mark.parametrize(
    "spec,scaling", ROW_SPECS, ids=[f"{s.weights}-{s.activations}" for s, _ in ROW_SPECS]
)
@pytest.mark.parametrize("m", [1, 7, 33])
def test_scaled_mm_linear_matches_float64(spec: FP8Spec, scaling: str, m: int) -> None:
    """The operands and scale shapes handed to torch._scaled_mm (run by the CPU's implementation where
    there is no GPU) against float64 on the emulation's quantized input."""
    layer = make_layer(256, 512, spec)
    x = _inputs(m, 512, torch.bfloat16, seed=m)
    try:
        y = fp8_cuda.scaled_mm_linear(
            x, layer.weight, layer.weight_scale, layer.input_scale, spec, scaling, None
        )
    except (RuntimeError, NotImplementedError) as err:
        pytest.skip(f"this torch has no _scaled_mm on {x.device}: {err}")
    assert y.dtype == torch.bfloat16 and y.shape == (m, 256)
    assert rel_err(y, reference(layer, layer.prepare_input(x))) < TOL[torch.bfloat16]


GPU_SPECS = [
    FP8Spec("tensor", "static"),
    FP8Spec("tensor", "dynamic-tensor"),
    FP8Spec("channel", "dynamic-token"),
    FP8Spec("tensor", "dynamic-token"),
    FP8Spec("channel", "static"),
    FP8Spec("block", "dynamic-group", (128, 128), 128),
]


GPU_CASES = [
    (spec, shape, dtype, m)
    for spec in GPU_SPECS
    for shape in [(4096, 4096), (6144, 5120), (4096, 14336)]
    for dtype in (torch.bfloat16, torch.float16)
    for m in (1, 16, 64, 128, 300)
]


@functools.lru_cache(maxsize=1)
def _gpu_layer(spec: FP8Spec, n: int, k: int) -> FP8Linear:
    return make_layer(n, k, spec, seed=n + k)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(
    "spec,shape,dtype,m",
    GPU_CASES,
    ids=[f"{s.weights}-{s.activations}-{n}x{k}-{str(d)[6:]}-M{m}" for s, (n, k), d, m in GPU_CASES],
)
def test_gpu_full_shapes(spec, shape, m, dtype, monkeypatch) -> None:  # noqa: ANN001
    """Both modes of the layer at Llama-8B / 27B-like shapes: W8A16 (Triton tl.dot for M <= MAX_M, the
    Triton dequantization + cuBLAS above) and the checkpoint's activation quantization (_scaled_mm where
    it reproduces it, else the emulation), each against float64."""
    n, k = shape
    layer = _gpu_layer(spec, n, k)
    x = _inputs(m, k, dtype, seed=m)
    calls: list[str] = []
    real_mm, real_tr, real_dq = torch._scaled_mm, fp8_cuda._triton.fp8_linear, fp8_cuda._triton.dequant_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: (calls.append("mm"), real_mm(*a, **kw))[1])
    monkeypatch.setattr(fp8_cuda._triton, "fp8_linear", lambda *a: (calls.append("tr"), real_tr(*a))[1])
    monkeypatch.setattr(fp8_cuda._triton, "dequant_mm", lambda *a: (calls.append("dq"), real_dq(*a))[1])
    layer.activation_mode = "bf16"
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == dtype and rel_err(y, reference(layer, x)) < TOL[dtype]
    assert calls == (["tr"] if m <= fp8_cuda._triton.MAX_M else ["dq"]), calls
    calls.clear()
    layer.activation_mode = "quantize"
    with torch.no_grad():
        y = layer(x)
        emulated = layer.prepare_input(x)
    assert rel_err(y, reference(layer, emulated)) < TOL[dtype]
    scaling = fp8_cuda.scaled_mm_scaling(spec, x, n)
    if torch.cuda.get_device_capability() == (9, 0) and dtype == torch.bfloat16:
        assert (scaling is not None) == (spec.weights != "block")  # an H100 takes every such kind
    assert ("mm" in calls) == (scaling is not None)
    with settings.override(fp8_scaled_mm=False), torch.no_grad():
        assert rel_err(layer(x), reference(layer, emulated)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(
    "spec",
    [
        FP8Spec("channel", "dynamic-token"),
        FP8Spec("tensor", "static"),
        FP8Spec("block", "dynamic-group", (128, 128), 128),
    ],
    ids=lambda s: f"{s.weights}-{s.activations}",
)
@pytest.mark.parametrize("mode", ["quantize", "bf16"])
@pytest.mark.parametrize("m", [1, 300])
def test_gpu_layer_under_torch_compile(spec: FP8Spec, mode: str, m: int) -> None:
    """An FP8 layer traced by torch.compile (fullgraph) keeps its GPU kernels as the custom op, not the
    dequantizing torch path, and gives the eager output."""
    layer = _gpu_layer(spec, 4096, 4096)
    layer.activation_mode = mode
    x = _inputs(m, 4096, torch.bfloat16, seed=m)
    with torch.no_grad():
        eager = layer(x)
        compiled, calls = _traced(layer, x)
    assert "nvfp4_fix.fp8_linear" in calls, calls
    assert rel_err(compiled, eager) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("spec", [FP8Spec("channel", "dynamic-token"), BLOCK], ids=lambda s: s.weights)
@pytest.mark.parametrize("mode", ["quantize", "bf16"])
@pytest.mark.parametrize("m", [1, 128])
def test_gpu_layer_in_a_cuda_graph(spec: FP8Spec, mode: str, m: int) -> None:
    """Calls replay in a CUDA graph with new inputs (no host sync on any path: _scaled_mm, tl.dot,
    dequantize + cuBLAS)."""
    layer = make_layer(1024, 2048, spec)
    layer.activation_mode = mode
    x = _inputs(m, 2048, torch.bfloat16)
    with torch.no_grad():
        layer(x)  # compile the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        x.copy_(_inputs(m, 2048, torch.bfloat16, seed=7))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, layer(x))


DQ_GPU_SPECS = [GPU_SPECS[0], GPU_SPECS[2], GPU_SPECS[5]]  # per tensor, per channel, 128 x 128 blocks


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("spec", DQ_GPU_SPECS, ids=lambda s: s.weights)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_dequantize_rows_full(spec: FP8Spec, dtype: torch.dtype) -> None:
    """The 8B gate_up (28672 x 4096) holding every e4m3 byte, and rows from an odd offset: bit-equal to
    fp8.dequantize_fp8, and float32 within 1e-6 of float64."""
    layer = _all_codes(make_layer(28672, 4096, spec, seed=5))
    ref = reference_weight(layer)
    for r0, r1 in ((0, 28672), (77, 28000)):
        got = fp8_cuda._triton.dequantize_rows(layer.weight, layer.weight_scale, spec, dtype, r0, r1 - r0)
        nan = ref[r0:r1].isnan()
        assert torch.equal(got.isnan(), nan)
        want = dequantize_fp8(layer.weight, layer.weight_scale, spec, dtype, (r0, r1))
        assert torch.equal(got[~nan], want[~nan])
        if dtype == torch.float32:
            assert rel_err(got.double()[~nan], ref[r0:r1][~nan]) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("spec", [*DQ_GPU_SPECS, ODD_BLOCK], ids=lambda s: f"{s.weights}{s.block or ''}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("scratch", [None, 1 << 20], ids=["one-chunk", "1MiB-chunks"])
def test_gpu_dequant_mm_odd(spec: FP8Spec, dtype: torch.dtype, scratch: int | None) -> None:
    """1000 x 1000 (partial 128 x 128 blocks; 1 MiB chunks of 256 / 512 rows), M = 300, bias, against
    float64."""
    layer = make_layer(1000, 1000, spec, seed=6)
    bias = torch.randn(1000, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    x = _inputs(300, 1000, dtype)
    y = fp8_cuda._triton.dequant_mm(x, layer.weight, layer.weight_scale, spec, bias, scratch_bytes=scratch)
    assert y.dtype == dtype and y.shape == (300, 1000)
    tol = TOL.get(dtype, 1e-5)
    assert rel_err(y, reference(layer, x) + bias.double()) < tol
