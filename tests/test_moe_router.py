"""kernels/moe_router.py (one-launch softmax top-k) against a float64 reference, and generation/router.py's
swap against each transformers router class it claims to reproduce."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from nvfp4_fix.generation.router import ROUTERS, fused_routers
from nvfp4_fix.kernels import moe_router
from nvfp4_fix.kernels.moe_router import router_topk, softmax_topk

CUDA = torch.cuda.is_available()


def reference(logits: torch.Tensor, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """float64 softmax; ids by a stable sort (the lowest id first among equal probabilities)."""
    x = logits.double().cpu().numpy()
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :k]
    vals = np.take_along_axis(p, ids, -1)
    if normalize:
        vals /= vals.sum(-1, keepdims=True)
    return vals, ids


def _check(logits: torch.Tensor, k: int, normalize: bool) -> None:
    vals, ids = softmax_topk(logits, k, normalize)
    assert (
        vals.dtype == torch.float32
        and ids.dtype == torch.int64
        and vals.shape == ids.shape == (len(logits), k)
    )
    want_vals, want_ids = reference(logits, k, normalize)
    np.testing.assert_array_equal(ids.cpu().numpy(), want_ids)
    np.testing.assert_allclose(vals.cpu().double().numpy(), want_vals, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "t,e,k", [(1, 128, 8), (5, 60, 4), (3, 8, 8), (2, 256, 1), (33, 64, 6)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_softmax_topk_matches_float64(dtype, t, e, k, normalize):
    """E = 60 is no power of two (padded slots); k = 6 pads to 8; k = E takes every expert. bf16 logits
    of 128 experts hold equal values: those keep the lower id first, as the stable reference does."""
    g = torch.Generator().manual_seed(t * e + k)
    logits = (3 * torch.randn(t, e, generator=g)).to(dtype)
    _check(logits, k, normalize)


def test_softmax_topk_reads_row_strides_and_refuses_bad_shapes():
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(4, 200, generator=g)
    _check(wide[:, 10:138], 8, True)  # rows 200 apart
    _check(wide[:, :64].T.contiguous().T, 3, False)  # column-major: copied to rows
    with pytest.raises(ValueError, match=r"k = 9 must be in \[1, 8\]"):
        softmax_topk(torch.randn(2, 8), 9, True)
    with pytest.raises(ValueError, match="must be \\[tokens, experts\\]"):
        softmax_topk(torch.randn(2, 3, 8), 2, True)


def test_softmax_topk_nan_row_keeps_ids_in_range():
    logits = torch.randn(2, 16)
    logits[1, 3] = float("nan")
    _, ids = softmax_topk(logits, 4, True)
    assert ids.min() >= 0 and ids.max() < 16


def test_softmax_topk_traces_as_one_op_under_torch_compile():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(lambda x: softmax_topk(x, 4, True), backend=counter, fullgraph=True)
    logits = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    _check(logits, 4, True)
    got = f(logits)
    want = softmax_topk(logits, 4, True)
    assert torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], rtol=1e-6)
    assert counter.frame_count == 1


def _bound(x: torch.Tensor, w: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """|logits - float64| allowed: one unit in the last place of the dtype (the rounding; Triton's
    interpreter truncates to bf16) plus float32 summation over H terms."""
    ulp = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[logits.dtype]
    mag = x.double().abs() @ w.double().abs().T
    return ulp * (x.double() @ w.double().T).abs() + 2.0**-22 * x.shape[1] * mag + 1e-30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "t,e,h,k", [(1, 128, 2048, 8), (3, 60, 200, 4), (16, 8, 64, 2), (2, 512, 96, 10), (1, 6, 40, 6)], ids=str
)
def test_gemv_topk_matches_float64(dtype, t, e, h, k):
    """The fused kernel (run directly: on the CPU through the interpreter): logits within a rounding of
    the float64 product, the top k exactly the reference's of those logits; E = 60 and 6 leave the last
    program's experts partial, E = 8 gives one expert a program; the arrival counters are back at 0."""
    g = torch.Generator().manual_seed(t * e + h)
    x = torch.randn(t, h, generator=g).to(dtype)
    w = (3 * torch.randn(e, h, generator=g) / h**0.5).to(dtype)
    dev = torch.device("cuda" if CUDA else "cpu")
    x, w = x.to(dev), w.to(dev)
    for normalize in (True, False):
        logits, vals, ids = moe_router._gemv_topk(x, w, k, normalize)
        assert logits.dtype == dtype and vals.dtype == torch.float32 and ids.dtype == torch.int64
        err = (logits.double().cpu() - (x.double() @ w.double().T).cpu()).abs()
        assert bool((err <= _bound(x.cpu(), w.cpu(), logits)).all()), err.max()
        want_vals, want_ids = reference(logits, k, normalize)
        np.testing.assert_array_equal(ids.cpu().numpy(), want_ids)
        np.testing.assert_allclose(vals.cpu().double().numpy(), want_vals, rtol=2e-6, atol=1e-9)
    assert int(moe_router._counters(dev).abs().sum()) == 0


