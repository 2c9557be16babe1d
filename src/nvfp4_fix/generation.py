"""Fast batch-1 generation: a static KV cache, the decode step captured once in a CUDA graph, sampling
and stop-token checks on the device.

    from nvfp4_fix.generation import generate
    out = generate(model, input_ids, max_new_tokens=256)            # greedy
    out = generate(model, input_ids, 256, temperature=0.7, top_p=0.9, streamer=TextStreamer(tok))

Why: ``model.generate`` launches every kernel of every layer from Python for every token (~225 linear
launches plus ~1500 small ones for an 8B Llama), and its dynamic cache reallocates; at batch 1 the
GPU mostly waits for the CPU. Here:

* the KV cache is a transformers ``StaticCache`` whose layers are all full-length ``StaticLayer``\\ s
  (sliding-window layers, e.g. Gemma 2 / Mistral, are replaced by full ones: the sliding window is then
  applied by the attention mask alone, which is exact and keeps every update free of host-side
  branching, so one graph serves the whole generation);
* the prompt is prefilled eagerly through the model's normal path -- a ``DynamicCache`` and the
  model's SDPA/flash causal attention over the filled part only, as ``model.generate`` does -- then its
  K/V are copied into the static cache (the prompt's K/V are held twice for that moment). Prompts
  longer than ``prefill_chunk`` (default 4096) run in chunks, which bounds the activations (e.g.
  [chunk, intermediate] in the MLP); no [prompt, vocab] logits are made. NVFP4 weights are dequantized
  once per chunk into a scratch that does not grow with the prompt: ``dequant_mm`` works in row chunks
  of the weight of at most 256 MiB each (``NVFP4_FIX_SCRATCH_MB``);
* one decode step -- forward on a static ``input_ids``/position tensor, sampling, stop-token
  bookkeeping, writing the token into a device-side sequence buffer, advancing the position -- is
  warmed up on a side stream, captured into a ``torch.cuda.CUDAGraph`` and replayed once per token;
* each decode token's K and V are written into the static cache, and the layer's length advanced, by
  one launch (``kernels/kv_cache.py``) instead of ``StaticLayer.update``'s three ops
  (``NVFP4_FIX_KV_APPEND=0`` keeps transformers' own);
* decode attention (one query token over the static cache) is a Triton split-KV kernel
  (``kernels/decode_attention.py``) that reads only the cache blocks the mask allows -- not the whole
  cache, and without ``repeat_kv`` copies of it -- also under ``compile_step`` (an opaque custom op);
  where it does not apply, SDPA with the query heads folded (see :func:`_packed_gqa_sdpa`;
  ``NVFP4_FIX_DECODE_ATTENTION=0`` turns the kernel off, ``pack_gqa=False`` both);
* sampling is multinomial-free: temperature, top-k (``torch.topk`` threshold) and top-p (the same
  rule as transformers' ``TopPLogitsWarper``), then ``argmax(p / E)`` with ``E ~ Exp(1)`` (the
  exponential race, an exact sample from ``p``) drawn from the default CUDA generator, which graph
  replays advance (``torch.manual_seed`` makes runs reproducible);
* stop tokens are tracked on the device (finished rows emit the pad id, as in transformers); the host
  reads the finished flags only every ``sync_every`` tokens (default 8), so at most ``sync_every - 1``
  tokens are computed past a stop and then dropped. A streamer receives the prompt first, then the new
  tokens in the same chunks (``TextStreamer`` / ``TextIteratorStreamer`` accept chunks).

Greedy output equals ``model.generate(do_sample=False)`` token for token: tested on the CPU (the eager
static-cache loop) for Llama, Mistral, Qwen3 and Gemma 2, sliding windows included, and with the
captured graph on an H100 (tests/test_generation.py, ``-m gpu``). The first token is computed exactly
as ``model.generate`` computes it (same prefill path); later steps attend over the static cache with a
mask, which sums in another order, so on models with near-tied logits (e.g. random weights) bf16 runs
can part ways after a few tokens. Sampling draws from the same distribution
as ``model.generate`` but with another random stream.

Measured (H100, random Llama-3-8B shape, batch 1, prompt 128 / 2048, benchmarks/RESULTS-generation.md):
NVFP4 217 / 210 tok/s with the graph, 327-329 / 310-311 tok/s with ``compile_step=True`` (10-40 s
of compilation on the first call); bf16 118 / 115 tok/s with the graph against 10-13 tok/s for
``model.generate``.

Falls back to ``model.generate`` (logged once, with the reason) where graph capture is impossible: on
the CPU, models spread over several devices, architectures without static-cache support, or when the
capture itself fails. ``use_cuda_graph=False`` runs the same static-cache loop eagerly (any device).
Captured graphs and their KV caches are kept on the model (at most 2, least recently used dropped)
and reused by later calls with the same batch size, cache length and sampling settings;
:func:`clear_cache` frees them (call it after moving or changing the model's weights).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

try:  # Triton is optional: without it decode attention stays on SDPA
    from .kernels import decode_attention as _triton_decode
except Exception:  # pragma: no cover - depends on the environment
    _triton_decode = None
from .kernels import kv_cache as _kv_cache

logger = logging.getLogger("nvfp4_fix")

# NVFP4_FIX_DECODE_ATTENTION=0: decode attention through SDPA instead of the Triton split-KV kernel
_TRITON_DECODE = os.environ.get("NVFP4_FIX_DECODE_ATTENTION", "1") != "0"
# NVFP4_FIX_KV_APPEND=0: the decode step's cache update through StaticLayer's own ops
_KV_APPEND = os.environ.get("NVFP4_FIX_KV_APPEND", "1") != "0"
# devices whose tensors go to that kernel; not the CPU even under TRITON_INTERPRET=1 (~40 ms a call)
_TRITON_DECODE_DEVICES = ("cuda",)

_RUNNERS_ATTR = "_nvfp4_fix_generation_runners"
_MAX_RUNNERS = 2
_WARMUP_STEPS = 2
_CACHE_ALIGN = 128


# ------------------------------------------------------------------------------------------------
# transformers API differences (4.57: past_key_values + cache_position; 5.0-5.2x: past_key_values,
# cache writes driven by the cache's own device-side length; 5.24+: the kwarg is called ``cache``)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ForwardApi:
    cache_kw: str
    cache_position: bool
    logits_kw: str | None


def _forward_api(model: nn.Module) -> _ForwardApi:
    params = inspect.signature(model.forward).parameters
    cache_kw = (
        "past_key_values"
        if "past_key_values" in params
        else "cache"
        if "cache" in params
        else "past_key_values"
    )
    logits_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return _ForwardApi(cache_kw, "cache_position" in params, logits_kw)


@functools.cache
def _append_layer_class() -> type:
    from transformers.cache_utils import StaticLayer

    class AppendLayer(StaticLayer):
        """A ``StaticLayer`` whose one-token update (the decode step) is one kernel instead of three:
        ``kernels.kv_cache.append_kv`` writes K and V at ``cumulative_length`` and advances it, as
        ``StaticLayer.update`` does. Other updates, and versions without ``cumulative_length``, are
        ``StaticLayer``'s own."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
            length = getattr(self, "cumulative_length", None)
            if (
                not _KV_APPEND
                or not getattr(self, "is_initialized", False)
                or key_states.shape[-2] != 1
                or not isinstance(length, torch.Tensor)
                or not _kv_cache.supports(self.keys, self.values, key_states, value_states, length)
            ):
                return super().update(key_states, value_states, *args, **kwargs)
            if torch.compiler.is_compiling():
                torch.ops.nvfp4_fix.append_kv(self.keys, self.values, key_states, value_states, length)
            else:
                _kv_cache.append_kv(self.keys, self.values, key_states, value_states, length)
            return self.keys, self.values

    return AppendLayer


