# ruff: noqa: E501
"""Where a decode step and an eager prefill spend GPU and host time (a diagnostic, not a results table).

    PYTHONPATH=src python3 benchmarks/profile_decode.py [--layers 32] [--compile] [--prefill]

Random Llama-3-8B-shaped NVFP4 model (benchmarks/llama8b.py). For the fast generation path
(static cache + CUDA graph, optionally ``compile_step``) it replays the captured decode step under
torch.profiler and prints the kernels of one step by GPU time, with counts. With ``--prefill`` it
times an eager P=2048 forward (DynamicCache, as model.generate's prefill), prints the host functions
and kernels that take the time, and times the same forward with dense bf16 copies of the weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_generation import prefill_forward  # noqa: E402
from llama8b import card_name, ensure_checkpoints, llama8b_config, versions  # noqa: E402

from nvfp4_fix.generation import RUNNERS_ATTR, clear_cache, generate  # noqa: E402
from nvfp4_fix.loading import from_pretrained  # noqa: E402


def kernel_table(prof, steps: int, rows: int = 30) -> None:
    total = defaultdict(float)
    count = defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            total[e.name] += e.device_time_total
            count[e.name] += 1
    all_us = sum(total.values()) / steps
    print(f"  GPU kernel time per step {all_us:.0f} us, {sum(count.values()) / steps:.0f} kernels")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:rows]:
        print(f"  {us / steps:8.1f} us {count[name] / steps:6.1f}x  {name[:110]}")


def step_ms(runner, reps: int = 50) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runner.step()
    a.record()
    for _ in range(reps):
        runner.step()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def decode_profile(model, p: int, compile_step: bool) -> None:
    ids = torch.randint(1000, 100000, (1, p), device="cuda")
    t = time.perf_counter()
    stats: dict = {}
    generate(model, ids, 16, stop_token_ids=(), max_cache_len=p + 384, compile_step=compile_step, stats=stats)
    runner = next(reversed(getattr(model, RUNNERS_ATTR).values()))
    print(
        f"\n== decode P={p} compile={compile_step}: setup {time.perf_counter() - t:.1f} s, path {stats['path']}, "
        f"step {step_ms(runner):.3f} ms = {1000 / step_ms(runner):.1f} tok/s",
        flush=True,
    )
    steps = 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.step()
        torch.cuda.synchronize()
    kernel_table(prof, steps)
    clear_cache(model)


def prefill_profile(model) -> None:
    forward = prefill_forward(model, torch.randint(1000, 100000, (1, 2048), device="cuda"))

    def wall(reps: int = 3) -> float:
        forward()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            forward()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[reps // 2] * 1e3

    print(f"\n== eager prefill P=2048, NVFP4: {wall():.1f} ms", flush=True)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        forward()
        torch.cuda.synchronize()
    kernel_table(prof, 1, 15)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
    from nvfp4_fix.layer import NVFP4Linear

    layers = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    for m in layers:
        m.keep_dense_copy(torch.bfloat16)
    print(f"\n== eager prefill P=2048, dense bf16 copies (the bf16 baseline): {wall():.1f} ms", flush=True)
    for m in layers:
        m.keep_dense_copy(None)
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--root", default="/tmp/nvfp4fix-bench")
    ap.add_argument("--prompts", default="128,2048")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--prefill", action="store_true")
    args = ap.parse_args()
    print(f"{card_name()}; {versions()}", flush=True)
    cfg = llama8b_config(args.layers)
    paths = ensure_checkpoints(Path(args.root), ("nvfp4",), cfg, "cuda")
    model = from_pretrained(paths["nvfp4"], device_map="cuda", dtype=torch.bfloat16)
    if args.prefill:
        prefill_profile(model)
    for p in map(int, args.prompts.split(",")):
        decode_profile(model, p, False)
    if args.compile:
        decode_profile(model, int(args.prompts.split(",")[0]), True)


if __name__ == "__main__":
    main()
