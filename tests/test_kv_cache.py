"""The one-launch KV-cache append (nvfp4_fix.kernels.kv_cache) against what transformers'
``StaticLayer.update`` does for one token: ``index_copy_`` of K and V at ``cumulative_length``, then
``cumulative_length += 1``. A copy, so the comparison is exact. Caches start filled with random
values (never zeros); new K/V come from a transposed projection output (non-contiguous), as in the
attention modules. Without CUDA the kernel runs in the Triton interpreter (tests/conftest.py); without
Triton (the legacy environment) the same tests check the torch fallback.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from reference import hf_greedy

from nvfp4_fix.kernels import kv_cache

HAS_TRITON = importlib.util.find_spec("triton") is not None

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def make(b, h, length, d, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, h, length, d, generator=g).to(dtype).to(device)
    values = torch.randn(b, h, length, d, generator=g).to(dtype).to(device)
    return keys, values


def new_kv(b, h, d, dtype, device=DEVICE, seed=1):
    """[B, H, 1, D] views of a [B, 1, H * D] projection output, as attention modules make them."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, 1, h * d, generator=g).to(dtype).to(device).view(b, 1, h, d).transpose(1, 2)
    v = torch.randn(b, 1, h * d, generator=g).to(dtype).to(device).view(b, 1, h, d).transpose(1, 2)
    return k, v


def reference(keys, values, k, v, pos):
    keys, values = keys.clone(), values.clone()
    keys.index_copy_(2, torch.tensor([pos], device=keys.device), k)
    values.index_copy_(2, torch.tensor([pos], device=keys.device), v)
    return keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("b,h,length,d", [(1, 2, 40, 64), (3, 8, 17, 80), (2, 5, 9, 128), (1, 70, 6, 16)])
def test_append_matches_static_layer_update(b, h, length, d, dtype):
    keys, values = make(b, h, length, d, dtype)
    start = length // 2
    n = torch.tensor(start, dtype=torch.int64, device=DEVICE)
    assert kv_cache.supports(keys, values, *new_kv(b, h, d, dtype), n) == HAS_TRITON
    for step in range(3):  # consecutive appends land at consecutive positions
        k, v = new_kv(b, h, d, dtype, seed=10 + step)
        want_k, want_v = reference(keys, values, k, v, start + step)
        kv_cache.append_kv(keys, values, k, v, n)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
        assert int(n) == start + step + 1


@pytest.mark.skipif(not HAS_TRITON, reason="the kernel's guard (the torch ops raise instead)")
def test_position_past_the_end_writes_nothing():
    keys, values = make(1, 2, 8, 32, torch.float32)
    before = keys.clone(), values.clone()
    n = torch.tensor(8, dtype=torch.int64, device=DEVICE)
    kv_cache.append_kv(keys, values, *new_kv(1, 2, 32, torch.float32), n)
    assert torch.equal(keys, before[0]) and torch.equal(values, before[1])


def test_unsupported_inputs_take_the_torch_ops():
    keys, values = make(1, 2, 8, 32, torch.float32)
    k, v = new_kv(1, 2, 32, torch.float32)
    n32 = torch.tensor(3, dtype=torch.int32, device=DEVICE)  # not cumulative_length's int64
    assert not kv_cache.supports(keys, values, k, v, n32)
    want = reference(keys, values, k, v, 3)
    kv_cache.append_kv(keys, values, k, v, n32)
    assert torch.equal(keys, want[0]) and torch.equal(values, want[1]) and int(n32) == 4


def test_custom_op_under_torch_compile():
    keys, values = make(2, 4, 12, 32, torch.float32)
    k, v = new_kv(2, 4, 32, torch.float32)
    n = torch.tensor(5, dtype=torch.int64, device=DEVICE)
    want = reference(keys, values, k, v, 5)
    torch.library.opcheck(torch.ops.nvfp4_fix.append_kv.default,
                          (keys.clone(), values.clone(), k, v, n.clone()),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip

    def step(keys, values, k, v, n):
        torch.ops.nvfp4_fix.append_kv(keys, values, k * 1.0, v * 1.0, n)
        return keys[:, :, :1].sum()

    fn = torch.compile(step, backend="inductor" if CUDA else "aot_eager", fullgraph=True)
    fn(keys, values, k, v, n)
    assert torch.equal(keys, want[0]) and torch.equal(values, want[1]) and int(n) == 6


@pytest.mark.parametrize("enabled", [True, False], ids=["append", "NVFP4_FIX_KV_APPEND=0"])
def test_generation_appends_through_the_kernel(monkeypatch, enabled):
    """The fast path's static cache writes each decode token with one append per layer (none with the
    switch off) and matches model.generate (greedy, float32) either way."""
    import transformers as tf

    from nvfp4_fix import settings
    from nvfp4_fix.generation import generate

    calls = []
    real = kv_cache.append_kv

    def spy(*a):
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(kv_cache, "append_kv", spy)
    cfg = tf.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    ids = torch.randint(5, 300, (1, 7), generator=torch.Generator().manual_seed(1))
    with settings.override(kv_append=enabled):
        got = generate(model, ids, 6, use_cuda_graph=False, stop_token_ids=())
    assert got.tolist() == hf_greedy(model, ids, 6).tolist()
    from transformers.cache_utils import StaticLayer

    if enabled and hasattr(StaticLayer(max_cache_len=4), "cumulative_length"):  # transformers >= 5
        assert len(calls) == 3 * 5  # 3 layers x 5 decode steps
    else:  # switched off, or 4.x (StaticLayer.update writes at cache_kwargs["cache_position"])
        assert not calls


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_llama_shape_and_graph_replay(dtype):
    keys, values = make(1, 8, 2432, 128, dtype)
    n = torch.tensor(2048, dtype=torch.int64, device="cuda")
    k, v = new_kv(1, 8, 128, dtype)
    ref_k, ref_v = keys.clone(), values.clone()
    graph = torch.cuda.CUDAGraph()
    kv_cache.append_kv(keys.clone(), values.clone(), k, v, n.clone())  # compile outside the capture
    with torch.cuda.graph(graph):
        kv_cache.append_kv(keys, values, k, v, n)
    for step in range(4):
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
        ref_k, ref_v = reference(ref_k, ref_v, k, v, 2048 + step)
        graph.replay()
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
    assert int(n) == 2052
