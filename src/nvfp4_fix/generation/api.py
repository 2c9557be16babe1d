"""The public entry points: :func:`generate` and :func:`clear_cache`."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .. import settings
from . import fallback as fb
from . import scan
from .attention import decode_attention
from .router import fused_routers
from .runner import WARMUP_STEPS, Runner
from .sampling import RowParam, make_sampler, sampling_params

__all__ = ["clear_cache", "generate", "RUNNERS_ATTR"]

logger = logging.getLogger("nvfp4_fix")

RUNNERS_ATTR = "_nvfp4_fix_generation_runners"
_MAX_RUNNERS = 2
_CACHE_ALIGN = 128


def clear_cache(model: nn.Module) -> None:
    """Drop the captured graphs and static caches kept on ``model`` by :func:`generate`, and what it
    found in the module tree (call this after changing the tree in place, e.g. adding adapters)."""
    runners = getattr(model, RUNNERS_ATTR, None)
    while runners:
        _drop(runners.popitem()[1])
    scan.forget(model)


def _drop(runner: Runner) -> None:
    """Free a runner's graph now (runners sit in reference cycles, so the GC would free it later, at a
    time of its choosing -- possibly during another capture)."""
    runner.graph = None


def _check_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask on the ids' device, or None where no row is padded. Left padding only."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}: "
            "they must match"
        )
    mask = attention_mask.to(input_ids.device).long()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
        raise ValueError(
            "attention_mask must be left-padded (each row: zeros, then ones up to the last column), as "
            "model.generate expects for decoder-only models; set tokenizer.padding_side = 'left'"
        )
    return None if bool(mask.all()) else mask


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    temperature: RowParam = 0,
    top_k: RowParam = None,
    top_p: RowParam = None,
    generator: torch.Generator | None = None,
    stop_token_ids: int | Iterable[int] | None = None,
    streamer: Any = None,
    prefill_chunk: int = 4096,
    use_cuda_graph: bool = True,
    sync_every: int = 8,
    max_cache_len: int | None = None,
    pad_token_id: int | None = None,
    compile_step: bool = False,
    pack_gqa: bool = True,
    num_beams: int = 1,
    stats: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` after ``input_ids`` [B, P] (or [P]); return [B, P + n] ids
    like ``model.generate`` (the prompt included; generation stops once every row produced a stop token,
    which is kept; rows that stopped earlier are padded with ``pad_token_id``).

    ``attention_mask`` [B, P]: 1 for tokens, 0 for padding, which must be on the left (as
    ``model.generate`` wants for decoder-only models); positions count from each row's first token.
    ``temperature`` 0 is greedy; ``temperature``, ``top_k``, ``top_p`` take one value for every row or
    a sequence of one per row; samples are drawn from ``generator`` (default: the device's default
    generator; a CUDA graph advances whichever is used). ``stop_token_ids`` None means the model's
    ``generation_config`` EOS ids; pass ``()`` for none. Beam search is not done (``num_beams > 1``
    raises). ``use_cuda_graph=False`` runs the static-cache loop eagerly. ``prefill_chunk``: the most
    prompt tokens per prefill forward (bounds activation memory; each chunk re-reads every weight).
    ``sync_every``: tokens between two host reads of the stop flags / streamer flushes.
    ``max_cache_len``: the static cache size (default: prompt + new tokens, rounded up to 128).
    ``compile_step`` additionally wraps the decode forward in ``torch.compile`` before capture.
    ``pack_gqa`` (default on): decode attention through ``nvfp4_fix.generation.attention`` (sdpa
    models only). ``stats``, if given a dict, receives the path taken and timings (``prefill_s``;
    ``decode_s`` for the ``decode_steps`` steps after the first token; each waits for the device once).
    """
    if num_beams != 1:
        raise ValueError(
            f"nvfp4_fix.generate does not do beam search (num_beams={num_beams}); use "
            f"model.generate(..., num_beams={num_beams}), which runs on the packed model as well"
        )
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        attention_mask = attention_mask.unsqueeze(0) if attention_mask is not None else None
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk must be positive, got {prefill_chunk}")
    batch, plen = input_ids.shape
    params = sampling_params(temperature, top_k, top_p, batch)
    if max_new_tokens <= 0:
        return input_ids
    mask = _check_mask(input_ids, attention_mask)
    sync_every = max(1, int(sync_every))
    timed = stats is not None  # prefill_s / decode_s wait for the device (one host sync each)
    stats = stats if stats is not None else {}
    stop = fb.stop_ids(model, stop_token_ids)
    pad = fb.pad_id(model, stop, pad_token_id)
    hf_ok = fb.expressible(params, generator)

    def fallback(reason: str) -> torch.Tensor:
        if not hf_ok:
            raise ValueError(
                f"fast generation is unavailable ({reason}), and model.generate cannot take per-row "
                "sampling settings or a generator: give one temperature/top_k/top_p for all rows and no "
                "generator"
            )
        fb.log_fallback(reason)
        stats["path"] = "model.generate"
        stats["fallback_reason"] = reason
        return fb.hf_generate(model, input_ids, attention_mask, max_new_tokens, params, stop, pad, streamer)

    try:
        fb.check_model(model)
        device = fb.model_device(model)
    except fb.Unsupported as e:
        return fallback(str(e))
    if use_cuda_graph and (device.type != "cuda" or not torch.cuda.is_available()):
        reason = f"CUDA graphs need a CUDA device, the model is on {device.type}"
        if hf_ok:
            return fallback(reason)
        use_cuda_graph = False  # per-row settings or a generator: the eager static-cache loop
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, the model on {device}: they must match")

    input_ids = input_ids.to(device)
    mask = mask.to(device) if mask is not None else None
    need = plen + max_new_tokens + WARMUP_STEPS
    cache_len = max_cache_len or _CACHE_ALIGN * math.ceil(need / _CACHE_ALIGN)
    if cache_len < need:
        raise ValueError(
            f"max_cache_len {cache_len} < prompt {plen} + max_new_tokens {max_new_tokens} + {WARMUP_STEPS}"
        )

    key = (batch, cache_len, str(device), params.key(), generator, stop, pad, mask is not None,
           bool(use_cuda_graph), bool(compile_step), bool(pack_gqa), settings.current())  # fmt: skip
    runners: OrderedDict | None = getattr(model, RUNNERS_ATTR, None)
    if runners is None:  # (an emptied cache is falsy: test for None, not truth)
        runners = OrderedDict()
        object.__setattr__(model, RUNNERS_ATTR, runners)
    runner = runners.pop(key, None)
    routers = fused_routers(model, settings.current().moe_router)
    with torch.no_grad(), decode_attention(model, pack_gqa), routers:
        if runner is None:
            while len(runners) >= _MAX_RUNNERS:
                _drop(runners.popitem(last=False)[1])
            if device.type == "cuda":
                torch.cuda.empty_cache()
            sampler = make_sampler(*params.compact(), generator=generator, batch=batch, device=device)
            runner = Runner(model, batch, cache_len, device, sampler, stop, pad, compile_step,
                            padded=mask is not None, generator=generator)  # fmt: skip
        runners[key] = runner

        if streamer is not None:
            streamer.put(input_ids.cpu())
        t0 = time.perf_counter()
        stats["prefill_mode"] = runner.prefill(input_ids, mask, prefill_chunk)
        _wait(device, timed)
        stats["prefill_s"] = time.perf_counter() - t0
        if use_cuda_graph and runner.graph is None and not runner.capture_failed and max_new_tokens > 1:
            _capture(runner, device, stats)
        stats["path"] = "cuda-graph" if runner.graph is not None else "static-loop"
        t0 = time.perf_counter()
        new, flushed = _decode(runner, plen, max_new_tokens, sync_every, bool(stop), streamer)
        _wait(device, timed)
        stats["decode_s"] = time.perf_counter() - t0
        stats["decode_steps"] = new.shape[1] - 1
    if stop:
        new = _cut_after_last_stop(new, stop)
    if streamer is not None:
        if new.shape[1] > flushed:
            streamer.put(new[:, flushed:].cpu())
        streamer.end()
    return torch.cat([input_ids, new], dim=1)