def test_router_topk_keeps_f_linear_where_it_does_not_fuse():
    """The CPU, and more rows than FUSED_MAX_TOKENS: F.linear's logits exactly, then softmax_topk."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 48, generator=g)
    for rows in (1, moe_router.FUSED_MAX_TOKENS + 1):
        x = torch.randn(rows, 48, generator=g)
        logits, vals, ids = router_topk(x, w, 4, True)
        assert torch.equal(logits, torch.nn.functional.linear(x, w))
        want_vals, want_ids = softmax_topk(logits, 4, True)
        assert torch.equal(ids, want_ids) and torch.equal(vals, want_vals)
    assert not moe_router.fuses(x, w, 4)


def test_router_topk_op_traces_under_torch_compile():
    """The fused op's fake (shapes and dtypes) lets torch.compile trace it as one op."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    f = torch.compile(
        lambda x, w: torch.ops.nvfp4_fix.router_topk(x, w, 4, True), backend=counter, fullgraph=True
    )
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 64, generator=g), torch.randn(16, 64, generator=g)
    got = f(x, w)
    want = moe_router._gemv_topk(x, w, 4, True)
    assert [t.shape for t in got] == [(2, 16), (2, 4), (2, 4)] and torch.equal(got[2], want[2])
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_router_topk_fuses_decode_and_replays_in_a_graph():
    """Qwen3-30B-A3B's router at 1, 4 and 16 tokens in one launch: logits within a rounding of
    F.linear's, the ids those of its own logits; captured once and replayed with new hidden states (the
    arrival counters reset by each call), equal to eager calls bit for bit."""
    from cuda_graphs import captured

    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(128, 2048, device="cuda", generator=g) / 16).to(torch.bfloat16)
    for t in (1, 4, 16):
        x = torch.randn(t, 2048, device="cuda", generator=g).to(torch.bfloat16)
        assert moe_router.fuses(x, w, 8)
        logits, vals, ids = router_topk(x, w, 8, True)
        assert bool((logits.double() - (x.double() @ w.double().T)).abs().le(_bound(x, w, logits)).all())
        want_vals, want_ids = reference(logits, 8, True)
        np.testing.assert_array_equal(ids.cpu().numpy(), want_ids)
        graph, out = captured(lambda x=x: router_topk(x, w, 8, True))
        for _ in range(3):
            x.copy_(torch.randn(t, 2048, device="cuda", generator=g).to(torch.bfloat16))
            graph.replay()
            want = router_topk(x, w, 8, True)
            torch.cuda.synchronize()
            for a, b in zip(out, want, strict=True):
                assert torch.equal(a, b)


#: the transformers model package of each router class in ROUTERS
PACKAGES = {
    "Qwen3MoeTopKRouter": "qwen3_moe", "Qwen2MoeTopKRouter": "qwen2_moe", "Qwen3NextTopKRouter": "qwen3_next",
    "OlmoeTopKRouter": "olmoe", "FlexOlmoTopKRouter": "flex_olmo", "Qwen3VLMoeTextTopKRouter": "qwen3_vl_moe",
    "Qwen3_5MoeTopKRouter": "qwen3_5_moe", "MixtralTopKRouter": "mixtral",
}  # fmt: skip


