"""Measure prefill and decode speed and memory of an NVFP4 checkpoint loaded packed, on random tokens."""

from __future__ import annotations

import argparse
import inspect
import time
from typing import Any

from ..errors import NVFP4Error

HELP = "prefill and decode speed and memory (random tokens)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint folder or hub id (org/model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="auto", help="bf16, fp16, fp32 or auto (config's dtype)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    p.add_argument(
        "--fast",
        action="store_true",
        help="time decode through nvfp4_fix.generate (static cache, CUDA graph) instead of model forwards",
    )
    p.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="quantize the dense lm_head to NVFP4 at load (faster decode; lossy: logits move a little)",
    )


def bench(
    path: str,
    device: str = "cpu",
    dtype: str = "auto",
    prompt_tokens: int = 128,
    new_tokens: int = 32,
    batch: int = 1,
    fast: bool = False,
    quantize_lm_head: bool = False,
) -> dict[str, Any]:
    import torch

    from ..tools import runtime
    from ..tools.analysis import memory

    if min(prompt_tokens, new_tokens, batch) < 1:
        raise NVFP4Error("--prompt-tokens, --new-tokens and --batch must be at least 1")
    model, info, load_s = runtime.load(path, device, dtype, quantize_lm_head)
    vocab = int(model.config.get_text_config().vocab_size)
    # transformers >= 5.24 renamed past_key_values to cache (the old name warns until 5.40)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt_tokens), generator=gen).to(device)
    with torch.no_grad():
        # warm-up: a short prefill and two decode steps (first calls may compile kernels)
        out = model(input_ids=ids[:, : min(8, prompt_tokens)], use_cache=True)
        for _ in range(2):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{cache_kw: _cache(out)})
        runtime.sync(device)
        runtime.reset_peak(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        runtime.sync(device)
        t1 = time.perf_counter()
        if fast:
            t2 = t1 + _fast_decode_seconds(model, ids, new_tokens, device)
        else:
            for _ in range(new_tokens):
                nxt = out.logits[:, -1:].argmax(-1)
                out = model(input_ids=nxt, use_cache=True, **{cache_kw: _cache(out)})
            runtime.sync(device)
            t2 = time.perf_counter()
    peak, what = runtime.peak_memory(device)
    return {
        "path": str(info.path),
        "format": info.format,
        "scheme": info.scheme,
        "device": device,
        "dtype": str(model.dtype).removeprefix("torch."),
        "batch": batch,
        "decode_path": "nvfp4_fix.generate" if fast else "model forward",
        "lm_head": "NVFP4, quantized at load (lossy)" if quantize_lm_head else "as in the checkpoint",
        "load_seconds": load_s,
        "prefill": {"tokens": batch * prompt_tokens, "seconds": t1 - t0},
        "decode": {"tokens": batch * new_tokens, "seconds": t2 - t1},
        "weights_bytes": runtime.weight_bytes(model),
        "bf16_bytes": memory(info)["bf16"],
        "peak_bytes": peak,
        "peak_what": what,
    }


def _fast_decode_seconds(model: Any, ids: Any, new_tokens: int, device: str) -> float:
    """Seconds for ``new_tokens`` decode steps of nvfp4_fix.generate: a (new_tokens + 1)-token call
    minus a 1-token call (prefill + first token), one static cache and graph for both (warmed up)."""
    import math

    from ..generation import generate
    from ..tools import runtime

    cache_len = 128 * math.ceil((ids.shape[1] + new_tokens + 3) / 128)

    def call(n: int) -> float:
        runtime.sync(device)
        t = time.perf_counter()
        generate(model, ids, n, stop_token_ids=(), max_cache_len=cache_len, use_cuda_graph=device != "cpu")
        runtime.sync(device)
        return time.perf_counter() - t

    call(new_tokens + 1)  # capture, kernel compilation
    first = min(call(1) for _ in range(2))
    return max(call(new_tokens + 1) - first, 1e-9)


def _cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def render(r: dict[str, Any]) -> str:
    from ..tools.analysis import human

    lines = [
        f"bench {r['path']} ({r['format']}, {r['scheme']}) on {r['device']}, {r['dtype']}, "
        f"batch {r['batch']}, decode through {r.get('decode_path', 'model forward')}, "
        f"lm_head {r.get('lm_head', 'as in the checkpoint')}",
        "| phase   | tokens | seconds |    tok/s |",
        "|---------|-------:|--------:|---------:|",
    ]
    for phase in ("prefill", "decode"):
        p = r[phase]
        lines.append(
            f"| {phase:<7} | {p['tokens']:>6} | {p['seconds']:>7.3f} | {p['tokens'] / p['seconds']:>8.1f} |"
        )
    lines.append(
        f"weights in memory {human(r['weights_bytes'])} (as bf16 {human(r['bf16_bytes'])}); "
        f"{r['peak_what']} {human(r['peak_bytes'])}; load {r['load_seconds']:.1f} s"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    r = bench(
        args.path,
        args.device,
        args.dtype,
        args.prompt_tokens,
        args.new_tokens,
        args.batch,
        args.fast,
        args.quantize_lm_head,
    )
    print(render(r))
    return 0