def _wait(device: torch.device, timed: bool) -> None:
    if timed and device.type == "cuda":
        torch.cuda.synchronize(device)


def _capture(runner: Runner, device: torch.device, stats: dict[str, Any]) -> None:
    saved = runner.save()
    try:
        runner.capture()
        stats["capture_s"] = runner.capture_s
    except Exception as e:  # noqa: BLE001 - any capture failure: keep going without a graph
        runner.capture_failed = True
        runner.uncompile()
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(device)
        runner.restore(saved)
        reason = f"{type(e).__name__}: {e}".split("\n")[0]
        logger.warning("nvfp4-fix: CUDA graph capture failed (%s); continuing with the eager "
                       "static-cache loop", reason)  # fmt: skip
        stats["capture_error"] = reason


def _decode(runner: Runner, plen: int, max_new_tokens: int, sync_every: int, has_stop: bool,
            streamer: Any) -> tuple[torch.Tensor, int]:  # fmt: skip
    """Step until ``max_new_tokens`` or every row stopped; the host reads the stop flags (and feeds the
    streamer) every ``sync_every`` tokens. Returns the new tokens [B, n] and how many were streamed."""
    produced = 1  # the prefill sampled the first new token
    flushed = 0
    check = has_stop or streamer is not None

    def flush(upto: int) -> int:
        if streamer is not None and upto > flushed:
            streamer.put(runner.seq[:, plen + flushed : plen + upto].cpu())
            return upto
        return flushed

    all_done = False
    if check:
        flushed = flush(1)
        all_done = has_stop and not bool(runner.unfinished.any())
    while produced < max_new_tokens and not all_done:
        n = min(sync_every, max_new_tokens - produced)
        for _ in range(n):
            runner.step()
        produced += n
        if check:
            all_done = has_stop and not bool(runner.unfinished.any())  # one host sync per chunk
            if not all_done:
                flushed = flush(produced)
    return runner.seq[:, plen : plen + produced].clone(), flushed


def _cut_after_last_stop(new: torch.Tensor, stop: tuple[int, ...]) -> torch.Tensor:
    """Cut after the step where the last row finished; a row's first stop token is kept."""
    produced = new.shape[1]
    hits = (new.unsqueeze(-1) == torch.tensor(stop, device=new.device)).any(-1)
    first = torch.where(
        hits.any(1), hits.int().argmax(1), torch.full_like(hits[:, 0], produced, dtype=torch.long)
    )
    if bool((first < produced).all()):
        return new[:, : int(first.max()) + 1]
    return new
