"""The split-KV decode attention kernel (nvfp4_fix.kernels.decode_attention) against an independent
float64 reference, and its use by the fast generation path.

Reference: softmax(q k^T * scale + mask) v computed by torch in float64 from the same (already rounded)
inputs, K/V repeated per query-head group. Inputs are random normal draws (never zeros); cache
positions that the mask excludes hold NaN / inf garbage (as an unwritten static-cache tail may), which
the kernel must never read. Every output element must be finite.

Tolerance, max abs error against the reference (outputs are O(1)): 2e-2 for bf16, 5e-3 for fp16,
1e-4 for fp32.

Without CUDA the kernels run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on
small shapes; full-size cases are marked ``gpu``. Skipped where triton is not installed.
"""

from __future__ import annotations

import pytest
import torch
from cuda_graphs import captured

pytest.importorskip("triton")

from reference import hf_greedy  # noqa: E402

from nvfp4_fix.kernels import decode_attention as da  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
GARBAGE = float("nan")


def reference(q, k, v, mask, scale):
    """[B, 1, H, D] float64; rows where the mask allows nothing are zeros."""
    b, h, _, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    allowed = torch.ones(b, 1, 1, length, dtype=torch.bool, device=q.device)
    bias = torch.zeros(b, 1, 1, length, dtype=torch.float64, device=q.device)
    if mask is not None:
        m = mask[..., :length].expand(b, 1, 1, length)
        allowed = m if m.dtype == torch.bool else m > float("-inf")
        if m.dtype != torch.bool:
            bias = m.double()
    keep = allowed.transpose(-1, -2)  # [B, 1, L, 1]: never let garbage into the products
    kk = torch.where(keep, k.double(), 0.0).repeat_interleave(h // hkv, dim=1)
    vv = torch.where(keep, v.double(), 0.0).repeat_interleave(h // hkv, dim=1)
    s = (q.double() @ kk.transpose(-1, -2)) * scale + torch.where(allowed, bias, 0.0)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return (p @ vv).transpose(1, 2)


def make_inputs(b, h, hkv, d, length, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, h, d, generator=g).to(device, dtype).transpose(1, 2)  # transformers' q layout
    k = torch.randn(b, hkv, length, d, generator=g).to(device, dtype)
    v = torch.randn(b, hkv, length, d, generator=g).to(device, dtype)
    return q, k, v


def make_mask(kind, b, length, device=DEVICE, seed=1):
    """[b or 1, 1, 1, >= length] masks; the bool kinds mimic transformers' static-cache masks."""
    g = torch.Generator().manual_seed(seed)
    n = torch.arange(length + 28)  # masks may be longer than the K/V they are used with
    if kind == "none":
        return None
    if kind == "prefix":  # the static cache at position `pos`: 0..pos filled, the rest unwritten
        pos = torch.tensor([length * 2 // 3, 9])[:b]
        return (n <= pos[:, None]).view(b, 1, 1, -1).to(device)
    if kind == "window":  # a sliding window: an allowed band not starting at 0
        return ((n >= length // 2 - 40) & (n <= length // 2)).view(1, 1, 1, -1).expand(b, 1, 1, -1).to(device)
    if kind == "rows":  # per batch row: a prefix, a band
        return torch.stack([n < length - 3, (n > 60) & (n < 130)]).view(b, 1, 1, -1).to(device)
    if kind == "float-inf":
        allowed = torch.rand(b, 1, 1, length + 28, generator=g) < 0.6
        return torch.where(allowed, torch.randn(allowed.shape, generator=g), float("-inf")).to(device)
    if kind == "float-min":  # transformers' eager style: finfo.min, not -inf (row 1: nothing allowed)
        allowed = torch.stack([n < length // 3, n < 0])[:b]
        return torch.where(allowed, 0.0, torch.finfo(torch.float32).min).view(b, 1, 1, -1).to(device)
    raise ValueError(kind)


def poison_unallowed(k, v, mask):
    """Garbage where a bool / -inf mask excludes a position (the kernel must not load it)."""
    if mask is None or (mask.dtype != torch.bool and not bool((mask == float("-inf")).any())):
        return
    m = mask[..., : k.shape[2]]
    excluded = (~m if m.dtype == torch.bool else m == float("-inf")).expand(k.shape[0], 1, 1, -1)
    excluded = excluded.transpose(-1, -2).expand_as(k)
    k.masked_fill_(excluded, GARBAGE)
    v.masked_fill_(excluded, float("inf"))


def check(q, k, v, mask, scale=None, **kw):
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    poison_unallowed(k, v, mask)
    got = da.decode_attention(q, k, v, mask, scale, **kw)
    assert got.shape == (q.shape[0], 1, q.shape[1], q.shape[3]) and got.dtype == q.dtype
    assert torch.isfinite(got).all()
    err = (got.double() - reference(q, k, v, mask, scale)).abs().max().item()
    assert err <= TOL[q.dtype], err
    return got


# (batch, heads, kv heads, head dim, cache length, mask kind)
CASES = [
    (1, 2, 2, 64, 100, "none"),  # no GQA
    (1, 8, 2, 128, 300, "prefix"),  # G = 4
    (2, 10, 2, 64, 300, "rows"),  # G = 5 (padded to 16), a different mask per batch row
    (2, 4, 1, 64, 200, "window"),
    (2, 4, 2, 64, 100, "float-inf"),
    (2, 4, 2, 128, 130, "float-min"),  # an all-finfo.min row averages every position, as SDPA
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}d{c[3]}L{c[4]}-{c[5]}")
def test_matches_float64_reference(case, dtype):
    b, h, hkv, d, length, kind = case
    q, k, v = make_inputs(b, h, hkv, d, length, dtype)
    assert da.supports(q, k, v, make_mask(kind, b, length))
    check(q, k, v, make_mask(kind, b, length))


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_split_count_and_empty_splits(splits):
    """Every split count gives the same answer; splits whose blocks the mask excludes (here all but the
    first block) contribute nothing and no NaN."""
    q, k, v = make_inputs(2, 8, 2, 64, 300, torch.float32, seed=splits)
    mask = make_mask("prefix", 2, 300)
    mask[0, ..., 40:] = False
    check(q, k, v, mask, scale=0.3, num_splits=splits)


def test_fully_masked_row_gives_zeros():
    q, k, v = make_inputs(2, 4, 2, 64, 100, torch.bfloat16)
    mask = make_mask("prefix", 2, 100)
    mask[1] = False
    out = check(q, k, v, mask)
    assert (out[1] == 0).all()


def test_broadcast_mask_and_head_dim_32():
    q, k, v = make_inputs(2, 4, 4, 32, 70, torch.float16)
    check(q, k, v, make_mask("prefix", 1, 70))


def test_supports_rejects_what_the_kernel_does_not_take(monkeypatch):
    q, k, v = make_inputs(1, 4, 2, 64, 50, torch.float32)
    mask = make_mask("prefix", 1, 50)
    assert da.supports(q, k, v, mask)
    q2, k2, v2 = make_inputs(1, 4, 2, 48, 50, torch.float32)
    rejected = [
        (torch.randn(1, 4, 2, 64, device=DEVICE), k, v, mask),  # two query tokens
        (q2, k2, v2, None),  # head dim not a power of two
        (q[:, :3], k, v, None),  # 3 heads over 2 KV heads
        (q, k, v, mask.expand(1, 4, 1, -1)),  # per-head mask
        (q, k, v, mask[..., :40]),  # mask shorter than the cache
        (q, k, v, mask.int()),
        (q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v, None),  # last dim not contiguous
        (q.double(), k.double(), v.double(), None),
        (q, k.half(), v.half(), None),
    ]
    for args in rejected:
        assert not da.supports(*args)
    if not CUDA:
        monkeypatch.setattr(da, "_INTERPRET", False)
        assert not da.supports(q, k, v, mask)


def test_custom_op_and_torch_compile():
    q, k, v = make_inputs(1, 8, 2, 64, 100, torch.float32)
    mask = make_mask("prefix", 1, 100)
    want = da.decode_attention(q, k, v, mask, 0.2)
    torch.testing.assert_close(torch.ops.nvfp4_fix.decode_attention(q, k, v, mask, 0.2), want)
    torch.library.opcheck(torch.ops.nvfp4_fix.decode_attention.default, (q, k, v, mask, 0.2),
                          test_utils=("test_schema", "test_faketensor"))  # fmt: skip
    fn = torch.compile(
        lambda q, k, v, m: torch.ops.nvfp4_fix.decode_attention(q, k, v, m, 0.2) * 2,
        backend="inductor" if CUDA else "aot_eager",
        fullgraph=True,
    )
    torch.testing.assert_close(fn(q, k, v, mask), want * 2)


# --------------------------------------------------------------------------------------------------
# generation: _packed_gqa_sdpa routes decode steps to the kernel
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def kernel_calls(monkeypatch):
    """Let CPU tensors reach the kernel (the interpreter); record each call's query shape."""
    import nvfp4_fix.generation.attention as gen

    calls = []
    real = da.decode_attention

    def spy(q, *a, **kw):
        calls.append(tuple(q.shape))
        return real(q, *a, **kw)

    monkeypatch.setattr(gen, "TRITON_DECODE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(da, "decode_attention", spy)
    return calls


@pytest.mark.parametrize("groups", [1, 4])
def test_packed_sdpa_routes_to_the_kernel_and_matches_transformers(kernel_calls, groups, monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import nvfp4_fix.generation.attention as gen
    from nvfp4_fix import settings

    class Attn(torch.nn.Module):
        num_key_value_groups = groups
        is_causal = True

    q, k, v = make_inputs(2, 8, 8 // groups, 16, 90, torch.float32)
    mask = torch.rand(2, 1, 1, 90, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[..., 0] = True
    orig_calls = []

    def orig(*a, **kw):
        orig_calls.append(1)
        return sdpa_attention_forward(*a, **kw)

    packed = gen.packed_gqa_sdpa(orig)
    for m in (mask, None, torch.where(mask, 0.0, float("-inf"))):
        want, _ = sdpa_attention_forward(Attn(), q, k, v, m, scaling=0.3)
        got, _ = packed(Attn(), q, k, v, m, scaling=0.3)
        assert got.shape == want.shape == (2, 1, 8, 16)
        torch.testing.assert_close(got, want)
    assert len(kernel_calls) == 3 and not orig_calls
    packed(Attn(), q, k, v, mask, position_bias=torch.zeros(2, 8, 1, 90))  # transformers' own function
    assert len(kernel_calls) == 3 and len(orig_calls) == 1
    with settings.override(decode_attention=False):  # NVFP4_FIX_DECODE_ATTENTION=0
        torch.testing.assert_close(packed(Attn(), q, k, v, mask, scaling=0.3)[0],
                                   sdpa_attention_forward(Attn(), q, k, v, mask, scaling=0.3)[0])  # fmt: skip
    assert len(kernel_calls) == 3


def test_compiled_attention_uses_the_custom_op(kernel_calls):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import nvfp4_fix.generation.attention as gen

    class Attn(torch.nn.Module):
        num_key_value_groups = 4
        is_causal = True

    q, k, v = make_inputs(1, 8, 2, 32, 70, torch.float32)
    mask = make_mask("prefix", 1, 70)
    packed = gen.packed_gqa_sdpa(sdpa_attention_forward)
    fn = torch.compile(lambda *a: packed(Attn(), *a, scaling=0.25)[0], backend="aot_eager", fullgraph=True)
    want, _ = sdpa_attention_forward(Attn(), q, k, v, mask[..., :70], scaling=0.25)
    torch.testing.assert_close(fn(q, k, v, mask), want)
    assert kernel_calls  # the op runs the (spied) kernel function


def test_greedy_generation_with_the_kernel_matches_generate(kernel_calls):
    """A tiny float32 Mistral whose 12-token sliding window really slides: the static-cache loop through
    the kernel emits model.generate's greedy tokens."""
    import transformers as tf

    from nvfp4_fix.generation import generate

    cfg = tf.MistralConfig(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=12, max_position_embeddings=512, pad_token_id=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    if model.config._attn_implementation != "sdpa":
        pytest.skip("model does not use sdpa")
    ids = torch.randint(5, 320, (1, 13), generator=torch.Generator().manual_seed(0))
    got = generate(model, ids, 10, use_cuda_graph=False, stop_token_ids=())
    assert got.tolist() == hf_greedy(model, ids, 10).tolist()
    assert len(kernel_calls) == 2 * 9  # 2 layers x 9 decode steps


# --------------------------------------------------------------------------------------------------
# GPU: full-size shapes, CUDA-graph capture
# --------------------------------------------------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "b,h,hkv,d,length,pos",
    [(1, 32, 8, 128, 512, 300), (1, 32, 8, 128, 2432, 2300), (4, 32, 8, 128, 8192, 5000),
     (1, 16, 16, 256, 1024, 1000), (2, 64, 8, 64, 4096, 100)],
)  # fmt: skip
def test_gpu_llama_shapes(b, h, hkv, d, length, pos, dtype):
    q, k, v = make_inputs(b, h, hkv, d, length, dtype)
    mask = (torch.arange(length + 128, device=DEVICE) <= pos).view(1, 1, 1, -1).expand(b, 1, 1, -1)
    check(q, k, v, mask)


@gpu
@needs_cuda
def test_gpu_cuda_graph_capture_and_replay():
    q, k, v = make_inputs(1, 32, 8, 128, 2432, torch.bfloat16)
    mask = torch.zeros(1, 1, 1, 2432, dtype=torch.bool, device=DEVICE)
    mask[..., :100] = True
    graph, out = captured(lambda: da.decode_attention(q, k, v, mask, 0.1))
    for filled in (100, 1000, 2432):
        mask[..., :filled] = True
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        assert (out.double() - reference(q, k, v, mask, 0.1)).abs().max().item() <= TOL[torch.bfloat16]


def test_mask_function_goes_through_one_opaque_op_under_compile():
    """Under torch.compile the sdpa mask is returned through nvfp4_fix::materialize (one buffer that
    every layer's attention reads); eagerly it is the mask itself. The override is local to the block."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks

    import nvfp4_fix.generation.attention as gen

    def orig(n):
        return torch.arange(n) < 3

    wrapped = gen.mask_once(orig)
    assert torch.equal(wrapped(5), orig(5))
    seen = []

    def backend(gm, inputs):
        seen.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    fn = torch.compile(lambda x: x * wrapped(5), backend=backend, fullgraph=True)
    torch.testing.assert_close(fn(torch.ones(5)), orig(5).float())
    assert torch.ops.nvfp4_fix.materialize in seen
    assert gen.register()
    assert masks[gen.NAME] is not masks["sdpa"]  # registered under nvfp4-fix's name; sdpa's own untouched
