"""Every NVFP4 backend through the one dispatch, on a CUDA card, against the independent float64
reference of test_kernels.py, at issue 18's shapes: odd N with K not a multiple of 128 (K = 2064, which
Humming pads to a multiple of 128), full Llama-3-8B layers, M from decode to prefill, bf16 and fp16.
Humming cannot run an N that is not a multiple of 8 (333): there the forced ``humming`` kernel must
raise the refusal of ``humming.shape_refusal`` (and auto with Humming on must match the reference);
2880 x 2064 is a shape Humming runs after padding N to 2944 and K to 2176.

Before every call the block the output will land in is filled with NaN (the caching allocator hands a
freed block of the same size to the next allocation of that size), and every output element must be
finite, so an output a kernel leaves partly unwritten fails. Humming cases run where humming-kernels is
installed. CUDA-graph capture and torch.compile of ``auto`` run with Humming off and on; the
fallbacks run for real: a weight Humming refuses (per-row multipliers that differ) and an interpreter
where humming-kernels cannot be imported. The selection logic itself is tested on the CPU in
test_selection.py."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from test_kernels import TOL, make_weight, make_x, ref_linear_f64, rel_err

import nvfp4_fix.kernels as K
from nvfp4_fix import settings
from nvfp4_fix.kernels import humming as H

HAS_HUMMING = importlib.util.find_spec("humming") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_humming = pytest.mark.skipif(not HAS_HUMMING, reason="needs humming-kernels")

BF16, FP16 = torch.bfloat16, torch.float16
#: (M, N, K, dtype): odd N with K % 128 != 0 at four M, both dtypes; then the 8B q/k/v (fused), o,
#: gate_up (fused) and down layers at a decode and a prefill M
CASES = [
    (m, n, k, dt) for n, k in ((1000, 1520), (333, 2064)) for dt in (BF16, FP16) for m in (1, 7, 64, 300)
]
CASES += [
    (m, n, k, BF16) for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)) for m in (1, 300)
]
CASES += [(m, 4096, 4096, FP16) for m in (1, 300)]
CASES += [(m, 2880, 2064, BF16) for m in (1, 300)]
CASES += [(24, 28672, 4096, BF16), (40, 28672, 4096, FP16)]  # sm_90: auto takes cuda_tile


def weight(n: int, k: int, device: str = "cuda"):
    """test_kernels' random weight with the block scales made positive (as producers write them):
    all 16 codes, e4m3 scales over their range, subnormals included."""
    wp, ws, mul = make_weight(n, k, device, seed=n * 7 + k)
    return wp, (ws.view(torch.uint8) & 0x7F).view(torch.float8_e4m3fn), mul


def backends(m: int, k: int) -> list[tuple[str, dict]]:
    """(label, nvfp4_linear keyword arguments / settings) for every backend that takes this call."""
    out = [("auto", {"humming": False}), ("reference", {"kernel": "reference"})]
    out += [
        ("chunked", {"kernel": "chunked", "cpu_compile": False}),
        ("dequant_mm", {"kernel": "dequant_mm"}),
    ]
    out += [("triton_mm", {"kernel": "triton_mm"})]
    if m <= 7:
        out.append(("triton_gemv", {"kernel": "triton_gemv"}))
    if m <= 16 and k % 128 == 0 and torch.cuda.get_device_capability() >= (8, 0):
        out.append(("cuda_mma", {"kernel": "cuda_mma"}))
    if 9 <= m <= 512 and k % 128 == 0 and torch.cuda.get_device_capability() >= (8, 0):
        out.append(("cuda_tile", {"kernel": "cuda_tile"}))
    if HAS_HUMMING:
        out += [("auto+humming", {"humming": True}), ("humming", {"kernel": "humming"})]
    return out


def run(x, wp, ws, mul, opts: dict) -> torch.Tensor:
    poison = torch.full((x.shape[0], wp.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    del poison
    kernel = opts.get("kernel")
    with settings.override(humming=opts.get("humming", False), cpu_compile=opts.get("cpu_compile", True)):
        return K.nvfp4_linear(x, wp, ws, mul, kernel=kernel)


@pytest.mark.parametrize("m, n, k, dtype", CASES)
def test_every_backend_matches_reference(m, n, k, dtype):
    wp, ws, mul = weight(n, k)
    x = make_x(m, k, dtype, "cuda")
    ref = ref_linear_f64(x, wp, ws, mul)
    refusal = H.shape_refusal(n, k)
    errors: dict[str, float | str] = {}
    refused: list[str] = []
    for label, opts in backends(m, k):
        try:
            y = run(x, wp, ws, mul, opts)
        except Exception as err:  # one backend's failure must not hide the others' results
            if label == "humming" and isinstance(err, RuntimeError) and str(err) == refused_text(n, k):
                refused.append(label)
            else:
                errors[label] = f"{type(err).__name__}: {str(err)[:300]}"
            continue
        assert y.shape == (m, n) and y.dtype == dtype, label
        errors[label] = rel_err(y, ref) if torch.isfinite(y).all() else "non-finite output"
        if label == "humming" and refusal is not None:
            errors[label] = f"ran a shape shape_refusal refuses ({refusal}): {errors[label]}"
    bad = {b: e for b, e in errors.items() if isinstance(e, str) or not e < TOL[dtype]}
    assert not bad, f"tolerance {TOL[dtype]}: failed {bad} (all: {errors})"
    assert refused == (["humming"] if refusal is not None and HAS_HUMMING else []), errors


def refused_text(n: int, k: int) -> str | None:
    """The forced ``humming`` kernel's error for a shape Humming cannot run; None for other shapes."""
    reason = H.shape_refusal(n, k)
    return None if reason is None else f"kernel 'humming' cannot run this {n}x{k} weight: {reason}"