def _router(name: str, normalize: bool, e: int = 32, k: int = 4, h: int = 48):
    """An instance of transformers' router class ``name`` built from its model's (text) config."""
    transformers = pytest.importorskip("transformers")
    try:
        modeling = importlib.import_module(f"transformers.models.{PACKAGES[name]}.modeling_{PACKAGES[name]}")
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} has no {PACKAGES[name]}")
    if not hasattr(modeling, name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    configs = importlib.import_module(modeling.__name__.replace(".modeling_", ".configuration_"))
    names = [
        n for n in dir(configs) if n.endswith("Config") and n != "PreTrainedConfig" and "Vision" not in n
    ]
    cfg_cls = getattr(configs, next((n for n in names if "Text" in n), min(names, key=len)))
    cfg = cfg_cls(
        hidden_size=h, num_experts=e, num_local_experts=e, num_experts_per_tok=k, norm_topk_prob=normalize
    )
    router = getattr(modeling, name)(cfg)
    assert router.weight.shape == (e, h) and router.top_k == k
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(len(name)))
    return router


@pytest.mark.parametrize("name", sorted(ROUTERS))
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_router_equals_the_transformers_class(name, normalize, dtype):
    assert set(PACKAGES) == set(ROUTERS)
    """The swap returns what the class's own forward returns: same logits, ids and score dtype, scores
    within float32 rounding (before the cast to bf16)."""
    router = _router(name, normalize).to(dtype)
    x = torch.randn(2, 3, router.hidden_dim, generator=torch.Generator().manual_seed(7)).to(dtype)
    want_logits, want_scores, want_ids = router(x)
    with fused_routers(router) as count:
        assert count == 1
        logits, scores, ids = router(x)
    assert "forward" not in router.__dict__
    assert torch.equal(logits, want_logits) and torch.equal(ids, want_ids)
    assert scores.dtype == want_scores.dtype
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(scores.float(), want_scores.float(), rtol=tol, atol=1e-7)


def test_fused_routers_skip_hooked_and_disabled_and_restore_on_error():
    router = _router("Qwen3MoeTopKRouter", True)
    with fused_routers(router, enabled=False) as count:
        assert count == 0
    handle = router.register_forward_hook(lambda *a: None)
    with fused_routers(router) as count:
        assert count == 0
    handle.remove()
    with pytest.raises(RuntimeError, match="boom"), fused_routers(router) as count:
        assert count == 1 and "forward" in router.__dict__
        raise RuntimeError("boom")
    assert "forward" not in router.__dict__


@pytest.mark.parametrize("compile_step", [False, True], ids=["eager", "compile_step"])
def test_generate_with_fused_routers_equals_model_generate(monkeypatch, compile_step):
    """A tiny random Qwen3-MoE through nvfp4_fix.generate (static cache, no graph on the CPU; the step
    eager or torch.compiled with the router op opaque) gives model.generate's greedy tokens with the
    routers swapped."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers.models.qwen3_moe.modeling_qwen3_moe, "Qwen3MoeTopKRouter"):
        pytest.skip("this transformers has no router modules")
    from nvfp4_fix import generate, settings

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    want = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    from nvfp4_fix.generation import router

    calls = []
    monkeypatch.setattr(router, "router_topk", lambda *a: calls.append(a[0].shape) or router_topk(*a))
    with settings.override(moe_router=True):
        got = generate(model, ids, max_new_tokens=6, use_cuda_graph=False, compile_step=compile_step)
    assert torch.equal(got, want)
    assert len(calls) >= (2 if compile_step else 2 * 6)  # eager: both layers, every step
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("t,e,k", [(1, 128, 8), (64, 128, 8), (7, 60, 2), (3, 512, 10)], ids=str)
def test_gpu_softmax_topk_matches_float64(dtype, t, e, k):
    g = torch.Generator().manual_seed(t + e)
    logits = (3 * torch.randn(t, e, generator=g)).to(dtype).cuda()
    _check(logits, k, True)
    _check(logits, k, False)
