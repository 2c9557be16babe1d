"""Fast generation: a static KV cache, the decode step captured once in a CUDA graph, sampling and
stop-token checks on the device, left-padded batches of prompts.

    from nvfp4_fix import generate
    out = generate(model, input_ids, max_new_tokens=256)            # greedy
    out = generate(model, enc.input_ids, 256, attention_mask=enc.attention_mask,   # a padded batch
                   temperature=0.7, top_p=0.9, generator=torch.Generator("cuda").manual_seed(0))

Why: ``model.generate`` launches every kernel of every layer from Python for every token (~225 linear
launches plus ~1500 small ones for an 8B Llama), and its dynamic cache reallocates; at batch 1 the
GPU mostly waits for the CPU. The modules:

* ``cache``: the static cache (full-length layers; one-launch K/V append) and the transformers
  versions' forward conventions;
* ``attention``: decode attention (the Triton split-KV kernel, or SDPA with folded query heads),
  registered with transformers' ``AttentionInterface`` under its own name and switched on per model;
* ``sampling``: temperature / top-k / top-p per row and the exponential race, no host sync;
* ``runner``: prefill through the model's own path (a ``DynamicCache``, ``prefill_chunk`` tokens per
  forward, then the K/V copied into the static cache), the decode step and its CUDA-graph capture;
* ``fallback``: what goes to ``model.generate`` (CPU with ``use_cuda_graph=True``, several devices,
  models without static-cache support), logged once with the reason;
* ``api``: :func:`generate` and :func:`clear_cache`.

Stop tokens are tracked on the device (finished rows emit the pad id, as in transformers); the host
reads the flags every ``sync_every`` tokens (default 8), so at most ``sync_every - 1`` tokens are
computed past the last stop and dropped. A streamer gets the prompt, then the new tokens in chunks.

Greedy output equals ``model.generate(do_sample=False)`` token for token where the logits have no
near-ties (tests/test_generation*.py: float32 on the CPU for Llama, Mistral, Qwen3 and Gemma 2, sliding
windows and left-padded batches included; batch 1 with the captured graph on an H100; padded batches and
per-row sampling in the graph have ``gpu`` tests not yet run on a GPU). The first token is
computed as ``model.generate`` computes it (same prefill path); later steps attend over the static
cache with a mask, which sums in another order. Sampling draws from the same distribution as
``model.generate``, from another random stream.

Captured graphs and their caches are kept on the model (at most 2, least recently used dropped) and
reused by calls with the same batch size, cache length and settings; :func:`clear_cache` frees them
(call it after moving or changing the model's weights).
"""

from .api import RUNNERS_ATTR, clear_cache, generate
from .sampling import argmax_first, make_sampler, warp_logits

__all__ = ["RUNNERS_ATTR", "argmax_first", "clear_cache", "generate", "make_sampler", "warp_logits"]
