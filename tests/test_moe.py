"""The grouped mixture-of-experts path: ``kernels/moe_grouped.py`` against an independent float64
reference (tests/reference.py decodes the codes and scales on its own), run on the CPU through Triton's
interpreter; ``NVFP4Experts`` through it on the shipped Qwen3-MoE fixtures; full Qwen3-30B-A3B shapes,
CUDA-graph capture and torch.compile on a GPU (marked ``gpu``).

Tolerance: the kernel multiplies exactly dequantized weights with the activations in fp32 (tl.dot, fp32
accumulation); against float64 the error is summation order plus one rounding of the output: relative
1e-5 for float32 activations, 1e-2 for bf16 (8 mantissa bits).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from cuda_graphs import captured
from reference import dequantize_np

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
CUDA = torch.cuda.is_available()
silu = torch.nn.functional.silu
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def random_experts(e: int, n: int, k: int, parts: int, seed: int, device: str = "cpu"):
    """Random packed experts: codes [E, N, K/2], e4m3 scales [E, N, K/16], multipliers [E, parts]."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.uint8)
    scales = (torch.rand(e, n, k // 16, generator=g) * 2 + 0.05).to(torch.float8_e4m3fn)
    mul = torch.rand(e, parts, generator=g) * 0.02 + 0.001  # every expert and part its own
    return codes.to(device), scales.to(device), mul.to(device)


def reference_weights(codes, scales, mul, rows_per_part: int) -> np.ndarray:
    """float64 [E, N, K] from the independent decoder; part p of N scaled by mul[e, p]."""
    out = []
    for e in range(codes.shape[0]):
        w = dequantize_np(
            codes[e].cpu().numpy(), scales[e].cpu().view(torch.uint8).numpy(), 1.0, "multiplier"
        )
        part = np.minimum(np.arange(w.shape[0]) // rows_per_part, mul.shape[1] - 1)
        out.append(w * mul[e].cpu().double().numpy()[part][:, None])
    return np.stack(out)


def rel(a: torch.Tensor, b: np.ndarray) -> float:
    a64 = a.detach().cpu().double().numpy()
    return float(np.linalg.norm(a64 - b) / np.linalg.norm(b))


def test_route_sorts_pairs_by_expert_and_pads_each_run():
    from nvfp4_fix.kernels.moe_route import route

    idx = torch.tensor([[3, 0], [3, 1], [0, 3], [5, 3], [1, 1]])  # 5 = no expert (E = 4): skipped
    plan = route(idx, 4, 4)
    pairs, blocks = plan.pairs.view(-1, 4), plan.block_expert
    flat = idx.reshape(-1)
    seen = []
    for b in range(blocks.numel()):
        real = [int(p) for p in pairs[b] if p < plan.num_pairs]
        if blocks[b] < 4:
            assert all(int(flat[p]) == int(blocks[b]) for p in real)
            seen += real
        else:  # blocks the kernel skips: only pairs routed to no expert
            assert all(int(flat[p]) >= 4 for p in real)
    assert sorted(seen) == [i for i in range(10) if flat[i] < 4]  # each routed pair exactly once


@pytest.mark.parametrize("block_m", [8, 16, 64])
@pytest.mark.parametrize(
    "t,topk,e,ids_dtype",
    [(1, 8, 128, torch.int64), (16, 8, 128, torch.int64), (33, 4, 8, torch.int32), (300, 2, 60, torch.int64)],
    ids=["T1", "T16", "skewed-int32", "T300"],
)
def test_route_kernel_equals_torch_route(block_m, t, topk, e, ids_dtype):
    """``route``'s one-program kernel (here through Triton's interpreter) lays the pairs out exactly as
    the torch ops do: same pair order, padding and block experts, with ids outside [0, E) and ids read
    column-major through their strides."""
    from nvfp4_fix import settings
    from nvfp4_fix.kernels import moe_route as mr

    if not mr._INTERPRET:
        pytest.skip("the kernel runs on the CPU only under TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(t + e)
    idx = torch.stack([torch.randperm(e, generator=g)[:topk] for _ in range(t)])
    if t == 33:
        idx = torch.arange(topk).repeat(t, 1)  # every token on the same experts: several blocks each
    idx[0, -1], idx[-1, 0] = e, -1  # routed to no expert
    ids = idx.to(ids_dtype).T.contiguous().T
    assert t * topk <= mr.ROUTE_KERNEL_MAX_PAIRS
    with settings.override(moe_route_kernel=True):
        got = mr.route(ids, e, block_m)
    want = mr.route_torch(idx, e, block_m)
    assert got.num_pairs == want.num_pairs == t * topk and got.block_m == block_m
    torch.testing.assert_close(got.block_expert, want.block_expert, rtol=0, atol=0)
    torch.testing.assert_close(got.pairs, want.pairs, rtol=0, atol=0)


def test_route_kernel_traces_as_one_op_under_torch_compile():
    """fullgraph tracing of the one-program route: the opaque op torch.ops.nvfp4_fix.moe_route, equal to
    the eager call."""
    from nvfp4_fix import settings
    from nvfp4_fix.kernels import moe_route as mr

    if not mr._INTERPRET:
        pytest.skip("the kernel runs on the CPU only under TRITON_INTERPRET=1")
    idx = torch.randint(0, 16, (6, 4), generator=torch.Generator().manual_seed(0))
    idx[2, 1] = 16
    seen = []

    def backend(gm, inputs):
        seen.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    with settings.override(moe_route_kernel=True):
        fn = torch.compile(lambda ids: mr.route(ids, 16, 8).pairs, backend=backend, fullgraph=True)
        got = fn(idx)
    op = torch.ops.nvfp4_fix.moe_route
    assert op in seen or op.default in seen, seen
    torch.testing.assert_close(got, mr.route_torch(idx, 16, 8).pairs, rtol=0, atol=0)


@pytest.mark.parametrize("block_m", [1, 16, 64], ids=lambda b: "indexed" if b == 1 else f"grouped{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "t,topk,e,n,k,parts", [(5, 3, 4, 96, 256, 2), (1, 2, 6, 64, 160, 1), (40, 2, 3, 48, 128, 2)]
)
def test_expert_mm_matches_float64_reference(block_m, dtype, t, topk, e, n, k, parts):
    from nvfp4_fix.kernels.moe_grouped import expert_mm
    from nvfp4_fix.kernels.moe_route import route

    codes, scales, mul = random_experts(e, n, k, parts, seed=t * 7 + e)
    rows = n // parts
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, k, generator=g).to(dtype)
    idx = torch.randint(0, e, (t, topk), generator=g)
    idx[0, -1] = e  # a pair routed to no expert: its output row stays zero
    plan = route(idx, e, block_m)
    y = expert_mm(x, topk, plan, codes, scales, mul, rows)
    w = reference_weights(codes, scales, mul, rows)
    x64 = x.double().numpy()
    want = np.zeros((t * topk, n))
    for p, ex in enumerate(idx.reshape(-1).tolist()):
        if ex < e:
            want[p] = w[ex] @ x64[p // topk]
    assert y.dtype == dtype and y.shape == (t * topk, n)
    assert rel(y, want) <= TOL[dtype]
    assert torch.all(y[topk - 1] == 0)


def test_expert_mm_refuses_mismatched_weights():
    from nvfp4_fix.kernels.moe_grouped import expert_mm
    from nvfp4_fix.kernels.moe_route import route

    codes, scales, mul = random_experts(2, 32, 64, 1, seed=0)
    with pytest.raises(ValueError, match="scales"):
        plan = route(torch.zeros(1, 1, dtype=torch.long), 2, 16)
        expert_mm(torch.randn(1, 64), 1, plan, codes, scales[:, :, :2], mul, 32)


# --------------------------------------------------------------------------------------------------
# NVFP4Experts through the grouped kernel: the shipped Qwen3-MoE fixtures
# --------------------------------------------------------------------------------------------------
FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"
MOE = [FIXTURES / "current" / "qwen3_moe-nvfp4a16", FIXTURES / "current" / "qwen3_moe-nvfp4",
       FIXTURES / "modelopt" / "qwen3_moe-nvfp4"]  # fmt: skip
needs_transformers5 = pytest.mark.skipif(
    int(__import__("transformers").__version__.split(".")[0]) < 5, reason="fused MoE experts: transformers 5"
)


@pytest.fixture
def grouped_on_cpu(monkeypatch):
    """Send CPU experts to the grouped kernels (Triton's interpreter); record their calls: "mm" per
    grouped projection, "decode" per fused decode experts call (kernels/moe_decode.py)."""
    from nvfp4_fix import expert_stack
    from nvfp4_fix.kernels import moe_decode, moe_grouped

    calls: list[str] = []

    def spy(name, real):
        def call(*a, **kw):
            calls.append(name)
            return real(*a, **kw)

        return call

    monkeypatch.setattr(expert_stack, "GROUPED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(moe_grouped, "expert_mm", spy("mm", moe_grouped.expert_mm))
    monkeypatch.setattr(moe_decode, "decode_experts", spy("decode", moe_decode.decode_experts))
    return calls


def _ids(path, n: int = 9):
    g = torch.Generator().manual_seed(5)
    return torch.randint(3, 300, (2, n), generator=g)


@needs_transformers5
@pytest.mark.parametrize("path", [p for p in MOE if p.is_dir()], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_grouped_experts_match_the_float64_reference(path, grouped_on_cpu):
    from reference import reference_model, rel_err

    from nvfp4_fix.kernels.moe_grouped import block_m_for
    from nvfp4_fix.loading import from_pretrained
    from nvfp4_fix.moe import NVFP4Experts

    ref = reference_model(path)
    model = from_pretrained(path, dtype=torch.float32, activations="bf16")
    blocks = [m for m in model.modules() if isinstance(m, NVFP4Experts)]
    topk = model.config.num_experts_per_tok
    for n in (9, 40):  # 36 pairs: the fused decode kernels; 160: tiles of pairs grouped by expert
        assert (block_m_for(2 * n * topk) == 1) == (n == 9)
        ids = _ids(path, n)
        grouped_on_cpu.clear()
        with torch.no_grad():
            want = ref(input_ids=ids).logits.double()
            got = model(input_ids=ids).logits
        assert blocks and all(b.stacked() is not None for b in blocks)
        per_block = ["decode"] if n == 9 else ["mm", "mm"]  # fused decode; or gate_up and down
        assert grouped_on_cpu == per_block * len(blocks)
        assert rel_err(got, want) < 1e-4
    # the stacked buffers hold the experts' own bytes: state_dict is unchanged (copies, not views)
    sd = model.state_dict()
    key = next(k for k in sd if ".experts.1.down" in k and k.endswith(("weight_packed", ".weight")))
    assert sd[key].dtype == torch.uint8 and sd[key].untyped_storage().nbytes() == sd[key].nbytes


@needs_transformers5
def test_fast_generation_of_the_moe_fixture_through_the_grouped_experts(grouped_on_cpu):
    """The static-cache decode loop (the step a CUDA graph captures) with the experts on the grouped
    kernels emits model.generate's greedy tokens (batch 2)."""
    from reference import hf_greedy

    from nvfp4_fix.generation import generate
    from nvfp4_fix.loading import from_pretrained

    model = from_pretrained(FIXTURES / "current" / "qwen3_moe-nvfp4a16", dtype=torch.float32)
    ids = _ids(None, 11)
    got = generate(model, ids, 12, use_cuda_graph=False, stop_token_ids=())
    assert grouped_on_cpu
    assert got.tolist() == hf_greedy(model, ids, 12).tolist()


@needs_transformers5
def test_w4a4_experts_quantize_each_pair_with_its_experts_scale(grouped_on_cpu, monkeypatch):
    """W4A4 with activation quantization: the grouped path equals the per-expert loop (each projection
    quantizes its input with its own scale); different gate and up scales are kept."""
    from nvfp4_fix import expert_stack
    from nvfp4_fix.loading import from_pretrained

    path = FIXTURES / "current" / "qwen3_moe-nvfp4"
    if not path.is_dir():
        pytest.skip("no W4A4 Qwen3-MoE fixture")
    ids = _ids(path)
    model = from_pretrained(path, dtype=torch.float32)  # activations="quantize"
    with torch.no_grad():
        grouped = model(input_ids=ids).logits
        assert grouped_on_cpu
        monkeypatch.setattr(expert_stack, "GROUPED_DEVICES", ())
        loop = model(input_ids=ids).logits
    torch.testing.assert_close(grouped, loop, rtol=1e-4, atol=1e-4)
    st = next(m for m in model.modules() if hasattr(m, "stacked")).stacked()
    assert st is not None and st.divisors is not None


@needs_transformers5
def test_gate_and_up_global_scales_of_one_expert_may_differ(grouped_on_cpu, monkeypatch):
    """Give expert 1's up projection another global scale than its gate: the grouped output must follow
    (compared with the loop, which reads each layer's own scale)."""
    from nvfp4_fix import expert_stack
    from nvfp4_fix.loading import from_pretrained
    from nvfp4_fix.moe import NVFP4Experts

    path = FIXTURES / "current" / "qwen3_moe-nvfp4a16"
    model = from_pretrained(path, dtype=torch.float32)
    block = next(m for m in model.modules() if isinstance(m, NVFP4Experts))
    for e in range(block.num_experts):
        up = getattr(block._modules[str(e)], block.names["up"])
        with torch.no_grad():
            up._parameters[up._global_name].mul_(0.25 * (e + 1))
    ids = _ids(path)
    with torch.no_grad():
        grouped = model(input_ids=ids).logits
        st = block.stacked()
        assert st is not None and not torch.equal(st.gate_up_mul[:, 0], st.gate_up_mul[:, 1])
        monkeypatch.setattr(expert_stack, "GROUPED_DEVICES", ())
        loop = model(input_ids=ids).logits
    torch.testing.assert_close(grouped, loop, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("t", [3, 40], ids=["decode", "grouped"])
def test_grouped_forward_traces_whole_under_torch_compile(grouped_on_cpu, t):
    """No host sync and no graph break: fullgraph=True tracing succeeds (the kernels are the opaque ops
    torch.ops.nvfp4_fix.moe_decode_experts, or moe_expert_mm and moe_sum_pairs) and equals the eager
    result and the float64 reference (a pair routed to no expert adds nothing)."""
    from nvfp4_fix import expert_stack

    e, h, i, topk = 4, 64, 32, 2
    codes, scales, mul = random_experts(e, 2 * i, h, 2, seed=11)
    dcodes, dscales, dmul = random_experts(e, h, i, 1, seed=12)
    st = expert_stack.Stacked(codes, scales, mul, dcodes, dscales, dmul, None)

    g = torch.Generator().manual_seed(2)
    x = torch.randn(t, h, generator=g)
    idx = torch.randint(0, e, (t, topk), generator=g)
    idx[1, 0] = e
    w = torch.rand(t, topk, generator=g)
    seen = []

    def backend(gm, inputs):
        seen.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    def forward(a, k, ww):
        return expert_stack.grouped_forward(st, a, k, ww, silu, False)

    fn = torch.compile(forward, backend=backend, fullgraph=True)
    got = fn(x, idx, w)
    nv = torch.ops.nvfp4_fix
    ops = [nv.moe_decode_experts] if t == 3 else [nv.moe_expert_mm, nv.moe_sum_pairs]
    assert all(op.default in seen or op in seen for op in ops)
    torch.testing.assert_close(got, expert_stack.grouped_forward(st, x, idx, w, silu, False))
    wg, wd = reference_weights(codes, scales, mul, i), reference_weights(dcodes, dscales, dmul, h)
    x64 = x.double().numpy()
    want = np.zeros((t, h))
    for r in range(t):
        for k in range(topk):
            ex = int(idx[r, k])
            if ex < e:
                gu = wg[ex] @ x64[r]
                act = gu[:i] / (1 + np.exp(-gu[:i])) * gu[i:]
                want[r] += float(w[r, k]) * (wd[ex] @ act)
    assert rel(got, want) <= 1e-5


# --------------------------------------------------------------------------------------------------
# GPU: Qwen3-30B-A3B shapes, CUDA-graph capture, torch.compile
# --------------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
E30, H30, I30, TOPK30 = 128, 2048, 768, 8  # Qwen3-30B-A3B: experts, hidden, expert intermediate, routed


def _routing(t: int, seed: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E30, generator=g)[:TOPK30] for _ in range(t)])
    w = torch.rand(t, TOPK30, generator=g)
    return idx.to(device), (w / w.sum(1, keepdim=True)).to(device)


def _reference_rows(x, idx, codes, scales, mul, rows_per_part, x_div) -> np.ndarray:
    """float64 y[p] for every pair, dequantizing only the experts that were hit."""
    flat = idx.reshape(-1).cpu().tolist()
    x64 = x.double().cpu().numpy()
    out = np.zeros((len(flat), codes.shape[1]))
    for e in sorted(set(flat)):
        w = reference_weights(codes[e : e + 1], scales[e : e + 1], mul[e : e + 1], rows_per_part)[0]
        for p in (i for i, v in enumerate(flat) if v == e):
            out[p] = w @ x64[p // x_div]
    return out


@gpu
@needs_cuda
@pytest.mark.parametrize("t", [1, 16, 64])  # 8 pairs: indexed kernel; 128 and 512: grouped tiles
def test_gpu_qwen3_30b_shapes_match_float64(t):
    from nvfp4_fix.kernels.moe_grouped import block_m_for, expert_mm
    from nvfp4_fix.kernels.moe_route import route

    codes, scales, mul = random_experts(E30, 2 * I30, H30, 2, seed=t, device="cuda")
    dcodes, dscales, dmul = random_experts(E30, H30, I30, 1, seed=t + 1, device="cuda")
    x = torch.randn(t, H30, device="cuda", dtype=torch.bfloat16)
    idx, _ = _routing(t, seed=t)
    plan = route(idx, E30, block_m_for(t * TOPK30))
    gate_up = expert_mm(x, TOPK30, plan, codes, scales, mul, I30)
    assert rel(gate_up, _reference_rows(x, idx, codes, scales, mul, I30, TOPK30)) <= TOL[torch.bfloat16]
    h = torch.randn(t * TOPK30, I30, device="cuda", dtype=torch.bfloat16)
    down = expert_mm(h, 1, plan, dcodes, dscales, dmul, H30)
    assert rel(down, _reference_rows(h, idx, dcodes, dscales, dmul, H30, 1)) <= TOL[torch.bfloat16]


@gpu
@needs_cuda
@pytest.mark.parametrize("block_m", [1, 16])
def test_gpu_graph_capture_replays_any_routing(block_m):
    """One captured launch sequence (route + gate_up + down) serves every routing: replays with new
    expert ids in the same input tensors equal eager calls."""
    from nvfp4_fix.kernels.moe_grouped import expert_mm
    from nvfp4_fix.kernels.moe_route import route

    codes, scales, mul = random_experts(E30, 2 * I30, H30, 2, seed=3, device="cuda")
    x = torch.randn(1, H30, device="cuda", dtype=torch.bfloat16)
    idx, _ = _routing(1, seed=0)

    def step():
        return expert_mm(x, TOPK30, route(idx, E30, block_m), codes, scales, mul, I30)

    graph, out = captured(step)
    for seed in (1, 2, 3):
        new, _ = _routing(1, seed=seed)
        idx.copy_(new)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, step(), rtol=0, atol=0)


@gpu
@needs_cuda
@pytest.mark.parametrize("t", [4, 16], ids=["decode", "grouped"])
def test_gpu_compiled_grouped_forward_equals_eager(t):
    """grouped_forward under torch.compile (fullgraph: no host sync, the kernels as opaque ops)."""
    from nvfp4_fix import expert_stack

    codes, scales, mul = random_experts(E30, 2 * I30, H30, 2, seed=5, device="cuda")
    dcodes, dscales, dmul = random_experts(E30, H30, I30, 1, seed=6, device="cuda")
    st = expert_stack.Stacked(codes, scales, mul, dcodes, dscales, dmul, None)

    x = torch.randn(t, H30, device="cuda", dtype=torch.bfloat16)
    idx, w = _routing(t, seed=9)
    w = w.to(torch.bfloat16)
    eager = expert_stack.grouped_forward(st, x, idx, w, silu, False)
    fn = torch.compile(lambda a, i, ww: expert_stack.grouped_forward(st, a, i, ww, silu, False),
                       fullgraph=True)  # fmt: skip
    got = fn(x, idx, w).float()
    # grouped: Inductor fuses silu*up in float32 where eager rounds each op to bf16: a few elements
    # differ by one bf16 ulp of an intermediate (seen on an H100: 4 of 8192, 0.0156 absolute), so the
    # whole output is compared in norm (decode: one opaque op, expected equal).
    err = (got - eager.float()).norm() / eager.float().norm()
    assert err < 1e-2, err


@needs_transformers5
def test_inputs_that_need_a_gradient_take_the_differentiable_loop(grouped_on_cpu):
    """The grouped kernel has no backward: with grad enabled and an input that requires grad (adapters
    trained upstream), the experts run the per-expert loop, and the gradient reaches the input."""
    from nvfp4_fix.loading import from_pretrained
    from nvfp4_fix.moe import NVFP4Experts

    model = from_pretrained(FIXTURES / "current" / "qwen3_moe-nvfp4a16", dtype=torch.float32)
    block = next(m for m in model.modules() if isinstance(m, NVFP4Experts))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, block._modules["0"].gate_proj.in_features, generator=g, requires_grad=True)
    idx = torch.randint(0, block.num_experts, (5, 2), generator=g)
    w = torch.rand(5, 2, generator=g)
    loop = block(x, idx, w)
    loop.sum().backward()
    assert not grouped_on_cpu and x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    with torch.no_grad():
        grouped = block(x, idx, w)
    assert grouped_on_cpu
    torch.testing.assert_close(grouped, loop.detach(), rtol=1e-4, atol=1e-5)


@gpu
@needs_cuda
@needs_transformers5
@pytest.mark.parametrize("path", [p for p in MOE if p.is_dir()], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_gpu_moe_fixture_generates_in_a_cuda_graph(path):
    """The whole Qwen3-MoE fixture on the GPU: logits match the float64 reference, and the fast path
    captures the decode step (no host sync left in the experts) and emits model.generate's greedy tokens."""
    from reference import hf_greedy, reference_model, rel_err

    from nvfp4_fix.generation import generate
    from nvfp4_fix.loading import from_pretrained

    ids = _ids(path)
    with torch.no_grad():
        want = reference_model(path)(input_ids=ids).logits.double()
    model = from_pretrained(path, dtype=torch.float32, device_map="cuda", activations="bf16")
    with torch.no_grad():
        got = model(input_ids=ids.cuda()).logits.cpu()
    assert rel_err(got, want) < 1e-4
    stats: dict = {}
    out = generate(model, ids[:1], 24, stop_token_ids=(), stats=stats).cpu()
    assert stats["path"] == "cuda-graph", stats
    assert out.tolist() == hf_greedy(model, ids[:1], 24).tolist()


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "t,topk,e,block_m", [(1, 8, 128, 8), (16, 8, 128, 8), (200, 8, 128, 16), (512, 8, 128, 64)]
)
def test_gpu_route_kernel_equals_torch_route(t, topk, e, block_m):
    """The one-program route on the card (up to 4096 pairs: the largest sort it takes) lays the pairs out
    exactly as the torch ops do, with ids routed to no expert; also inside a CUDA graph replayed with new
    ids."""
    from cuda_graphs import captured

    from nvfp4_fix import settings
    from nvfp4_fix.kernels import moe_route as mr

    def routing(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        idx = torch.stack([torch.randperm(e, generator=g)[:topk] for _ in range(t)])
        idx[0, -1], idx[-1, 0] = e, -1
        return idx.cuda()

    idx = routing(0)
    with settings.override(moe_route_kernel=True):
        plan = mr.route(idx, e, block_m)
        graph, out = captured(lambda: mr.route(idx, e, block_m))
    want = mr.route_torch(idx, e, block_m)
    torch.testing.assert_close(plan.pairs, want.pairs, rtol=0, atol=0)
    torch.testing.assert_close(plan.block_expert, want.block_expert, rtol=0, atol=0)
    idx.copy_(routing(1))
    graph.replay()
    torch.testing.assert_close(out.pairs, mr.route_torch(idx, e, block_m).pairs, rtol=0, atol=0)
