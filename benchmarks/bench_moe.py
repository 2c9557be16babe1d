# ruff: noqa: E501
"""Batch-1 decode of a random-weight Qwen3-30B-A3B-shaped model: NVFP4 (experts through the grouped
kernel, kernels/moe_grouped.py) against the same model in bf16 (transformers' ``grouped_mm`` experts), both
through ``nvfp4_fix.generate`` (static cache + CUDA graph), in one run, one markdown table naming the card.

    PYTHONPATH=src python benchmarks/bench_moe.py [--layers 48] [--prompts 128,2048] [--new-tokens 128] [--loop]
        [--paths graph,compile [--compile-prompts 128]] [--experts cuda,triton] [--router off|on|both]
        [--profile] [--budget-s 540] [--out benchmarks/RESULTS-moe.md]

The bf16 model is drawn on the GPU (benchmarks/moe30b.py), measured, written as an NVFP4 checkpoint
(made once under --ckpt-root; each expert projection its own global scale), freed, and the checkpoint
loaded back with ``nvfp4_fix.from_pretrained(device_map="cuda")``. Per method and prompt length:
TTFT, decode tok/s = (N-1) / the N-1 decode steps' time (bench_generation.run_case), GPU memory with only the model
loaded and the peak during the calls. ``--loop`` adds the NVFP4 experts through the per-expert Python
loop (the path before the grouped kernel: a host sync per layer, so no graph); ``--paths compile``
runs ``compile_step=True`` for both; ``--experts`` picks the NVFP4 decode experts (``cuda``: tensor cores,
kernels/cuda_moe.py; ``triton``: kernels/moe_decode.py); ``--router`` the MoE router (``on``: the one-launch
kernel of kernels/moe_router.py, ``off``: transformers' own). Every setting is set per row, whatever the
defaults; each NVFP4 row's "vs bf16" is against bf16 on the same path and router. ``--tiny``: a 2-layer model on the CPU (smoke test; grouped kernel off there).
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import gib, prompt_ids, run_case, sync  # noqa: E402
from llama8b import card_name, random_model, versions  # noqa: E402
from moe30b import qwen3_moe_config, write_moe_checkpoint  # noqa: E402

from nvfp4_fix import settings  # noqa: E402
from nvfp4_fix.generation import clear_cache  # noqa: E402

T0 = time.perf_counter()
ROUTER = "router kernel"


def table(args, rows: list[dict], notes: list[str]) -> str:
    card = card_name()
    cmd = "PYTHONPATH=src python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/bench_moe.py", *sys.argv[1:]]
    )
    shape = (
        "tiny 2-layer smoke-test model"
        if args.tiny
        else f"random-weight Qwen3-30B-A3B shape ({args.layers} layers, 128 experts, top-8)"
    )
    lines = [f"# MoE decode on {card}: batch 1, {shape}", "", f"Card: **{card}**; {versions()}.", "", f"Command: `{cmd}`", "",
             "Greedy, no stop token. TTFT = a 1-token call; decode tok/s = (N-1) / the time of the N-1 steps after the first token (generate's stats['decode_s']). Weights = GPU memory with only the model loaded; peak = max_memory_allocated during the calls.", "",
             f"| method ({card}) | prompt | N | TTFT ms | decode tok/s | vs bf16 | weights GiB | peak GiB | path |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip

    # each row against bf16 on the same path (graph, or graph + compile_step; router kernel or not)
    def path(r: dict) -> tuple:
        return r["prompt"], "compile_step" in r["method"], ROUTER in r["method"]

    base = {path(r): r["decode_tok_s"] for r in rows if r["method"].startswith("bf16")}
    for r in rows:
        key = path(r)
        ratio = r["decode_tok_s"] / base[key] if key in base else float("nan")
        lines.append(f"| {r['method']} | {r['prompt']} | {r['new_tokens']} | {1000 * r['ttft_s']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{ratio:.2f}x | {r.get('weights_gib', float('nan')):.2f} | {r['peak_gib']:.2f} | {r['path']} |")  # fmt: skip
    lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def profile_step(label: str, model, vocab: int, p: int, compile_step: bool) -> None:
    """The kernels of one captured decode step by GPU time (profile_decode.py's table)."""
    from profile_decode import kernel_table, step_ms

    from nvfp4_fix.generation import RUNNERS_ATTR, generate

    clear_cache(model)
    generate(
        model,
        prompt_ids(vocab, p, "cuda"),
        16,
        stop_token_ids=(),
        max_cache_len=p + 320,
        compile_step=compile_step,
    )
    runner = next(reversed(getattr(model, RUNNERS_ATTR).values()))
    print(
        f"\n== {label} decode step, P={p}, compile_step={compile_step}: {step_ms(runner):.3f} ms", flush=True
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            runner.step()
        torch.cuda.synchronize()
    kernel_table(prof, 10, rows=25)
    clear_cache(model)


def profile_prefill(label: str, model, vocab: int, p: int, device: str) -> None:
    """Where a 1-token call (the TTFT: prefill + first token) spends its time: wall time, the device
    kernels by time, and the host ops by their own CPU time."""
    from profile_decode import kernel_table

    from nvfp4_fix.generation import generate

    ids = prompt_ids(vocab, p, device)
    for _ in range(2):  # warm: Triton JIT, the runner's static cache
        generate(model, ids, 1, stop_token_ids=())
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    t = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        generate(model, ids, 1, stop_token_ids=())
        sync()
    print(f"\n== {label} 1-token call (prefill), P={p}: {1000 * (time.perf_counter() - t):.1f} ms under the profiler",
          flush=True)  # fmt: skip
    if device == "cuda":
        kernel_table(prof, 1, rows=15)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    import cProfile
    import pstats

    py = cProfile.Profile()  # the Python side, which the profiler's op table does not show
    t = time.perf_counter()
    py.enable()
    generate(model, ids, 1, stop_token_ids=())
    sync()
    py.disable()
    print(f"\n== {label} 1-token call under cProfile: {1000 * (time.perf_counter() - t):.1f} ms", flush=True)
    pstats.Stats(py, stream=sys.stdout).sort_stats("tottime").print_stats(20)
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="128,2048")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--ckpt-root", default="/tmp/nvfp4fix-bench-moe")
    ap.add_argument("--loop", action="store_true", help="also NVFP4 through the per-expert loop (no graph)")
    ap.add_argument(
        "--paths", default="graph", help="graph and/or compile (compile_step=True), comma-separated"
    )
    ap.add_argument(
        "--compile-prompts", default="", help="prompt lengths of the compile_step rows (default: --prompts)"
    )
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument(
        "--experts",
        default="cuda,triton",
        help="NVFP4 decode experts: cuda (down + pair sum launches), cuda-sum (pair sum in the down kernel), triton",
    )
    ap.add_argument(
        "--router", choices=("off", "on", "both"), default="both", help="settings.moe_router per row"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print the GPU kernels of one decode step of each model (last path run)",
    )
    ap.add_argument(
        "--profile-prefill", action="store_true", help="profile a 1-token call (TTFT) of bf16 and NVFP4 first"
    )
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--out", default="benchmarks/RESULTS-moe.md")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --tiny for a CPU smoke test")
        return 2
    prompts = [int(p) for p in args.prompts.split(",")]
    n = args.new_tokens
    cfg = qwen3_moe_config(args.layers, tiny=args.tiny)
    rows: list[dict] = []
    notes: list[str] = []
    print(f"card: {card_name()}; {versions()}", flush=True)

    compile_prompts = [int(p) for p in args.compile_prompts.split(",")] if args.compile_prompts else prompts

    paths = args.paths.split(",")
    routers = {"off": [False], "on": [True], "both": [False, True]}[args.router]

    def case(label: str, model, weights: float) -> None:
        for path in paths:
            kw = {"compile_step": True} if path == "compile" else {}
            for router in routers:  # a fresh runner each: graphs are cached per model
                clear_cache(model)
                with settings.override(moe_router=router):
                    name = f"{label}{', compile_step' if kw else ''}{f', {ROUTER}' if router else ''}"
                    rows_of(name, model, weights, **kw)
        clear_cache(model)

    def rows_of(label: str, model, weights: float, **kw) -> None:
        for p in compile_prompts if kw.get("compile_step") else prompts:
            if time.perf_counter() - T0 > args.budget_s:
                notes.append(f"{label} P={p} skipped (time budget {args.budget_s:.0f} s)")
                continue
            try:
                r = run_case(label, model, prompt_ids(cfg.vocab_size, p, device), n, True, device, 1, **kw)
            except Exception as e:  # noqa: BLE001 - keep measuring the others
                notes.append(f"{label} P={p} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            r["weights_gib"] = weights
            rows.append(r)
            if r.get("capture_error"):
                notes.append(f"{label} P={p}: graph capture failed: {r['capture_error']}")
        Path(args.out).write_text(table(args, rows, notes))

    t = time.perf_counter()
    dense = random_model(cfg, device)
    if hasattr(dense, "set_experts_implementation") and device == "cuda":
        dense.set_experts_implementation("grouped_mm")
    sync()
    impl = getattr(dense.config, "_experts_implementation", "eager")
    notes.append(f"bf16 experts: transformers' `{impl}` implementation")
    print(f"random bf16 model in {time.perf_counter() - t:.1f} s", flush=True)
    root = Path(args.ckpt_root) / ("tiny" if args.tiny else f"l{args.layers}")
    info = write_moe_checkpoint(dense, root / "nvfp4")
    if not info["reused"]:
        notes.append(f"NVFP4 checkpoint written in {info['seconds']:.0f} s ({info['bytes'] / 1e9:.2f} GB)")
    bf16_weights = gib(torch.cuda.memory_allocated()) if device == "cuda" else float("nan")
    if args.profile_prefill:
        profile_prefill("bf16", dense, cfg.vocab_size, prompts[0], device)
    case("bf16, this path (graph)", dense, bf16_weights)
    if args.profile and device == "cuda":
        profile_step("bf16", dense, cfg.vocab_size, prompts[0], paths[-1] == "compile")
    clear_cache(dense)
    dense = None
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    import nvfp4_fix
    from nvfp4_fix import expert_stack

    t = time.perf_counter()
    model = nvfp4_fix.from_pretrained(root / "nvfp4", dtype=torch.bfloat16, device_map=device)
    sync()
    nv_weights = gib(torch.cuda.memory_allocated()) if device == "cuda" else float("nan")
    notes.append(f"NVFP4 checkpoint loaded in {time.perf_counter() - t:.1f} s")
    if args.profile_prefill:
        profile_prefill("NVFP4", model, cfg.vocab_size, prompts[0], device)
    from nvfp4_fix.kernels import cuda_moe

    labels = {"triton": "NVFP4, Triton decode experts (graph)",
              "cuda": "NVFP4, tensor-core decode experts (cuda_moe, graph)",
              "cuda-sum": "NVFP4, tensor-core decode experts, pair sum in the down kernel (graph)"}  # fmt: skip
    down_sum_default = cuda_moe.DOWN_SUM_MAX_TOKENS
    for experts in args.experts.split(","):
        if experts.startswith("cuda") and device != "cuda":
            continue
        cuda_moe.DOWN_SUM_MAX_TOKENS = 1 << 30 if experts == "cuda-sum" else 0
        try:
            with settings.override(cuda_moe=experts.startswith("cuda")):
                case(labels[experts], model, nv_weights)
                if args.profile and device == "cuda":
                    profile_step(f"NVFP4 ({experts} experts)", model, cfg.vocab_size, prompts[0],
                                 paths[-1] == "compile")  # fmt: skip
        finally:
            cuda_moe.DOWN_SUM_MAX_TOKENS = down_sum_default
    if args.loop:
        clear_cache(model)
        saved, expert_stack.GROUPED_DEVICES = expert_stack.GROUPED_DEVICES, ()
        try:
            case("NVFP4, per-expert loop (no graph)", model, nv_weights)
        finally:
            expert_stack.GROUPED_DEVICES = saved
    text = table(args, rows, notes)
    Path(args.out).write_text(text)
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
