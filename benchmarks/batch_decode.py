# ruff: noqa: E501, B023  (the timing closure is called inside the loop that binds it)
"""The batched-decode mode of bench_generation.py (``--batches 1,8,32``): decode tokens/s of the whole
batch through ``nvfp4_fix.generate`` (static cache + CUDA graph) at each batch size, NVFP4 and bf16 of the
same random model, one prompt length, in one run and one table naming the card.

Per batch size B: B random prompts of P tokens (no padding: every row equal work); TTFT = a 1-token call;
decode tok/s = B * (N - 1) / the decode time ``generate`` measures (``stats["decode_s"]``: the N - 1
steps after the first token, waited for on the device), the best of ``reps`` N-token calls; peak =
max_memory_allocated during the calls (static cache for B rows, graph pool). "vs batch 1" is the
throughput ratio to batch 1 of the same weights (the issue's target: batch 8 >= 6x batch 1).
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from nvfp4_fix.generation import clear_cache, generate

__all__ = ["batch_rows", "batch_table"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _decode_s(call, n: int, ttft: float) -> float:
    """generate's own timing of the N - 1 decode steps; T(N) - TTFT where it fell back to model.generate."""
    timing: dict = {}
    total = call(n, timing)
    return timing.get("decode_s", total - ttft)


def batch_rows(label: str, model, vocab: int, batches: list[int], prompt: int, n: int, device: str,
               reps: int = 2, **kw) -> list[dict]:  # fmt: skip
    rows = []
    for b in batches:
        g = torch.Generator().manual_seed(b * 7919 + prompt)
        ids = torch.randint(min(1000, vocab // 4), min(vocab, 100000), (b, prompt), generator=g).to(device)
        cache_len = 128 * math.ceil((prompt + n + 2) / 128)

        def call(k: int, stats: dict | None = None) -> float:
            _sync()
            t = time.perf_counter()
            generate(model, ids, k, stop_token_ids=(), max_cache_len=cache_len,
                     use_cuda_graph=device == "cuda", stats=stats, **kw)  # fmt: skip
            _sync()
            return time.perf_counter() - t

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        stats: dict = {}
        setup = call(n, stats)  # capture, Triton JIT
        ttft = statistics.median(call(1) for _ in range(3))
        decode_s = min(_decode_s(call, n, ttft) for _ in range(reps))
        tok_s = b * (n - 1) / max(decode_s, 1e-9)
        peak = torch.cuda.max_memory_allocated() / (1 << 30) if torch.cuda.is_available() else float("nan")
        rows.append({"method": label, "batch": b, "prompt": prompt, "new_tokens": n, "ttft_s": ttft,
                     "tok_s": tok_s, "ms_per_step": 1000 * decode_s / (n - 1), "peak_gib": peak,
                     "path": stats.get("path", "?"), "setup_s": setup})  # fmt: skip
        print(
            f"  {label:<28} B={b:<3} P={prompt:<5} N={n:<4} TTFT {1000 * ttft:8.1f} ms  decode {tok_s:8.1f} tok/s "
            f"({rows[-1]['ms_per_step']:.2f} ms/step)  peak {peak:.2f} GiB  [{rows[-1]['path']}]",
            flush=True,
        )
        clear_cache(model)
    return rows


def batch_table(rows: list[dict], card: str) -> list[str]:
    base = {r["method"]: r["tok_s"] for r in rows if r["batch"] == 1}
    lines = [f"| weights ({card}) | batch | prompt | N | TTFT ms | decode tok/s (all rows) | per row | vs batch 1 | ms/step | peak GiB | path |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        ratio = r["tok_s"] / base[r["method"]] if r["method"] in base else float("nan")
        lines.append(f"| {r['method']} | {r['batch']} | {r['prompt']} | {r['new_tokens']} | {1000 * r['ttft_s']:.1f} | "
                     f"{r['tok_s']:.1f} | {r['tok_s'] / r['batch']:.1f} | {ratio:.2f}x | {r['ms_per_step']:.2f} | "
                     f"{r['peak_gib']:.2f} | {r['path']} |")  # fmt: skip
    return lines