def _make_static_cache(model: nn.Module, max_cache_len: int) -> Any:
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise RuntimeError("this transformers version's StaticCache has no per-layer API")
    # Full-length layers: the sliding window is applied by the mask (exact), and updates have no
    # host-side state, so a captured graph stays valid for the whole generation.
    layers[:] = [_append_layer_class()(max_cache_len=max_cache_len) for _ in layers]
    return cache


def _reset_cache(cache: Any) -> None:
    """Zero the cache in place (tensor addresses are baked into captured graphs)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", False):
            layer.keys.zero_()
            layer.values.zero_()
        length = getattr(layer, "cumulative_length", None)
        if isinstance(length, torch.Tensor):
            length.zero_()


def _cache_lengths(cache: Any) -> list[torch.Tensor]:
    return [
        t
        for t in (getattr(layer, "cumulative_length", None) for layer in cache.layers)
        if isinstance(t, torch.Tensor)
    ]


def _holds_prompt(layers: list[Any], n_static: int, length: int) -> bool:
    """Whether a prefilled DynamicCache's layers hold the whole prompt, one per static-cache layer."""
    return len(layers) == n_static and all(
        isinstance(getattr(d, "keys", None), torch.Tensor) and d.keys.shape[-2] == length for d in layers
    )


# kwargs under which the packed path would not compute what transformers' sdpa function computes
_SDPA_SPECIAL = ("softcap", "position_bias", "sinks", "s_aux", "head_mask", "output_attentions")


