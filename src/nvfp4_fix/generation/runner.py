"""One static-cache generation state per model x batch x cache length x settings: prefill, the decode
step, and its CUDA-graph capture.

The decode step -- forward on static ``ids``/position tensors, sampling, stop-token bookkeeping,
writing the token into a device-side sequence buffer, advancing the position -- has no host sync, so
it is captured once (after a warm-up on a side stream) and replayed once per token.

Left-padded batches: each row's position id is its cache column minus its number of pad tokens
(``offset``), as ``model.generate`` numbers them, and a [B, cache] attention mask (0 at the pad
columns, 1 elsewhere; fixed for the whole generation) goes with every forward.
"""

from __future__ import annotations

import functools
import gc
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .cache import cache_lengths, forward_api, holds_prompt, make_static_cache, reset_cache
from .sampling import argmax_first

__all__ = ["Runner", "WARMUP_STEPS"]

WARMUP_STEPS = 2


class Runner:
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
        padded: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        self.model = model
        self.api = forward_api(model)
        self.batch, self.max_cache_len, self.device = batch, max_cache_len, device
        self.sampler = sampler
        self.generator = generator
        self.cache = make_static_cache(model, max_cache_len)
        z = functools.partial(torch.zeros, dtype=torch.long, device=device)
        self.ids = z(batch, 1)  # the token the next decode step consumes
        self.pos = z(1)  # its cache column
        self.seq = z(batch, max_cache_len)  # the whole sequence, token t at column t
        # left padding: position id = column - offset; the mask hides the pad columns
        self.offset = z(batch, 1) if padded else None
        self.mask = torch.ones(batch, max_cache_len, dtype=torch.long, device=device) if padded else None
        self.unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        self.stop = torch.tensor(stop_ids, dtype=torch.long, device=device) if stop_ids else None
        self.pad = torch.tensor(pad_id, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_failed = False
        self.capture_s = 0.0
        self.forward = self.decode_forward
        self.tokens = self.sample
        if compile_step and getattr(sampler, "greedy", False):
            # the argmax (two parallel stages) compiled with the forward
            self.tokens = torch.compile(self.greedy_tokens, dynamic=False, fullgraph=False)
        elif compile_step:
            self.forward = torch.compile(self.decode_forward, dynamic=False, fullgraph=False)

    def uncompile(self) -> None:
        """Eager from now on (after a failed capture: a torch.compile failure must not recur)."""
        self.forward, self.tokens = self.decode_forward, self.sample

    # -- model calls -----------------------------------------------------------------------------
    def _kwargs(self, position_ids: torch.Tensor, cache_position: torch.Tensor, cache: Any,
                mask: torch.Tensor | None) -> dict[str, Any]:  # fmt: skip
        kw: dict[str, Any] = {self.api.cache_kw: cache, "use_cache": True, "position_ids": position_ids}
        if mask is not None:
            kw["attention_mask"] = mask
        if self.api.cache_position:
            kw["cache_position"] = cache_position
        if self.api.logits_kw:
            kw[self.api.logits_kw] = 1
        return kw

    def decode_forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.offset is None:
            position_ids = pos.view(1, 1).expand(self.batch, 1)
        else:
            position_ids = pos.view(1, 1) - self.offset
        out = self.model(input_ids=ids, **self._kwargs(position_ids, pos, self.cache, self.mask))
        return out.logits[:, -1, :]

    def sample(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.sampler(self.forward(ids, pos))

    def greedy_tokens(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return argmax_first(self.decode_forward(ids, pos))

    def _finish(self, nxt: torch.Tensor) -> torch.Tensor:
        if self.stop is not None:
            nxt = torch.where(self.unfinished, nxt, self.pad)
            self.unfinished &= ~(nxt.unsqueeze(-1) == self.stop).any(-1)
        return nxt

    def decode_step(self) -> None:
        """One token: everything on the device, no host sync (this is what gets captured)."""
        nxt = self._finish(self.tokens(self.ids, self.pos))
        self.pos.add_(1)
        self.seq.index_copy_(1, self.pos, nxt.unsqueeze(1))
        self.ids.copy_(nxt.unsqueeze(1))

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, chunk: int) -> str:
        """Fill the cache with the prompt and sample the first new token (eager). Returns the mode used.

        The prompt runs through the model's normal path with a ``DynamicCache`` (one forward per
        ``chunk`` tokens: SDPA/flash causal attention over the filled part only, each NVFP4 weight
        dequantized once per chunk), then its K/V are copied into the static cache. Where the dynamic
        cache does not hold the whole prompt per layer (an architecture whose dynamic cache trims or
        shares layers), it falls back to prefilling through the static cache itself."""
        from transformers import DynamicCache

        b, p = input_ids.shape
        reset_cache(self.cache)
        self.unfinished.fill_(True)
        position_ids = torch.arange(p, device=self.device).unsqueeze(0).expand(b, -1)
        if self.mask is not None and self.offset is not None:
            assert attention_mask is not None
            self.mask.fill_(1)
            self.mask[:, :p].copy_(attention_mask)
            self.offset.copy_(p - attention_mask.sum(1, keepdim=True))
            # model.generate's numbering: real tokens count from 0, pad columns get 1
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        dyn = DynamicCache()
        logits = self._prefill_chunks(input_ids, position_ids, chunk, dyn)
        layers = list(getattr(dyn, "layers", None) or [])
        mode = "dynamic"
        if holds_prompt(layers, len(self.cache.layers), p):
            positions = torch.arange(p, device=self.device)
            for d, s in zip(layers, self.cache.layers, strict=True):
                # 4.57 writes at cache_kwargs["cache_position"]; 5.x at its own length (reset to 0 above)
                s.update(d.keys, d.values, {"cache_position": positions})
                d.keys = d.values = None  # free the prompt's dynamic K/V layer by layer
        else:
            del dyn
            mode = "static"
            logits = self._prefill_chunks(input_ids, position_ids, chunk, None)
        nxt = self._finish(self.sampler(logits))
        self.seq[:, :p].copy_(input_ids)
        self.seq[:, p].copy_(nxt)
        self.ids.copy_(nxt.unsqueeze(1))
        self.pos.fill_(p)
        return mode

    def _prefill_chunks(self, input_ids: torch.Tensor, position_ids: torch.Tensor, chunk: int,
                        cache: Any) -> torch.Tensor:  # fmt: skip
        """Run the prompt in chunks through ``cache`` (None: the static cache); last position's logits."""
        p = input_ids.shape[1]
        logits = None
        for s in range(0, p, chunk):
            e = min(p, s + chunk)
            mask = self.mask[:, :e] if self.mask is not None else None
            kw = self._kwargs(position_ids[:, s:e], torch.arange(s, e, device=self.device),
                              self.cache if cache is None else cache, mask)  # fmt: skip
            out = self.model(input_ids=input_ids[:, s:e], **kw)
            logits = out.logits[:, -1, :]
            del out
        assert logits is not None
        return logits

    # -- CUDA graph --------------------------------------------------------------------------------
    def save(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        state = [self.ids, self.pos, self.unfinished, *cache_lengths(self.cache)]
        return [(t, t.clone()) for t in state]

    @staticmethod
    def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for t, copy in saved:
            t.copy_(copy)

    def _rng_state(self) -> torch.Tensor:
        if self.generator is not None:
            return self.generator.get_state()
        return torch.cuda.get_rng_state(self.device)

    def _set_rng_state(self, state: torch.Tensor) -> None:
        if self.generator is not None:
            self.generator.set_state(state)
        else:
            torch.cuda.set_rng_state(state, self.device)

    def capture(self) -> None:
        """Warm up on a side stream (compiles kernels, allocates), restore the state, then capture one
        decode step. Called right after a prefill; leaves the runner's state as it found it."""
        t0 = time.perf_counter()
        saved = self.save()
        rng = self._rng_state()  # the warm-up samples must not shift the stream
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.decode_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.restore(saved)
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:  # replays advance the caller's generator, not the default one
            graph.register_generator_state(self.generator)
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
        self.restore(saved)  # capture runs nothing, but be certain
        torch.cuda.synchronize(self.device)
        self._set_rng_state(rng)
        self.graph = graph
        self.capture_s = time.perf_counter() - t0

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.decode_step()
