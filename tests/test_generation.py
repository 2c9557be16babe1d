"""Fast generation (nvfp4_fix.generation): greedy tokens equal ``model.generate(do_sample=False)``.

On the CPU this runs the static-cache decode loop eagerly (``use_cuda_graph=False``: the same step the
CUDA graph captures) and the ``model.generate`` fallback; tests marked ``gpu`` run the captured graph.
Models: the shipped fixtures tests/fixtures/<era>/<arch>-<scheme>/ for Llama, Mistral, Qwen3 and
Gemma 2 where present, else a tiny random model of that architecture quantized with
``writer.save_quantized``. Everything is loaded in float32 so that the chunked prefill and the
static cache (which sum in another order than the dynamic cache) cannot flip a greedy choice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from reference import hf_greedy

from nvfp4_fix import settings
from nvfp4_fix.generation import clear_cache, generate, make_sampler, warp_logits
from nvfp4_fix.loading import from_pretrained
from nvfp4_fix.writer import save_quantized

FIXTURES = Path(__file__).parent / "fixtures"
ARCHS = ("llama", "mistral", "qwen3", "gemma")
# Always synthetic: sliding windows (12 tokens) shorter than prompt + generation, so that the window
# really slides (the shipped fixtures' windows are longer than the tests' sequences).
WINDOWED = ("mistral-sw", "gemma-sw")
ERAS = ("current", "legacy", "modelopt")
SCHEMES = ("nvfp4a16", "w4a16_nvfp4", "nvfp4")
CUDA = torch.cuda.is_available()


def _fixture_dir(arch: str, schemes: tuple[str, ...] = SCHEMES) -> Path | None:
    for scheme in schemes:
        for era in ERAS:
            p = FIXTURES / era / f"{arch}-{scheme}"
            if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
                return p
    return None


def _tiny_model(arch: str):
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=128, intermediate_size=272, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if arch == "llama":
        cfg, cls = tf.LlamaConfig(**common, tie_word_embeddings=False), tf.LlamaForCausalLM
    elif arch == "mistral":  # a window shorter than prompt + generation: exercises the sliding mask
        cfg, cls = (
            tf.MistralConfig(**common, sliding_window=12, tie_word_embeddings=False),
            tf.MistralForCausalLM,
        )
    elif arch == "qwen3":
        cfg, cls = tf.Qwen3Config(**common, tie_word_embeddings=False), tf.Qwen3ForCausalLM
    elif arch == "gemma":  # Gemma 2: tied embeddings, soft-capping, alternating sliding layers
        cfg, cls = (
            tf.Gemma2Config(**common, query_pre_attn_scalar=32, sliding_window=12),
            tf.Gemma2ForCausalLM,
        )
    else:
        raise ValueError(arch)
    cfg.architectures = [cls.__name__]
    torch.manual_seed(4321)
    model = cls(cfg).eval()
    with torch.no_grad():  # larger weights than the default init: less flat logits, varied greedy text
        for _name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model.to(torch.bfloat16)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for arch in ARCHS + WINDOWED:
        real = _fixture_dir(arch) if arch in ARCHS else None
        if real is not None:
            out[arch] = real
            continue
        path = tmp_path_factory.mktemp("gen") / f"{arch}-synthetic"
        save_quantized(_tiny_model(arch.removesuffix("-sw")), path)
        out[arch] = path
    return out


_loaded: dict[tuple[str, str, str], torch.nn.Module] = {}


def load(path: Path, dtype=torch.float32, device: str = "cpu"):
    key = (str(path), str(dtype), device)
    if key not in _loaded:
        _loaded[key] = from_pretrained(path, dtype=dtype, device_map=device)
    return _loaded[key]


def prompt(model, length: int = 13, batch: int = 1, seed: int = 0) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, min(vocab, 500), (batch, length), generator=g)


class Collect:
    """A TextStreamer stand-in: records every put() and whether end() was called."""

    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        assert value.device.type == "cpu"
        self.puts.append(value.reshape(-1).clone())

    def end(self) -> None:
        self.ended = True


# --------------------------------------------------------------------------------------------------
# CPU: the static-cache loop and the fallback
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS + WINDOWED)
def test_greedy_static_loop_matches_generate(checkpoints, arch):
    model = load(checkpoints[arch])
    ids = prompt(model)
    ref = hf_greedy(model, ids, 24)
    stats: dict = {}
    got = generate(model, ids, 24, use_cuda_graph=False, stop_token_ids=(), stats=stats)
    assert stats["path"] == "static-loop"
    assert stats["prefill_mode"] == "dynamic"  # the model's own path, K/V copied into the static cache
    assert stats["decode_steps"] == 23 and stats["decode_s"] > 0 and stats["prefill_s"] > 0
    assert got.tolist() == ref.tolist()
    # chunked prefill (3 chunks of 5, 5, 3 tokens) computes the same function
    got = generate(model, ids, 24, use_cuda_graph=False, stop_token_ids=(), prefill_chunk=5)
    assert got.tolist() == ref.tolist()


@pytest.mark.parametrize("arch", ("llama", "gemma-sw"))
def test_prefill_through_the_static_cache_when_the_dynamic_one_does_not_fit(checkpoints, arch, monkeypatch):
    import nvfp4_fix.generation.runner as runner

    model = load(checkpoints[arch])
    clear_cache(model)
    ids = prompt(model, length=17, seed=13)
    ref = hf_greedy(model, ids, 20)
    monkeypatch.setattr(runner, "holds_prompt", lambda *a: False)
    for chunk in (4096, 6):
        stats: dict = {}
        got = generate(
            model, ids, 20, use_cuda_graph=False, stop_token_ids=(), prefill_chunk=chunk, stats=stats
        )
        assert stats["prefill_mode"] == "static"
        assert got.tolist() == ref.tolist()


def test_greedy_static_loop_w4a4_activation_quantization():
    path = _fixture_dir("llama", ("nvfp4",))
    if path is None:
        pytest.skip("no W4A4 llama fixture")
    model = load(path)
    ids = prompt(model, seed=3)
    ref = hf_greedy(model, ids, 16)
    assert generate(model, ids, 16, use_cuda_graph=False, stop_token_ids=()).tolist() == ref.tolist()


def test_cpu_falls_back_to_model_generate_with_a_message(checkpoints, caplog):
    model = load(checkpoints["llama"])
    ids = prompt(model, seed=1)
    ref = hf_greedy(model, ids, 10)
    stats: dict = {}
    with caplog.at_level(logging.INFO, logger="nvfp4_fix"):
        got = generate(model, ids, 10, stop_token_ids=(), stats=stats)
    assert got.tolist() == ref.tolist()
    assert stats["path"] == "model.generate"
    assert any("falling back to model.generate" in r.getMessage() for r in caplog.records)


def test_empty_stop_list_disables_the_models_eos(checkpoints):
    # generate(stop_token_ids=()) must run to max_new_tokens even where model.generate would stop at the
    # generation_config's EOS; stop_token_ids=None means that EOS, as model.generate.
    model = load(checkpoints["mistral-sw"])
    eos = model.generation_config.eos_token_id
    ids = prompt(model, seed=9)
    free = hf_greedy(model, ids, 40)
    new = free[0, ids.shape[1] :].tolist()
    if eos is None or eos not in new[:-1]:
        pytest.skip("greedy text does not contain the EOS id")
    for use_graph in (False, True):  # True on the CPU: the model.generate fallback
        got = generate(model, ids, 40, stop_token_ids=(), use_cuda_graph=use_graph)
        assert got.tolist() == free.tolist()
        got = generate(model, ids, 40, use_cuda_graph=use_graph)
        assert got.tolist() == free[:, : ids.shape[1] + new.index(eos) + 1].tolist()


def test_one_dimensional_prompt_and_runner_reuse(checkpoints):
    model = load(checkpoints["qwen3"])
    clear_cache(model)
    a, b = prompt(model, seed=5), prompt(model, seed=6)
    ref_a, ref_b = hf_greedy(model, a, 9), hf_greedy(model, b, 9)
    assert generate(model, a[0], 9, use_cuda_graph=False, stop_token_ids=()).tolist() == ref_a.tolist()
    # same shapes: the cached runner (and its static cache) is reused and must be reset properly
    assert generate(model, b, 9, use_cuda_graph=False, stop_token_ids=()).tolist() == ref_b.tolist()
    assert generate(model, a, 9, use_cuda_graph=False, stop_token_ids=()).tolist() == ref_a.tolist()
    from nvfp4_fix.generation import RUNNERS_ATTR

    runners = getattr(model, RUNNERS_ATTR)
    assert len(runners) == 1
    first = next(iter(runners.values()))
    first.graph = sentinel = object()  # stands for a captured graph
    clear_cache(model)  # an emptied cache must stay attached and be refilled
    assert first.graph is None  # dropped at once, not whenever the GC gets to the runner's cycle
    generate(model, b, 9, use_cuda_graph=False, stop_token_ids=())
    generate(model, b, 9, use_cuda_graph=False, stop_token_ids=())
    assert len(runners) == 1 and next(iter(runners.values())) is not first
    # runners beyond the limit are evicted, least recently used first, their graphs freed at once
    kept = next(iter(runners.values()))
    kept.graph = sentinel
    for n in (5, 6):  # other cache lengths: other runners
        generate(model, b, n, use_cuda_graph=False, stop_token_ids=(), max_cache_len=64 * n)
    assert kept not in runners.values() and kept.graph is None
    # a runner (and the graph it captures) holds the kernels the settings chose: other settings, another
    clear_cache(model)
    generate(model, b, 9, use_cuda_graph=False, stop_token_ids=())
    with settings.override(kv_append=False):
        assert generate(model, b, 9, use_cuda_graph=False, stop_token_ids=()).tolist() == ref_b.tolist()
    assert len(runners) == 2


@pytest.mark.parametrize("sync_every", [1, 4, 64])
def test_stop_token_truncates_like_generate(checkpoints, sync_every):
    model = load(checkpoints["llama"])
    ids = prompt(model, seed=2)
    free = hf_greedy(model, ids, 30)[0, ids.shape[1] :].tolist()
    stop = free[6]
    first = free.index(stop)
    expected = hf_greedy(model, ids, 30, eos=stop)
    assert expected.shape[1] == ids.shape[1] + first + 1
    got = generate(model, ids, 30, use_cuda_graph=False, stop_token_ids=[stop], sync_every=sync_every)
    assert got.tolist() == expected.tolist()
    # the generation_config's eos ids are the default stop tokens
    model.generation_config.eos_token_id = stop
    try:
        got = generate(model, ids, 30, use_cuda_graph=False, sync_every=sync_every)
    finally:
        model.generation_config.eos_token_id = None
    assert got.tolist() == expected.tolist()


def test_streamer_gets_prompt_then_tokens(checkpoints):
    model = load(checkpoints["mistral-sw"])
    ids = prompt(model, seed=4)
    free = hf_greedy(model, ids, 20)[0, ids.shape[1] :].tolist()
    for stop, sync_every in (((), 3), ((free[11],), 4), ((free[0],), 8)):
        s = Collect()
        out = generate(
            model, ids, 20, use_cuda_graph=False, stop_token_ids=stop, streamer=s, sync_every=sync_every
        )
        assert s.ended
        assert s.puts[0].tolist() == ids[0].tolist()
        streamed = torch.cat(s.puts[1:]).tolist()
        assert streamed == out[0, ids.shape[1] :].tolist()
        n = len(free) if not stop else free.index(stop[0]) + 1
        assert streamed == free[:n]
        assert all(len(p) <= sync_every for p in s.puts[2:])


def test_batch_greedy_with_rows_stopping_at_different_steps(checkpoints):
    model = load(checkpoints["gemma-sw"])
    ids = prompt(model, batch=2, seed=7)
    free = hf_greedy(model, ids, 16)
    new = free[:, ids.shape[1] :]
    assert generate(model, ids, 16, use_cuda_graph=False, stop_token_ids=()).tolist() == free.tolist()
    # a stop token that row 0 emits early: row 0 is padded afterwards, row 1 runs on (or stops too)
    stop = int(new[0, 3])
    expected = hf_greedy(model, ids, 16, eos=stop, pad=0)
    got = generate(model, ids, 16, use_cuda_graph=False, stop_token_ids=[stop], pad_token_id=0, sync_every=5)
    assert got.tolist() == expected.tolist()


def test_max_cache_len_too_small_is_an_error(checkpoints):
    model = load(checkpoints["llama"])
    with pytest.raises(ValueError, match="max_cache_len"):
        generate(model, prompt(model), 20, use_cuda_graph=False, max_cache_len=16)


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------
def test_warp_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 200, generator=g) * 3
    for t, k, p in ((0.7, None, None), (1.0, 20, None), (1.3, None, 0.8), (0.5, 50, 0.9), (1.0, 1, None),
                    (2.0, 500, 0.05)):  # fmt: skip
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p is not None:
            ref = TopPLogitsWarper(p)(None, ref)
        got = warp_logits(logits, t, k, p)
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), (t, k, p)
        torch.testing.assert_close(got[~torch.isinf(got)], ref[~torch.isinf(ref)])


def test_exponential_race_samples_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(40000, -1)
    counts = torch.bincount(make_sampler(1.0)(logits), minlength=5).float() / 40000
    assert counts[4] == 0
    torch.testing.assert_close(counts, probs, atol=0.01, rtol=0)
    # top-k 2: renormalised over the two best
    counts = torch.bincount(make_sampler(1.0, top_k=2)(logits), minlength=5).float() / 40000
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.01, rtol=0)
    # top-p 0.7: transformers' rule keeps 0.5 and 0.3 (cumulative mass from below <= 0.3 goes)
    counts = torch.bincount(make_sampler(1.0, top_p=0.7)(logits), minlength=5).float() / 40000
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.01, rtol=0)


def test_sampling_end_to_end(checkpoints):
    model = load(checkpoints["llama"])
    ids = prompt(model, seed=8)
    greedy = generate(model, ids, 12, use_cuda_graph=False, stop_token_ids=())
    # top_k=1 leaves one candidate: the greedy token
    assert (
        generate(model, ids, 12, use_cuda_graph=False, stop_token_ids=(), temperature=0.8, top_k=1).tolist()
        == greedy.tolist()
    )
    torch.manual_seed(11)
    a = generate(model, ids, 12, use_cuda_graph=False, stop_token_ids=(), temperature=1.0, top_p=0.9)
    torch.manual_seed(11)
    b = generate(model, ids, 12, use_cuda_graph=False, stop_token_ids=(), temperature=1.0, top_p=0.9)
    assert a.tolist() == b.tolist()
    assert a.shape == greedy.shape
    with pytest.raises(ValueError):
        make_sampler(1.0, top_p=0.0)


# --------------------------------------------------------------------------------------------------
# GPU: the captured CUDA graph
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS + WINDOWED)
def test_cuda_graph_greedy_matches(checkpoints, arch):
    # float32: the graph must give model.generate's tokens exactly
    model = load(checkpoints[arch], torch.float32, "cuda")
    ids = prompt(model, seed=9)
    ref = hf_greedy(model, ids, 40)
    stats: dict = {}
    got = generate(model, ids, 40, stop_token_ids=(), stats=stats).cpu()
    assert stats["path"] == "cuda-graph", stats
    assert got.tolist() == ref.tolist()
    # bf16: the replayed graph runs the very kernels of the eager static loop -> identical tokens
    model16 = load(checkpoints[arch], torch.bfloat16, "cuda")
    stats = {}
    graph = generate(model16, ids, 40, stop_token_ids=(), stats=stats).cpu()
    assert stats["path"] == "cuda-graph", stats
    eager = generate(model16, ids, 40, stop_token_ids=(), use_cuda_graph=False).cpu()
    assert graph.tolist() == eager.tolist()
    ref16 = hf_greedy(model16, ids, 40)
    same = (graph == ref16).all(0).float().mean().item()
    print(f"{arch} bf16 graph vs model.generate: {same:.0%} of positions equal")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_graph_reuse_stop_stream_and_sampling(checkpoints):
    model = load(checkpoints["llama"], torch.float32, "cuda")
    clear_cache(model)  # the previous test left a runner of the same shape on this model
    a, b = prompt(model, seed=10), prompt(model, seed=12)
    stats: dict = {}
    generate(model, a, 30, stop_token_ids=(), stats=stats)
    assert "capture_s" in stats
    stats = {}
    got_b = generate(model, b, 30, stop_token_ids=(), stats=stats).cpu()
    assert "capture_s" not in stats and stats["path"] == "cuda-graph"  # replayed the cached graph
    assert got_b.tolist() == hf_greedy(model, b, 30).tolist()
    free = got_b[0, b.shape[1] :].tolist()
    stop = free[9]
    s = Collect()
    got = generate(model, b, 30, stop_token_ids=[stop], streamer=s, sync_every=4).cpu()
    assert got.tolist() == hf_greedy(model, b, 30, eos=stop).tolist()
    assert torch.cat(s.puts[1:]).tolist() == got[0, b.shape[1] :].tolist()
    # sampling inside the graph: reproducible under a seed, tokens vary between seeds
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(
            generate(model, a, 30, stop_token_ids=(), temperature=1.0, top_k=50, top_p=0.95).cpu().tolist()
        )
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# --------------------------------------------------------------------------------------------------
# decode attention: query heads folded instead of repeat_kv
# --------------------------------------------------------------------------------------------------
def test_packed_gqa_attention_equals_transformers_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from nvfp4_fix.generation.attention import packed_gqa_sdpa

    class Attn(torch.nn.Module):
        num_key_value_groups = 4
        is_causal = True

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 1, 16, generator=g)
    k, v = torch.randn(2, 2, 40, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g)
    mask = torch.rand(2, 1, 1, 40, generator=g) > 0.3
    mask[..., 0] = True
    calls = []

    def orig(*a, **kw):
        calls.append(1)
        return sdpa_attention_forward(*a, **kw)

    packed = packed_gqa_sdpa(orig)
    for m in (mask, None, torch.where(mask, 0.0, float("-inf"))):
        want, _ = sdpa_attention_forward(Attn(), q, k, v, m, scaling=0.3)
        got, _ = packed(Attn(), q, k, v, m, scaling=0.3)
        assert got.shape == want.shape == (2, 1, 8, 16)
        torch.testing.assert_close(got, want)
    assert not calls
    # several query tokens, per-head masks or a position bias go to the original function
    packed(Attn(), torch.randn(2, 8, 3, 16), k, v, None)
    packed(Attn(), q, k, v, mask.expand(2, 8, 1, 40))
    packed(Attn(), q, k, v, mask, position_bias=torch.zeros(2, 8, 1, 40))
    assert len(calls) == 3


def test_decode_attention_is_registered_under_its_own_name_and_switched_per_model(checkpoints, monkeypatch):
    """Decode steps go through transformers' attention registry under nvfp4-fix's own name: the model's
    config is switched to it for the call and back afterwards; the global "sdpa" entry and other models
    are never touched."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from nvfp4_fix.generation import attention

    model = load(checkpoints["llama"])
    if model.config._attn_implementation != "sdpa":
        pytest.skip("model does not use sdpa")
    other = load(checkpoints["qwen3"])
    before = (ALL_ATTENTION_FUNCTIONS["sdpa"], ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    assert attention.register()
    registered = ALL_ATTENTION_FUNCTIONS[attention.NAME]
    used, seen_by_other = [], []

    def spy(module, query, *a, **kw):
        used.append(query.shape[2])
        seen_by_other.append(other.config._attn_implementation)
        return registered(module, query, *a, **kw)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, attention.NAME, spy)
    ids = prompt(model, seed=14)
    ref = hf_greedy(model, ids, 12)
    for pack in (True, False):
        used.clear()
        got = generate(model, ids, 12, use_cuda_graph=False, stop_token_ids=(), pack_gqa=pack)
        assert got.tolist() == ref.tolist()
        assert (1 in used) is pack  # decode steps (one query token) came through the registry
        assert model.config._attn_implementation == "sdpa"
        assert model.config.get_text_config()._attn_implementation == "sdpa"
        assert (ALL_ATTENTION_FUNCTIONS["sdpa"], ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]) == before
    assert set(seen_by_other) == {"sdpa"}
    with pytest.raises(RuntimeError), attention.decode_attention(model) as active:  # restored on errors too
        assert active and model.config._attn_implementation == attention.NAME
        raise RuntimeError
    assert model.config._attn_implementation == "sdpa"


def test_compiled_greedy_step_matches_generate(checkpoints):
    """compile_step with greedy sampling compiles the forward and the argmax together (eager loop)."""
    model = load(checkpoints["llama"])
    ids = prompt(model)
    ref = hf_greedy(model, ids, 8)
    got = generate(model, ids, 8, use_cuda_graph=False, compile_step=True, stop_token_ids=())
    assert got.tolist() == ref.tolist()


def test_two_stage_argmax_is_the_first_maximum():
    from nvfp4_fix.generation import argmax_first

    compiled = torch.compile(argmax_first, dynamic=False)
    for trial, v in enumerate((128256, 5000, 4097, 1000)):
        g = torch.Generator().manual_seed(trial)
        x = torch.randint(-3, 4, (3, v), generator=g).to(torch.bfloat16)  # many ties
        x[1, -1] = 10  # the maximum in the padded last chunk
        x[2, :] = 1.0  # all equal: index 0
        ref = torch.argmax(x, dim=-1)
        assert torch.equal(argmax_first(x), ref)
        if v == 5000:
            assert torch.equal(compiled(x), ref)