def _attention_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor | None) -> ModuleType | None:  # fmt: skip
    """The Triton split-KV decode kernel module where it takes these inputs, else None."""
    if (
        _triton_decode is None
        or not _TRITON_DECODE
        or query.device.type not in _TRITON_DECODE_DEVICES
        or not _triton_decode.supports(query, key, value, mask)
    ):
        return None
    return _triton_decode


def _packed_gqa_sdpa(orig: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' ``sdpa`` attention, for one query token (the decode step) without the copies of
    K/V that ``repeat_kv`` makes over the whole static cache (2 x [B, H, cache, D] per layer and token):

    * where it applies (CUDA tensors, see ``kernels.decode_attention.supports``), the Triton split-KV
      kernel, which also skips the cache blocks the mask excludes (the unfilled tail); under
      torch.compile through the opaque custom op ``torch.ops.nvfp4_fix.decode_attention``;
    * else, eagerly and with grouped K/V heads, SDPA with the query heads folded into the query-length
      axis ([B, H, 1, D] -> [B, H_kv, H / H_kv, D]; transformers >= 5.24 does the same, ``pack_gqa``).

    Same numbers up to summation order. Every other case (several query tokens, per-head masks,
    dropout, soft-capping, sinks ...), and the SDPA path while tracing, goes to ``orig``."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
        b, h, q, d = query.shape
        groups = int(getattr(module, "num_key_value_groups", 1) or 1)
        mask = attention_mask
        plain = not (
            q != 1
            or dropout
            or key.shape[1] * groups != h
            or key.shape[-1] != value.shape[-1]
            or any(kwargs.get(k) is not None and kwargs.get(k) is not False for k in _SDPA_SPECIAL)
            or (mask is not None and (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1))
        )
        kernel = _attention_kernel(query, key, value, mask) if plain else None
        if kernel is not None:
            scale = float(scaling) if scaling is not None else d**-0.5
            if torch.compiler.is_compiling():
                return torch.ops.nvfp4_fix.decode_attention(query, key, value, mask, scale), None
            return kernel.decode_attention(query, key, value, mask, scale), None
        if not plain or groups <= 1 or torch.compiler.is_compiling():
            return orig(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        is_causal=is_causal, **kwargs)  # fmt: skip
        if mask is not None:
            mask = mask[:, :, :, : key.shape[-2]]
        out = torch.nn.functional.scaled_dot_product_attention(
            query.reshape(b, h // groups, groups, d), key, value, attn_mask=mask, scale=scaling
        )
        return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None

    return attention


def _mask_once(orig: Callable[..., Any]) -> Callable[..., Any]:
    """transformers' ``sdpa`` mask function, whose mask inductor computes once per step: a cheap
    pointwise input of an opaque op is otherwise recomputed into a new buffer for every op that reads
    it (the same [B, 1, 1, L] mask for each layer's decode attention: one kernel per layer and token).
    Returned through an opaque op, the mask is a buffer that every layer shares."""

    def mask(*args: Any, **kwargs: Any) -> Any:
        m = orig(*args, **kwargs)
        if isinstance(m, torch.Tensor) and _triton_decode is not None and torch.compiler.is_compiling():
            return torch.ops.nvfp4_fix.materialize(m)
        return m

    return mask


@contextlib.contextmanager
def _override(registry: Any, name: str, wrap: Callable[[Any], Any]) -> Iterator[None]:
    """``registry[name] = wrap(registry[name])`` in a transformers interface's local mapping, restored
    on exit; nothing where the registry or the name does not exist."""
    local = getattr(registry, "_local_mapping", None)
    if not isinstance(local, dict) or name not in registry:
        yield
        return
    had, prev = name in local, local.get(name)
    registry[name] = wrap(registry[name])
    try:
        yield
    finally:
        if had:
            registry[name] = prev
        else:
            del registry[name]


@contextlib.contextmanager
def _decode_attention(enabled: bool) -> Iterator[None]:
    """Within the block, the ``sdpa`` attention of every transformers model is :func:`_packed_gqa_sdpa`
    and its mask function :func:`_mask_once` (local overrides of ``ALL_ATTENTION_FUNCTIONS`` and
    ``ALL_MASK_ATTENTION_FUNCTIONS``, restored on exit). Captured graphs keep the kernels they recorded,
    so only eager steps, warm-up and capture need the block."""
    if not enabled:
        yield
        return
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as funcs
    except ImportError:  # pragma: no cover - very old transformers
        yield
        return
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks
    except ImportError:  # pragma: no cover - transformers without masking_utils
        masks = None
    with _override(funcs, "sdpa", _packed_gqa_sdpa), _override(masks, "sdpa", _mask_once):
        yield


# ------------------------------------------------------------------------------------------------
# sampling, on the device, without torch.multinomial
# ------------------------------------------------------------------------------------------------
def warp_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """float32 scores [B, V] after temperature, top-k and top-p, as transformers' warpers (in that
    order): removed tokens are -inf. Static shapes, no host sync."""
    scores = logits.float() / temperature
    if top_k:
        k = min(int(top_k), scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, dim=-1, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1.0 - top_p)
        remove[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return scores


def argmax_first(logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``torch.argmax(logits, -1)`` for [B, V] (the first maximum on ties), in two stages (the maximum
    of each ``chunk`` values, then of those) so that a compiled step reduces a 128k vocabulary in
    parallel rather than in one program."""
    b, v = logits.shape
    if v <= 4 * chunk:
        return torch.argmax(logits, dim=-1)
    x = torch.nn.functional.pad(logits.float(), (0, -v % chunk), value=float("-inf"))
    best, idx = x.view(b, -1, chunk).max(dim=-1)
    which = torch.argmax(best, dim=-1, keepdim=True)
    return (which * chunk + idx.gather(-1, which)).squeeze(-1)


def make_sampler(
    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits [B, V] -> token ids [B] (int64). temperature 0 (or None) is greedy (argmax, first max on
    ties, as transformers). Otherwise :func:`warp_logits`, then an exact sample by the exponential
    race argmax(p / E), E ~ Exp(1) i.i.d.: no torch.multinomial, no host sync, graph-safe."""
    if not temperature or temperature <= 0:

        def greedy(logits: torch.Tensor) -> torch.Tensor:
            return torch.argmax(logits, dim=-1)

        greedy.greedy = True  # type: ignore[attr-defined]
        return greedy
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")

    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(warp_logits(logits, temperature, top_k, top_p), dim=-1)
        race = torch.empty_like(probs).exponential_(1.0).clamp_min_(1e-30)
        return torch.argmax(probs / race, dim=-1)

    return sample


# ------------------------------------------------------------------------------------------------
# the static-cache runner (one per model x batch x cache length x sampling settings)
# ------------------------------------------------------------------------------------------------
class _Runner:
    def __init__(
        self,
        model: nn.Module,
        batch: int,
        max_cache_len: int,
        device: torch.device,
        sampler: Callable[[torch.Tensor], torch.Tensor],
        stop_ids: tuple[int, ...],
        pad_id: int,
        compile_step: bool,
    ) -> None:
        self.model = model
        self.api = _forward_api(model)
        self.batch, self.max_cache_len, self.device = batch, max_cache_len, device
        self.sampler = sampler
        self.cache = _make_static_cache(model, max_cache_len)
        z = functools.partial(torch.zeros, dtype=torch.long, device=device)
        self.ids = z(batch, 1)  # the token the next decode step consumes
        self.pos = z(1)  # its position
        self.seq = z(batch, max_cache_len)  # the whole sequence, token t at column t
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.stop = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
        self.pad = torch.tensor(pad_id, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_failed = False
        self.capture_s = 0.0
        self._forward = self._decode_forward
        self._tokens = self._sample
        if compile_step and getattr(sampler, "greedy", False):
            # the argmax (two parallel stages) compiled with the forward
            self._tokens = torch.compile(self._greedy_tokens, dynamic=False, fullgraph=False)
        elif compile_step:
            self._forward = torch.compile(self._decode_forward, dynamic=False, fullgraph=False)

    # -- model calls -----------------------------------------------------------------------------
    def _kwargs(
        self, position_ids: torch.Tensor, cache_position: torch.Tensor, cache: Any = None
    ) -> dict[str, Any]:
        kw: dict[str, Any] = {
            self.api.cache_kw: self.cache if cache is None else cache,
            "use_cache": True,
            "position_ids": position_ids,
        }
        if self.api.cache_position:
            kw["cache_position"] = cache_position
        if self.api.logits_kw:
            kw[self.api.logits_kw] = 1
        return kw

    def _decode_forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, **self._kwargs(pos.view(1, 1).expand(self.batch, 1), pos))
        return out.logits[:, -1, :]

    def _sample(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.sampler(self._forward(ids, pos))

    def _greedy_tokens(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return argmax_first(self._decode_forward(ids, pos))

    def _finish(self, nxt: torch.Tensor) -> torch.Tensor:
        if self.stop is not None:
            nxt = torch.where(self.unfinished, nxt, self.pad)
            self.unfinished &= ~(nxt.unsqueeze(-1) == self.stop).any(-1)
        return nxt

    def decode_step(self) -> None:
        """One token: everything on the device, no host sync (this is what gets captured)."""
        nxt = self._finish(self._tokens(self.ids, self.pos))
        self.pos.add_(1)
        self.seq.index_copy_(1, self.pos, nxt.unsqueeze(1))
        self.ids.copy_(nxt.unsqueeze(1))

    def prefill(self, input_ids: torch.Tensor, chunk: int) -> str:
        """Fill the cache with the prompt and sample the first new token (eager). Returns the mode used.

        The prompt runs through the model's normal path with a ``DynamicCache`` (one forward per
        ``chunk`` tokens: SDPA/flash causal attention over the filled part only, each NVFP4 weight
        dequantized once per chunk), then its K/V are copied into the static cache. Where the dynamic
        cache does not hold the whole prompt per layer (an architecture whose dynamic cache trims or
        shares layers), it falls back to prefilling through the static cache itself."""
        from transformers import DynamicCache

        b, p = input_ids.shape
        _reset_cache(self.cache)
        self.unfinished.fill_(True)
        dyn = DynamicCache()
        logits = self._prefill_chunks(input_ids, chunk, dyn)
        layers = list(getattr(dyn, "layers", None) or [])
        mode = "dynamic"
        if _holds_prompt(layers, len(self.cache.layers), p):
            positions = torch.arange(p, device=self.device)
            for d, s in zip(layers, self.cache.layers, strict=True):
                # 4.57 writes at cache_kwargs["cache_position"]; 5.x at its own length (reset to 0 above)
                s.update(d.keys, d.values, {"cache_position": positions})
                d.keys = d.values = None  # free the prompt's dynamic K/V layer by layer
        else:
            del dyn
            mode = "static"
            logits = self._prefill_chunks(input_ids, chunk, None)
        nxt = self._finish(self.sampler(logits))
        self.seq[:, :p].copy_(input_ids)
        self.seq[:, p].copy_(nxt)
        self.ids.copy_(nxt.unsqueeze(1))
        self.pos.fill_(p)
        return mode

    def _prefill_chunks(self, input_ids: torch.Tensor, chunk: int, cache: Any) -> torch.Tensor:
        """Run the prompt in chunks through ``cache`` (None: the static cache); last position's logits."""
        b, p = input_ids.shape
        logits = None
        for s in range(0, p, chunk):
            e = min(p, s + chunk)
            positions = torch.arange(s, e, device=self.device)
            kw = self._kwargs(positions.unsqueeze(0).expand(b, -1), positions, cache)
            out = self.model(input_ids=input_ids[:, s:e], **kw)
            logits = out.logits[:, -1, :]
            del out
        assert logits is not None
        return logits

    # -- CUDA graph --------------------------------------------------------------------------------
    def _save(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        state = [self.ids, self.pos, self.unfinished, *_cache_lengths(self.cache)]
        return [(t, t.clone()) for t in state]

    @staticmethod
    def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for t, copy in saved:
            t.copy_(copy)

    def capture(self) -> None:
        """Warm up on a side stream (compiles kernels, allocates), restore the state, then capture one
        decode step. Called right after a prefill; leaves the runner's state as it found it."""
        t0 = time.perf_counter()
        saved = self._save()
        rng = torch.cuda.get_rng_state(self.device)  # the warm-up samples must not shift the stream
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_STEPS):
                self.decode_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._restore(saved)
        graph = torch.cuda.CUDAGraph()
        # A CUDAGraph that the garbage collector frees during the capture (e.g. a dropped runner's, kept
        # alive by a reference cycle) resets itself, which invalidates the capture: collect first, and
        # not during it.
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph):
                self.decode_step()
        finally:
            if collecting:
                gc.enable()
        self._restore(saved)  # capture runs nothing, but be certain
        torch.cuda.synchronize(self.device)
        torch.cuda.set_rng_state(rng, self.device)
        self.graph = graph
        self.capture_s = time.perf_counter() - t0

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.decode_step()


# ------------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------------
def clear_cache(model: nn.Module) -> None:
    """Drop the captured graphs and static caches kept on ``model`` by :func:`generate`."""
    runners = getattr(model, _RUNNERS_ATTR, None)
    while runners:
        _drop(runners.popitem()[1])


def _drop(runner: _Runner) -> None:
    """Free a runner's graph now (runners sit in reference cycles, so the GC would free it later, at a
    time of its choosing -- possibly during another capture)."""
    runner.graph = None


def _model_device(model: nn.Module) -> torch.device:
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    devices.discard(torch.device("meta"))
    if len(devices) != 1:
        raise _Unsupported(f"the model spans several devices ({sorted(map(str, devices))})")
    return devices.pop()


class _Unsupported(Exception):
    pass


def _check_model(model: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        raise _Unsupported("only decoder-only transformers models are supported")
    if not getattr(type(model), "_can_compile_fullgraph", False) or getattr(
        type(model), "_is_stateful", False
    ):
        raise _Unsupported(f"{type(model).__name__} does not support a static KV cache")


def _stop_ids(model: nn.Module, stop_token_ids: int | Iterable[int] | None) -> tuple[int, ...]:
    if stop_token_ids is None:
        gc = getattr(model, "generation_config", None)
        stop_token_ids = getattr(gc, "eos_token_id", None)
        if stop_token_ids is None:
            stop_token_ids = getattr(getattr(model, "config", None), "eos_token_id", None)
    if stop_token_ids is None:
        return ()
    if isinstance(stop_token_ids, int):
        return (stop_token_ids,)
    return tuple(int(t) for t in stop_token_ids)


def _pad_id(model: nn.Module, stop: tuple[int, ...], pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        pid = getattr(src, "pad_token_id", None)
        if isinstance(pid, int):
            return pid
    return stop[0] if stop else 0


_logged: set[str] = set()


def _log_fallback(reason: str) -> None:
    msg = f"nvfp4-fix: fast generation unavailable ({reason}); falling back to model.generate"
    if reason not in _logged:
        _logged.add(reason)
        logger.warning(msg)
    else:
        logger.info(msg)


def _hf_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop: tuple[int, ...],
    pad_id: int,
    streamer: Any,
) -> torch.Tensor:
    import copy

    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    gc = copy.deepcopy(base) if base is not None else GenerationConfig()
    sampling = bool(temperature) and temperature > 0
    gc.do_sample = sampling
    gc.temperature = float(temperature) if sampling else 1.0
    gc.top_k = int(top_k) if (sampling and top_k) else None
    gc.top_p = float(top_p) if (sampling and top_p is not None) else 1.0
    gc.max_new_tokens = int(max_new_tokens)
    gc.max_length = None
    gc.min_new_tokens = None
    gc.min_length = 0
    gc.eos_token_id = list(stop) if stop else []  # None would let generate() restore the model's EOS ids
    gc.pad_token_id = pad_id
    return model.generate(input_ids=input_ids, generation_config=gc, streamer=streamer)


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: int | Iterable[int] | None = None,
    streamer: Any = None,
    prefill_chunk: int = 4096,
    use_cuda_graph: bool = True,
    sync_every: int = 8,
    max_cache_len: int | None = None,
    pad_token_id: int | None = None,
    compile_step: bool = False,
    pack_gqa: bool = True,
    stats: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids`` [B, P] (or [P]); return [B, P + n] ids
    like ``model.generate`` (the prompt included; generation stops once every row produced a stop token,
    which is kept; rows that stopped earlier are padded with ``pad_token_id``).

    ``temperature`` 0 is greedy. ``stop_token_ids`` None means the model's ``generation_config``
    EOS ids; pass ``()`` for none. Prompts must not be padded (no attention mask is taken).
    ``use_cuda_graph=False`` runs the static-cache loop eagerly. ``prefill_chunk``: the most prompt
    tokens per prefill forward (bounds activation memory; each chunk re-reads every weight).
    ``sync_every``: tokens between two host reads of the stop flags / streamer flushes.
    ``max_cache_len``: the static cache size (default: prompt + new tokens, rounded up to 128).
    ``compile_step`` additionally wraps the decode forward in ``torch.compile`` (fuses norms, rotary
    and other small kernels) before capture. ``pack_gqa`` (default on): decode attention runs the Triton
    split-KV kernel, or folds grouped query heads into SDPA, instead of repeating K/V over the whole
    cache (see :func:`_packed_gqa_sdpa`; sdpa models only).
    ``stats``, if given a dict, receives timings and the path taken.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if max_new_tokens <= 0:
        return input_ids
    if prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
    sync_every = max(1, int(sync_every))
    stats = stats if stats is not None else {}
    stop = _stop_ids(model, stop_token_ids)
    pad_id = _pad_id(model, stop, pad_token_id)
    sampling = bool(temperature) and temperature > 0

    def fallback(reason: str) -> torch.Tensor:
        _log_fallback(reason)
        stats["path"] = "model.generate"
        stats["fallback_reason"] = reason
        return _hf_generate(
            model, input_ids, max_new_tokens, temperature, top_k, top_p, stop, pad_id, streamer
        )

    try:
        _check_model(model)
        device = _model_device(model)
    except _Unsupported as e:
        return fallback(str(e))
    if use_cuda_graph and device.type != "cuda":
        return fallback(f"CUDA graphs need a CUDA device, the model is on {device.type}")
    if use_cuda_graph and not torch.cuda.is_available():
        return fallback("CUDA is not available")

    batch, plen = input_ids.shape
    input_ids = input_ids.to(device)
    need = plen + max_new_tokens + _WARMUP_STEPS
    cache_len = max_cache_len or _CACHE_ALIGN * math.ceil(need / _CACHE_ALIGN)
    if cache_len < need:
        raise ValueError(
            f"max_cache_len {cache_len} < prompt {plen} + max_new_tokens {max_new_tokens} + {_WARMUP_STEPS}"
        )

    key = (batch, cache_len, str(device), float(temperature) if sampling else 0.0,
           top_k if sampling else None, top_p if sampling else None, stop, pad_id,
           bool(use_cuda_graph), bool(compile_step), bool(pack_gqa))  # fmt: skip
    runners: OrderedDict | None = getattr(model, _RUNNERS_ATTR, None)
    if runners is None:  # (an emptied cache is falsy: test for None, not truth)
        runners = OrderedDict()
        object.__setattr__(model, _RUNNERS_ATTR, runners)
    runner = runners.pop(key, None)
    fresh = runner is None
    with torch.no_grad(), _decode_attention(pack_gqa):
        if fresh:
            while len(runners) >= _MAX_RUNNERS:
                _drop(runners.popitem(last=False)[1])
            if device.type == "cuda":
                torch.cuda.empty_cache()
            runner = _Runner(model, batch, cache_len, device, make_sampler(temperature, top_k, top_p),
                             stop, pad_id, compile_step)  # fmt: skip
        runners[key] = runner

        if streamer is not None:
            streamer.put(input_ids.cpu())
        t0 = time.perf_counter()
        stats["prefill_mode"] = runner.prefill(input_ids, prefill_chunk)
        stats["prefill_s"] = time.perf_counter() - t0
        if use_cuda_graph and runner.graph is None and not runner.capture_failed and max_new_tokens > 1:
            saved = runner._save()
            try:
                runner.capture()
                stats["capture_s"] = runner.capture_s
            except Exception as e:  # noqa: BLE001 - any capture failure: keep going without a graph
                runner.capture_failed = True
                # eager from now on: a torch.compile failure must not recur
                runner._forward, runner._tokens = runner._decode_forward, runner._sample
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(device)
                runner._restore(saved)
                reason = f"{type(e).__name__}: {e}".split("\n")[0]
                logger.warning("nvfp4-fix: CUDA graph capture failed (%s); continuing with the eager "
                               "static-cache loop", reason)  # fmt: skip
                stats["capture_error"] = reason
        stats["path"] = "cuda-graph" if runner.graph is not None else "static-loop"

        produced = 1  # the prefill sampled the first new token
        flushed = 0  # new tokens handed to the streamer
        check = bool(stop) or streamer is not None
        all_done = False

        def flush(upto: int) -> None:
            nonlocal flushed
            if streamer is not None and upto > flushed:
                streamer.put(runner.seq[:, plen + flushed : plen + upto].cpu())
                flushed = upto

        if check:
            flush(1)
            all_done = bool(stop) and not bool(runner.unfinished.any())
        while produced < max_new_tokens and not all_done:
            n = min(sync_every, max_new_tokens - produced)
            for _ in range(n):
                runner.step()
            produced += n
            if check:
                all_done = bool(stop) and not bool(runner.unfinished.any())  # one host sync per chunk
                if not all_done:
                    flush(produced)

        new = runner.seq[:, plen : plen + produced].clone()
        stats["decode_steps"] = produced - 1
        if stop:
            # Cut after the step where the last row finished; a row's first stop token is kept.
            hits = (new.unsqueeze(-1) == torch.tensor(stop, device=new.device)).any(-1)
            first = torch.where(
                hits.any(1), hits.int().argmax(1), torch.full_like(hits[:, 0], produced, dtype=torch.long)
            )
            if bool((first < produced).all()):
                new = new[:, : int(first.max()) + 1]
        flush_all = new.shape[1]
        if streamer is not None:
            if flush_all > flushed:
                streamer.put(new[:, flushed:flush_all].cpu())
            streamer.end()
        return torch.cat([input_ids, new], dim=1)
