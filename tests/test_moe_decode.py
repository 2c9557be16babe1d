"""The fused decode experts (``kernels/moe_decode.py``: gate + up + SiLU, then down times the routing
weight summed over each token's pairs, two Triton launches; ``kernels/cuda_moe.py`` on a GPU) and the
routing-weight epilogue of the grouped path, against an independent float64 MoE (tests/reference.py
decodes the experts; the loop below routes), on the CPU through Triton's interpreter; Qwen3-30B-A3B
shapes and CUDA-graph replay on a GPU.

Tolerance: weights are dequantized exactly and every sum is float32; against float64 the error is
summation order plus the rounding of act (gate/up/SiLU, once) and of the output to x's dtype: relative
1e-5 for float32 activations, 1e-2 for bf16 (8 mantissa bits), 5e-3 for fp16.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from cuda_graphs import captured

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}


def _experts(e: int, h: int, i: int, seed: int, device: str = "cpu"):
    from test_moe import random_experts

    from nvfp4_fix import expert_stack

    gate_up = random_experts(e, 2 * i, h, 2, seed=seed, device=device)  # gate, up: own multipliers
    down = random_experts(e, h, i, 1, seed=seed + 1, device=device)
    assert not torch.equal(gate_up[2][:, 0], gate_up[2][:, 1])
    return expert_stack.Stacked(*gate_up, *down, None)


def reference_moe(st, x, idx, w, act=lambda g: g / (1 + np.exp(-g))) -> np.ndarray:
    """float64 sum_k w[t, k] * down_e(act(gate_e(x_t)) * up_e(x_t)); ids outside [0, E) add nothing."""
    from test_moe import reference_weights

    e, two_i = st.gate_up_codes.shape[:2]
    i, h = two_i // 2, st.down_codes.shape[1]
    rows = idx.cpu().tolist()
    x64, w64 = x.double().cpu().numpy(), w.double().cpu().numpy()
    out = np.zeros((x.shape[0], h))
    for ex in sorted({ex for row in rows for ex in row if 0 <= ex < e}):  # one expert's weights at a time
        wg = reference_weights(st.gate_up_codes[ex : ex + 1], st.gate_up_scales[ex : ex + 1],
                               st.gate_up_mul[ex : ex + 1], i)[0]  # fmt: skip
        wd = reference_weights(st.down_codes[ex : ex + 1], st.down_scales[ex : ex + 1],
                               st.down_mul[ex : ex + 1], h)[0]  # fmt: skip
        for t, k in ((t, k) for t, row in enumerate(rows) for k, v in enumerate(row) if v == ex):
            gu = wg @ x64[t]
            out[t] += w64[t, k] * (wd @ (act(gu[:i]) * gu[i:]))
    return out


def rel(a: torch.Tensor, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.detach().cpu().double().numpy() - b) / np.linalg.norm(b))


def _routing(t: int, topk: int, e: int, seed: int, invalid: bool):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:topk] for _ in range(t)])
    if invalid:  # pairs routed to no expert, at both ends of the range
        idx[0, 1] = -1
        idx[-1, -1] = e
    w = torch.rand(t, topk, generator=g)
    return idx, w / w.sum(1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "t,topk,e,h,i",
    [(1, 8, 16, 128, 80), (8, 8, 12, 160, 48), (3, 2, 4, 64, 32), (2, 6, 10, 64, 32), (2, 20, 24, 48, 32)],
    ids=["T1", "T8", "T3", "K6", "K20"],
)
@pytest.mark.parametrize("invalid", [False, True], ids=["routed", "invalid-ids"])
def test_decode_experts_match_float64(dtype, t, topk, e, h, i, invalid):
    """I = 80 and 48 are odd multiples of 16 (the last column tile and K step are partial); H = 160 is
    not a multiple of the K step either. top-k 6 leaves pair slots of the down kernel empty; top-k 20
    takes it three passes (MAX_SLOTS = 8)."""
    from nvfp4_fix.kernels.moe_decode import decode_experts

    st = _experts(e, h, i, seed=t + i)
    idx, w = _routing(t, topk, e, seed=t, invalid=invalid)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(3)).to(dtype)
    w = w.to(dtype)  # transformers hands the routing weights over in the model's dtype
    gate_up = (st.gate_up_codes, st.gate_up_scales, st.gate_up_mul)
    got = decode_experts(x, idx, w, gate_up, (st.down_codes, st.down_scales, st.down_mul))
    assert got.dtype == dtype and got.shape == (t, h)
    assert rel(got, reference_moe(st, x, idx, w)) <= TOL[dtype]


def test_decode_experts_read_ids_and_weights_in_place():
    """int32 ids and weights given as transposed (non-contiguous) views: read through their strides."""
    from nvfp4_fix.kernels.moe_decode import decode_experts

    st = _experts(8, 64, 32, seed=4)
    idx, w = _routing(4, 4, 8, seed=2, invalid=True)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    idx_t, w_t = idx.T.contiguous().to(torch.int32).T, w.T.contiguous().T
    assert not idx_t.is_contiguous() and not w_t.is_contiguous()
    gate_up = (st.gate_up_codes, st.gate_up_scales, st.gate_up_mul)
    got = decode_experts(x, idx_t, w_t, gate_up, (st.down_codes, st.down_scales, st.down_mul))
    assert rel(got, reference_moe(st, x, idx, w)) <= 1e-5


@pytest.mark.parametrize(
    "act", ["nn.SiLU", "SiLUActivation", "F.silu", "gelu", "silu-lambda"], ids=lambda a: a.replace(".", "_")
)
@pytest.mark.parametrize("t,topk", [(1, 8), (8, 8), (20, 4)], ids=["T1", "T8", "T20-grouped"])
def test_grouped_forward_paths_match_float64_and_count_launches(act, t, topk):
    """grouped_forward: decode-sized SiLU routings take the fused kernels (exactly 2 launches, nothing
    else); other activations and larger routings the gate_up / down kernels, whose down epilogue
    weights the pairs (no zero fill, no cast launches). All against the float64 reference."""
    from launches import LaunchCounter
    from transformers.activations import ACT2FN

    from nvfp4_fix import expert_stack
    from nvfp4_fix.kernels.moe_decode import is_silu

    act_fn = {
        "nn.SiLU": torch.nn.SiLU(),
        "SiLUActivation": ACT2FN["silu"],
        "F.silu": torch.nn.functional.silu,
        "gelu": torch.nn.GELU(),
        "silu-lambda": lambda g: torch.nn.functional.silu(g),  # SiLU, but not recognised: the general path
    }[act]
    silu = act not in ("gelu", "silu-lambda")
    assert is_silu(act_fn) == silu
    e, h, i = 16, 64, 48
    st = _experts(e, h, i, seed=7)
    idx, w = _routing(t, topk, e, seed=t, invalid=True)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    w = w.to(torch.bfloat16)
    with torch.no_grad(), LaunchCounter() as count:
        got = expert_stack.grouped_forward(st, x, idx, w, act_fn, False)
    if act == "gelu":
        from math import erf

        ref_act = np.vectorize(lambda g: 0.5 * g * (1 + erf(g / np.sqrt(2))))
    else:
        ref_act = lambda g: g / (1 + np.exp(-g))  # noqa: E731
    # unrecognised: gate, up, act(gate) and their product each rounded to bf16 (eager torch ops)
    assert rel(got, reference_moe(st, x, idx, w, ref_act)) <= (TOL[torch.bfloat16] if silu else 2e-2)
    triton = [n for n in count.names if n.startswith("triton:")]
    if t * topk <= 64 and silu:
        assert count.names == [f"triton:_{k}_kernel" for k in ("gate_up_act", "down_sum")]
    elif t * topk <= 64:  # gate_up (+ its zero fill), act, mul, down (reads int64 ids: no cast), sum
        assert triton == [f"triton:_{k}_kernel" for k in ("pair_gemv", "pair_gemv", "sum_pairs")]
        assert count.total <= 6, count.names
    else:  # routing (one Triton program), then gate_up (SiLU in its epilogue unless unrecognised), down, sum
        assert triton == [f"triton:_{k}_kernel" for k in ("route", "expert_mm", "expert_mm", "sum_pairs")]
        if silu:
            assert "silu" not in count.names and "mul" not in count.names[count.names.index(triton[1]) :]


def test_decode_experts_trace_whole_under_torch_compile():
    """fullgraph tracing of the decode path: one opaque op, equal to the eager call."""
    from nvfp4_fix import expert_stack

    st = _experts(8, 64, 32, seed=9)
    idx, w = _routing(2, 4, 8, seed=1, invalid=True)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(2))
    seen = []

    def backend(gm, inputs):
        seen.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    silu = torch.nn.SiLU()
    fn = torch.compile(lambda a, k, ww: expert_stack.grouped_forward(st, a, k, ww, silu, False),
                       backend=backend, fullgraph=True)  # fmt: skip
    got = fn(x, idx, w)
    op = torch.ops.nvfp4_fix.moe_decode_experts
    assert op.default in seen or op in seen
    torch.testing.assert_close(got, expert_stack.grouped_forward(st, x, idx, w, silu, False), rtol=0, atol=0)
    assert rel(got, reference_moe(st, x, idx, w)) <= 1e-5


def test_decode_experts_refuse_mismatched_shapes():
    from nvfp4_fix.kernels.moe_decode import decode_experts

    st = _experts(4, 64, 32, seed=0)
    idx, w = _routing(1, 2, 4, seed=0, invalid=False)
    gate_up = (st.gate_up_codes, st.gate_up_scales, st.gate_up_mul)
    with pytest.raises(ValueError, match="decode experts"):
        decode_experts(
            torch.randn(1, 64), idx, w, gate_up, (st.down_codes[:, :32], st.down_scales, st.down_mul)
        )


def test_cuda_down_sum_refuses_act_rows_that_are_not_the_pairs(monkeypatch):
    """kernels/cuda_moe.down_sum reads act row t * topk + k for every pair: fewer rows than the pairs, or
    more warps than its shared-memory reduction holds, are refused before anything is launched."""
    from nvfp4_fix.kernels import cuda_moe

    st = _experts(4, 128, 128, seed=0)
    idx, w = _routing(2, 2, 4, seed=0, invalid=False)
    down = (st.down_codes, st.down_scales, st.down_mul)
    with pytest.raises(ValueError, match="down_sum: act"):
        cuda_moe.down_sum(torch.randn(3, 128).bfloat16(), idx, w, *down)
    monkeypatch.setattr(cuda_moe, "DOWN_SUM_WARPS", 16)
    with pytest.raises(ValueError, match="16 warps"):
        cuda_moe.down_sum(torch.randn(4, 128).bfloat16(), idx, w, *down)


# --------------------------------------------------------------------------------------------------
# GPU: Qwen3-30B-A3B shapes, CUDA-graph replay with new routings
# --------------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
E30, H30, I30, TOPK30 = 128, 2048, 768, 8


@gpu
@needs_cuda
@pytest.mark.parametrize("t", [1, 8, 16], ids=["T1", "T8", "T16-grouped"])
def test_gpu_qwen3_30b_experts_match_float64(t):
    """grouped_forward on the GPU (packed-PTX dequantization, bf16): the fused decode kernels at 8 and 64
    pairs, the sorted ones at 128 (the grouped tl.dot kernels with settings.cuda_moe off)."""
    from nvfp4_fix import expert_stack, settings

    st = _experts(E30, H30, I30, seed=t, device="cuda")
    idx, w = _routing(t, TOPK30, E30, seed=t, invalid=t > 1)
    x = torch.randn(t, H30, device="cuda", dtype=torch.bfloat16)
    idx, w = idx.cuda(), w.to("cuda", torch.bfloat16)
    ref = reference_moe(st, x, idx, w)
    for cuda_moe in (True, False):
        with settings.override(cuda_moe=cuda_moe):
            got = expert_stack.grouped_forward(st, x, idx, w, torch.nn.SiLU(), False)
        assert rel(got, ref) <= TOL[torch.bfloat16], cuda_moe


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "t,e,topk,h,i,ids_dtype,w_dtype",
    [
        (1, E30, 8, H30, I30, torch.int64, None),  # Qwen3-30B-A3B decode; weights in x's dtype
        (8, 16, 8, 384, 256, torch.int32, torch.float32),  # 3 and 2 chunks of 128 (warps_for: 1 warp here)
        (3, 6, 6, 1024, 1408, torch.int64, torch.float32),  # I = 11 x 128; 6 of down_sum's 8 warps
        (2, 8, 2, 512, 384, torch.int64, None),  # top-2: down_sum's warps split each pair's K in 4
        (4, 16, 10, 256, 256, torch.int32, torch.float32),  # top-10: two pair slots for some warps
    ],
    ids=["30B-T1", "small-T8-int32", "odd-I-T3", "top2", "top10"],
)
@pytest.mark.parametrize("down_sum", [False, True], ids=["down+sum_pairs", "down_sum"])
def test_gpu_cuda_decode_experts_match_float64(
    dtype, t, e, topk, h, i, ids_dtype, w_dtype, down_sum, monkeypatch
):
    """kernels/cuda_moe.py (backend "cuda") against the float64 MoE, with pairs routed to no expert,
    int32 / int64 ids read through their strides, routing weights in float32 or x's dtype, each
    expert's gate and up with their own multipliers, the pair sum as its own launch or inside the down
    kernel (``cuda_moe.DOWN_SUM_MAX_TOKENS``); and the Triton kernels on the same inputs."""
    from nvfp4_fix.kernels import cuda_moe
    from nvfp4_fix.kernels.moe_decode import decode_experts

    monkeypatch.setattr(cuda_moe, "DOWN_SUM_MAX_TOKENS", t if down_sum else 0)
    st = _experts(e, h, i, seed=t + i, device="cuda")
    idx, w = _routing(t, topk, e, seed=t, invalid=True)
    idx = idx.to(ids_dtype).T.contiguous().T.cuda()  # column-major: strides (1, t)
    w = w.to("cuda", w_dtype or dtype)
    x = torch.randn(t, h, device="cuda").to(dtype)
    gate_up = (st.gate_up_codes, st.gate_up_scales, st.gate_up_mul)
    down = (st.down_codes, st.down_scales, st.down_mul)
    ref = reference_moe(st, x, idx.long(), w)
    for backend in ("cuda", "triton", "auto"):
        got = decode_experts(x, idx, w, gate_up, down, backend=backend)
        assert got.dtype == dtype and got.shape == (t, h)
        assert rel(got, ref) <= TOL[dtype], backend


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "t,e,topk,h,i,skew",
    [
        (16, E30, 8, H30, I30, False),  # 128 pairs of the Qwen3-30B-A3B experts: ~1 per expert
        (64, E30, 8, H30, I30, False),  # 512 pairs: ~4 per expert, some past 8 (two blocks)
        (40, 16, 4, 384, 256, False),  # 160 pairs on 16 experts: ~10 each
        (33, 8, 4, 256, 1408, True),  # every token on experts 0-3: 33 pairs each, a partial 5th block
    ],
    ids=["30B-T16", "30B-T64", "16e-T40", "skewed-T33"],
)
def test_gpu_sorted_cuda_experts_match_float64(dtype, t, e, topk, h, i, skew):
    """Above 64 pairs the CUDA kernels take the pairs sorted by expert (``cuda_moe.*_sorted``, up to 8
    pairs of one expert per block): against the float64 MoE, with pairs routed to no expert, int32 ids
    read column-major, float32 routing weights; the Triton per-pair kernels and ``grouped_forward`` on
    the same inputs."""
    from nvfp4_fix import expert_stack, settings
    from nvfp4_fix.kernels import moe_decode
    from nvfp4_fix.kernels.moe_decode import decode_experts

    st = _experts(e, h, i, seed=t + i, device="cuda")
    idx, w = _routing(t, topk, e, seed=t, invalid=True)
    if skew:
        idx = torch.arange(topk).repeat(t, 1)
        idx[0, 1], idx[-1, -1] = -1, e
    assert moe_decode.sorted_cuda_may_run(torch.empty(1, device="cuda", dtype=dtype), t * topk, h, i)
    ids = idx.to(torch.int32).T.contiguous().T.cuda()
    w = w.to("cuda", torch.float32)
    x = torch.randn(t, h, device="cuda").to(dtype)
    gate_up = (st.gate_up_codes, st.gate_up_scales, st.gate_up_mul)
    down = (st.down_codes, st.down_scales, st.down_mul)
    ref = reference_moe(st, x, idx, w)
    for backend in ("cuda", "triton"):
        got = decode_experts(x, ids, w, gate_up, down, backend=backend)
        assert got.dtype == dtype and got.shape == (t, h)
        assert rel(got, ref) <= TOL[dtype], backend
    for route_kernel in (False, True):  # the pairs sorted by torch ops, or by one Triton program
        with settings.override(moe_route_kernel=route_kernel):
            got = expert_stack.grouped_forward(st, x, ids, w, torch.nn.SiLU(), False)
        assert rel(got, ref) <= TOL[dtype], route_kernel


@gpu
@needs_cuda
@pytest.mark.parametrize("t", [1, 16], ids=["T1-indexed", "T16-sorted"])
def test_gpu_decode_experts_graph_replays_any_routing(t):
    """One captured call serves every routing (ids and weights copied into the captured inputs), also
    with pairs routed to no expert: replays equal eager calls bit for bit (the sorted kernels' routing
    step included)."""
    from nvfp4_fix import expert_stack

    st = _experts(E30, H30, I30, seed=3, device="cuda")
    silu = torch.nn.SiLU()
    x = torch.randn(t, H30, device="cuda", dtype=torch.bfloat16)
    idx, w = (a.cuda() for a in _routing(t, TOPK30, E30, seed=0, invalid=False))
    w = w.to(torch.bfloat16)

    def step():
        return expert_stack.grouped_forward(st, x, idx, w, silu, False)

    graph, out = captured(step)
    for seed in (1, 2, 3):
        new_idx, new_w = _routing(t, TOPK30, E30, seed=seed, invalid=seed == 2)
        idx.copy_(new_idx)
        w.copy_(new_w)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, step(), rtol=0, atol=0)
