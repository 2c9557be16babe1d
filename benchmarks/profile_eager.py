"""Where an eager NVFP4 forward spends host time (a diagnostic, not a benchmark table).

    PYTHONPATH=src python3 benchmarks/profile_eager.py [--layers 4]

Builds the Llama-3-8B-shaped checkpoints with --layers layers, times one forward at several prompt
lengths for bf16 and NVFP4, then prints the NVFP4 forward's top host functions (cProfile).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from llama8b import ensure_checkpoints, llama8b_config  # noqa: E402

from nvfp4_fix.loading import from_pretrained  # noqa: E402


def timed(model, ids, reps=5):
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--root", default="/tmp/nvfp4fix-prof")
    args = ap.parse_args()
    cfg = llama8b_config(args.layers)
    paths = ensure_checkpoints(Path(args.root), ("nvfp4", "bf16"), cfg, "cuda")
    from transformers import AutoModelForCausalLM

    models = {
        "nvfp4": from_pretrained(paths["nvfp4"], device_map="cuda", dtype=torch.bfloat16),
        "bf16": AutoModelForCausalLM.from_pretrained(paths["bf16"], device_map="cuda", dtype=torch.bfloat16),
    }
    for p in (1, 128, 2048):
        ids = torch.randint(0, 128000, (1, p), device="cuda")
        row = " ".join(f"{k} {timed(m, ids):.1f} ms" for k, m in models.items())
        print(f"P={p}: {row}", flush=True)
    from nvfp4_fix.kernels import nvfp4_linear, select_kernel

    layer = models["nvfp4"].model.layers[0].self_attn.o_proj
    for p in (1, 128, 2048):
        x = torch.randn(p, 4096, device="cuda", dtype=torch.bfloat16)
        args = (layer.weight_packed, layer.weight_scale, layer.weight_mul)
        nvfp4_linear(x, *args)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            nvfp4_linear(x, *args)
        host = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) / 200 * 1e6
        kern = select_kernel(x, 4096, 4096)
        print(f"o_proj M={p} ({kern}): host {host:.0f} us/call, with GPU {total:.0f} us/call")
    ids = torch.randint(0, 128000, (1, 2048), device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as kp, torch.no_grad():
        models["nvfp4"](input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
    print(kp.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    ids = torch.randint(0, 128000, (1, 128), device="cuda")
    m = models["nvfp4"]
    timed(m, ids)
    prof = cProfile.Profile()
    prof.enable()
    with torch.no_grad():
        for _ in range(3):
            m(input_ids=ids, use_cache=False)
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