@pytest.mark.parametrize("humming", [False, True] if HAS_HUMMING else [False])
@pytest.mark.parametrize("m", [4, 64])
def test_auto_in_cuda_graph_and_compiled(m, humming):
    """2880 x 1520 (small class): with Humming on the table sends M = 64 to it, M = 4 to Triton."""
    n, k = 2880, 1520
    wp, ws, mul = weight(n, k)
    x = make_x(m, k, torch.bfloat16, "cuda")
    with settings.override(humming=humming):
        kernel = K.select_kernel(x, n, k)
        assert kernel == ("humming" if humming and m == 64 else "triton_mm")
        eager = K.nvfp4_linear(x, wp, ws, mul)  # JIT and Humming's plan outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = K.nvfp4_linear(x, wp, ws, mul)
        x.copy_(make_x(m, k, torch.bfloat16, "cuda"))
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = ref_linear_f64(x, wp, ws, mul)
        assert torch.isfinite(y).all() and rel_err(y, ref) < TOL[torch.bfloat16], kernel
        compiled = torch.compile(lambda a: K.nvfp4_linear(a, wp, ws, mul), fullgraph=True)
        yc = compiled(x)
        assert torch.isfinite(yc).all() and rel_err(yc, ref) < TOL[torch.bfloat16], kernel
    assert torch.isfinite(eager).all()


@needs_humming
def test_refused_weight_falls_back(caplog):
    """Humming takes one per-tensor multiplier: a weight with per-row multipliers that differ is
    refused when its plan is built, logged once, and auto computes it with our kernels."""
    n, k, m = 2880, 1520, 64
    wp, ws, mul = weight(n, k)
    rows = mul * (torch.rand(n, device="cuda") + 0.5)
    x = make_x(m, k, torch.bfloat16, "cuda")
    with settings.override(humming=True), caplog.at_level(logging.WARNING, logger="nvfp4_fix.kernels"):
        assert K.select_kernel(x, n, k) == "humming"
        y = run(x, wp, ws, rows, {"humming": True})
        y2 = run(x, wp, ws, rows, {"humming": True})
    ref = ref_linear_f64(x, wp, ws, rows[:, None])
    assert rel_err(y, ref) < TOL[torch.bfloat16] and rel_err(y2, ref) < TOL[torch.bfloat16]
    assert sum(f"Humming cannot run a {n}x{k} weight" in r.message for r in caplog.records) == 1


def test_missing_humming_falls_back_on_the_gpu():
    """An interpreter where ``import humming`` fails: auto with Humming on reports it and computes
    with our kernels (compared with the reference kernel in the same process)."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["humming"] = None  # import humming raises ImportError, as when not installed
        import logging, torch
        logging.basicConfig(level=logging.INFO)
        from nvfp4_fix import settings
        import nvfp4_fix.kernels as K
        g = torch.Generator(device="cuda").manual_seed(0)
        wp = torch.randint(0, 256, (1000, 760), dtype=torch.uint8, device="cuda", generator=g)
        ws = (torch.rand((1000, 95), device="cuda", generator=g) + 0.1).to(torch.float8_e4m3fn)
        mul = torch.tensor(0.01, device="cuda")
        x = torch.randn(64, 1520, dtype=torch.bfloat16, device="cuda", generator=g)
        with settings.override(humming=True):
            print("kernel", K.select_kernel(x, 1000, 1520))
            y = K.nvfp4_linear(x, wp, ws, mul).double()
        ref = K.nvfp4_linear(x, wp, ws, mul, kernel="reference").double()
        print("relerr", float((y - ref).norm() / ref.norm()))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kernel triton_mm" in res.stdout, res.stdout
    assert "humming-kernels is not installed" in res.stderr, res.stderr[-3000:]
    assert float(res.stdout.split("relerr")[-1]) < 1e-2
