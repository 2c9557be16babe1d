# ruff: noqa: E501, B023  (lambdas are called at once, inside the loop that binds them)
"""Batch-1 decode speed, time to first token and prefill speed for a random-weight Llama-3-8B-shaped
model, in one run: NVFP4 and bf16 through nvfp4_fix.generation.generate (static cache + CUDA graph)
and through plain ``model.generate`` (eager transformers: what users get after ``apply_patch()`` +
``from_pretrained``).

    PYTHONPATH=src python benchmarks/bench_generation.py [--prompts 128,2048] [--new-tokens 256]
        [--hf-new-tokens 32] [--compile] [--quick] [--budget-s 225] [--out benchmarks/RESULTS-generation.md]

The model is drawn on the GPU (N(0, 0.02), seeded); the NVFP4 checkpoint is made from it on the GPU
(benchmarks/llama8b.py) and loaded back with ``nvfp4_fix.from_pretrained(device_map="cuda")``.

Measured per method and prompt length P (greedy, no stop token, so every run makes exactly N tokens):
* TTFT: wall time of a call with ``max_new_tokens=1`` (prefill + first token on the host), median of 3;
* decode tok/s: (N - 1) / the time of the N - 1 steps after the first token (best of 2 N-token calls,
  1 with ``--quick``): ``generate``'s own ``stats["decode_s"]`` (it waits for the device after the
  prefill and after the last step); for ``model.generate``, T(N) - TTFT with T(N) a whole call. N = ``--new-tokens`` for the fast path, ``--hf-new-tokens`` (default 32) for
  ``model.generate``, whose eager decode runs at ~10 tok/s;
* prefill tok/s: P / the time of one forward over the prompt (a fresh DynamicCache, logits of the
  last position only: the prefill of ``model.generate``), median of 3 after a warm-up;
* GPU memory: ``torch.cuda.memory_allocated`` with only the model loaded, and the peak
  (``max_memory_allocated``) during the N-token calls, static cache and graph pool included.
The first call of the fast path (graph capture, Triton JIT) is timed separately ("setup").
Breakdown (NVFP4 and bf16, fast path): the 224 decoder linears called once each on an M=1 input,
captured in one CUDA graph and replayed (the GEMV share of a token), the lm_head alone likewise, and
the rest of the decode step (attention, norms, rotary, sampling, small kernels) by difference.
Optional cases, run while the time budget (``--budget-s``, whole script) allows: NVFP4 fast path
with ``pack_gqa=False`` (transformers' own sdpa with repeat_kv for decode attention, as before the
Triton decode-attention kernel and the folded query heads), and with ``--compile`` NVFP4 with
``compile_step=True`` (~75 s of compilation); "NVFP4 + NVFP4 lm_head" (``quantize_lm_head=True``: opt-in,
lossy) on the graph path and, with ``--compile``, the compiled one, with its breakdown row and its accuracy
(benchmarks/lmhead_accuracy.py: logits relative L2 error and teacher-forced top-1 agreement against the
dense lm_head over 512 positions of this random model, and on the demo model on the CPU). ``--tiny`` runs a 2-layer model on the CPU (static loop,
no graph) to smoke-test the script.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama8b import card_name, ensure_checkpoints, llama8b_config, random_model, versions  # noqa: E402
from lmhead_accuracy import compare, demo_lines, line  # noqa: E402

from nvfp4_fix.generation import clear_cache, generate  # noqa: E402
from nvfp4_fix.generation.cache import forward_api  # noqa: E402

T_START = time.perf_counter()
LMH = "NVFP4 + NVFP4 lm_head"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def gib(n: float) -> float:
    return n / (1 << 30)


def prompt_ids(vocab: int, length: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(length)
    return torch.randint(min(1000, vocab // 4), min(vocab, 100000), (1, length), generator=g).to(device)


def hf_generate(model, ids, n):
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        return model.generate(input_ids=ids, generation_config=gc)


def run_case(label, model, ids, n, fast: bool, device: str, reps: int = 2, **kw) -> dict:
    """TTFT, decode tok/s and memory for one method at one prompt length."""
    res = {"method": label, "prompt": ids.shape[1], "new_tokens": n}
    cache_len = 128 * math.ceil((ids.shape[1] + n + 2) / 128)
    use_graph = device == "cuda"
    if fast:

        def call(k, stats=None):
            return generate(
                model,
                ids,
                k,
                stop_token_ids=(),
                max_cache_len=cache_len,
                use_cuda_graph=use_graph,
                stats=stats,
                **kw,
            )
    else:

        def call(k, stats=None):
            return hf_generate(model, ids, k)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    stats: dict = {}
    res["setup_s"] = timed(lambda: call(n, stats)) if fast else None
    res["path"] = stats.get("path", "model.generate")
    if fast and stats.get("capture_error"):
        res["capture_error"] = stats["capture_error"]
    res["ttft_s"] = statistics.median(timed(lambda: call(1)) for _ in range(3))
    out = {}
    totals, decodes = [], []
    for _ in range(reps if fast else 1):
        sync()
        t = time.perf_counter()
        timing: dict = {}
        out["ids"] = call(n, timing)
        sync()
        totals.append(time.perf_counter() - t)
        decodes.append(timing.get("decode_s"))
    total = min(totals)
    res["total_s"] = total
    # this package's generate times its own decode steps (after the first token); model.generate: T(N) - TTFT
    decode_s = min(decodes) if None not in decodes else total - res["ttft_s"]
    res["decode_tok_s"] = (n - 1) / max(decode_s, 1e-9)
    res["ms_per_token"] = 1000 * decode_s / (n - 1)
    res["peak_gib"] = gib(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else float("nan")
    res["tokens"] = out["ids"][0, ids.shape[1] :].cpu()
    print(
        f"  {label:<40} P={ids.shape[1]:<5} N={n:<4} TTFT {1000 * res['ttft_s']:8.1f} ms  decode {res['decode_tok_s']:7.1f} tok/s "
        f"({res['ms_per_token']:.2f} ms/tok)  peak {res['peak_gib']:.2f} GiB  [{res['path']}]"
        + (f" setup {res['setup_s']:.1f} s" if fast else ""),
        flush=True,
    )
    return res


def prefill_forward(model, ids):
    """One forward over the prompt as model.generate's prefill runs it: a fresh DynamicCache, the
    logits of the last position only."""
    from transformers import DynamicCache

    api = forward_api(model)

    def forward():
        kw = {api.cache_kw: DynamicCache(), "use_cache": True}
        if api.logits_kw:
            kw[api.logits_kw] = 1
        with torch.no_grad():
            model(input_ids=ids, **kw)

    return forward


def prefill_case(label, model, ids) -> dict:
    """Prefill tok/s: P / time of one forward over the prompt (fresh DynamicCache, last logits only)."""
    forward = prefill_forward(model, ids)
    timed(forward)  # warm-up (kernel JIT, cuBLAS handles)
    sec = statistics.median(timed(forward) for _ in range(3))
    p = ids.shape[1]
    print(f"  {label:<40} P={p:<5} prefill forward {1000 * sec:8.1f} ms  {p / sec:9.0f} tok/s", flush=True)
    return {"weights": label, "prompt": p, "forward_s": sec, "tok_s": p / sec}


def graph_time(fn, reps: int = 20) -> float:
    """ms per call of fn, captured in a CUDA graph (warm-up first) and replayed; eager on CPU."""
    if not torch.cuda.is_available():
        fn()
        t = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times)


def breakdown(model, device: str) -> dict:
    """GEMV share of a decode step: every decoder linear once at M=1, and the lm_head alone."""
    dtype = torch.bfloat16
    linears = [
        m
        for n, m in model.named_modules()
        if n != "lm_head" and hasattr(m, "in_features") and n.startswith("model.layers")
    ]
    xs = {k: torch.randn(1, k, device=device, dtype=dtype) for k in {m.in_features for m in linears}}
    with torch.no_grad():
        lin_ms = graph_time(lambda: [m(xs[m.in_features]) for m in linears])
        head = model.lm_head
        xh = torch.randn(1, head.in_features, device=device, dtype=dtype)
        head_ms = graph_time(lambda: head(xh))
    nbytes = 0
    for m in linears:
        nbytes += sum(p.numel() * p.element_size() for p in m.parameters())
    return {
        "linears_ms": lin_ms,
        "n_linears": len(linears),
        "linear_bytes": nbytes,
        "lm_head_ms": head_ms,
        "lm_head_bytes": sum(p.numel() * p.element_size() for p in head.parameters()),
    }


def command_and_shape(args) -> tuple[str, str]:
    """This run's command line and the model it measured, for the report's header."""
    cmd = "PYTHONPATH=src python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/bench_generation.py", *sys.argv[1:]]
    )
    shape = (
        "tiny 2-layer smoke-test model"
        if args.tiny
        else f"random-weight Llama-3-8B shape ({args.layers} layers)"
    )
    return cmd, shape


def write_report(args, prompts, n, rows, brk, notes, prefill=(), echo: bool = False) -> None:
    card = card_name()
    cmd, shape = command_and_shape(args)
    lines = [f"# Generation benchmark on {card}: batch 1, {shape}", "",
             f"Card: **{card}**; {versions()}.", "", f"Command: `{cmd}`", "",
             f"Greedy, no stop token; N new tokens per call ({n} for the fast path, {args.hf_new_tokens} for eager `model.generate`). "
             "TTFT = a 1-token call (prefill + first token); decode tok/s = (N-1) / the time of the N-1 steps after the first token (generate's stats['decode_s']; model.generate: T(N) - TTFT).",
             "Weights = GPU memory with only the model loaded; peak = max_memory_allocated during the calls (static cache, graph pool, activations).", "",
             f"| method ({card}) | prompt | N | TTFT ms | decode tok/s | ms/token | weights GiB | peak GiB | path | setup s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for r in rows:
        setup = f"{r['setup_s']:.1f}" if r.get("setup_s") is not None else "-"
        lines.append(f"| {r['method']} | {r['prompt']} | {r['new_tokens']} | {1000 * r['ttft_s']:.1f} | {r['decode_tok_s']:.1f} | {r['ms_per_token']:.2f} | "
                     f"{r.get('weights_gib', float('nan')):.2f} | {r['peak_gib']:.2f} | {r['path']} | {setup} |")  # fmt: skip
    if prefill:
        lines += ["", "Prefill: P / time of one forward over the prompt (the prefill of `model.generate`: DynamicCache, SDPA causal; "
                  "the fast path's prefill runs the same forward, then copies the K/V into its static cache):", "",
                  f"| weights ({card}) | prompt | forward ms | prefill tok/s |", "|---|---:|---:|---:|"]  # fmt: skip
        for r in prefill:
            lines.append(
                f"| {r['weights']} | {r['prompt']} | {1000 * r['forward_s']:.1f} | {r['tok_s']:.0f} |"
            )
    lines += ["", "Decode-step breakdown (fast path, P = first prompt length; linears = every decoder linear once at M=1 in one CUDA graph):", "",
              "| weights | decode ms/token | decoder linears ms (count) | GB/s of linears | lm_head ms | rest ms (attention, norms, rotary, sampling, ...) |",
              "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for kind, label in (("nvfp4", "NVFP4, this path (graph)"), ("bf16", "bf16, this path (graph)"),
                        ("nvfp4 + nvfp4 lm_head", f"{LMH}, this path (graph)")):  # fmt: skip
        b = brk.get(kind)
        step = next((r for r in rows if r["method"] == label and r["prompt"] == prompts[0]), None)
        if not b or not step:
            continue
        rest = step["ms_per_token"] - b["linears_ms"] - b["lm_head_ms"]
        lines.append(f"| {kind} | {step['ms_per_token']:.2f} | {b['linears_ms']:.2f} ({b['n_linears']}) | "
                     f"{b['linear_bytes'] / b['linears_ms'] / 1e6:.0f} | {b['lm_head_ms']:.2f} | {rest:.2f} |")  # fmt: skip
    if notes:
        lines += ["", *[f"- {x}" for x in notes]]
    for r in rows:
        if r.get("capture_error"):
            lines.append(f"- {r['method']} P={r['prompt']}: graph capture failed: {r['capture_error']}")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if echo:
        print("\n" + text, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="128,2048")
    ap.add_argument("--new-tokens", type=int, default=256, help="new tokens per fast-path call")
    ap.add_argument("--hf-new-tokens", type=int, default=32, help="new tokens per eager model.generate call")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ckpt-root", default="/tmp/nvfp4fix-bench")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time compile_step=True (torch.compile'd step in the graph), if the budget allows",
    )
    ap.add_argument("--skip-hf", action="store_true", help="skip eager model.generate")
    ap.add_argument(
        "--quick", action="store_true", help="time each fast-path N-token call once, not best of 2"
    )
    ap.add_argument("--tiny", action="store_true", help="2-layer model on the CPU: smoke test")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=225,
        help="whole-script time budget: optional cases start only if their estimate fits, others are skipped past it",
    )
    ap.add_argument("--out", default="benchmarks/RESULTS-generation.md")
    ap.add_argument(
        "--batches",
        default=None,
        help="batched-decode mode only, e.g. 1,8,32: decode tok/s per batch size at the first prompt length "
        "(benchmarks/batch_decode.py; default out benchmarks/RESULTS-batch.md)",
    )
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --tiny for a CPU smoke test")
        return 2
    prompts = [int(p) for p in args.prompts.split(",")]
    n, n_hf = args.new_tokens, args.hf_new_tokens
    reps = 1 if args.quick else 2
    cfg = llama8b_config(args.layers, tiny=args.tiny)
    print(f"card: {card_name()}; {versions()}", flush=True)

    rows: list[dict] = []
    prefill: list[dict] = []
    notes: list[str] = []
    brk: dict[str, dict] = {}

    def report(echo: bool = False) -> None:  # the file after every case, the screen at the end
        write_report(args, prompts, n, rows, brk, notes, prefill, echo)

    def elapsed() -> float:
        return time.perf_counter() - T_START

    def attempt(what: str, fn, estimate_s: float = 0.0):
        """Run one case unless the budget is spent (or, for an estimated optional case, would be)."""
        if elapsed() + estimate_s > args.budget_s:
            notes.append(f"{what} skipped (time budget: {elapsed():.0f} s spent of {args.budget_s:.0f} s)")
            print(f"  skipped {what} (time budget)", flush=True)
            return None
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - keep measuring the other cases
            import traceback

            traceback.print_exc()
            notes.append(
                f"{what} failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            )
            return None
        finally:
            report()

    def agree(what: str, a: dict | None, b: dict | None) -> None:
        if a and b:
            k = min(len(a["tokens"]), len(b["tokens"]))
            same = int((a["tokens"][:k] == b["tokens"][:k]).long().cumprod(0).sum())
            notes.append(f"{what}: agree on the first {same} of {k} greedy tokens")

    def measure(kind: str, model, weights_gib: float) -> None:
        """Fast path, eager model.generate and one prefill forward, at every prompt length."""
        for p in prompts:
            ids = prompt_ids(cfg.vocab_size, p, device)
            r = attempt(
                f"{kind} graph P={p}",
                lambda: run_case(f"{kind}, this path (graph)", model, ids, n, True, device, reps),
            )
            h = None
            if not args.skip_hf:
                h = attempt(
                    f"{kind} model.generate P={p}",
                    lambda: run_case(f"{kind}, model.generate (eager)", model, ids, n_hf, False, device),
                )
            for x in (r, h):
                if x:
                    x["weights_gib"] = weights_gib
                    rows.append(x)
            agree(f"{kind} P={p}: this path and model.generate", r, h)
            f = attempt(f"{kind} prefill P={p}", lambda: prefill_case(kind, model, ids))
            if f:
                prefill.append(f)

    t = time.perf_counter()
    dense = random_model(cfg, device)
    sync()
    print(f"random bf16 model on {device} in {time.perf_counter() - t:.1f} s", flush=True)
    root = Path(args.ckpt_root) / ("tiny" if args.tiny else f"l{args.layers}")
    paths = ensure_checkpoints(root, ("nvfp4",), cfg, device, model=dense)
    bf16_weights = gib(torch.cuda.memory_allocated()) if device == "cuda" else float("nan")
    if args.batches:
        return batch_mode(args, cfg, dense, paths["nvfp4"], prompts[0], n, device, reps)

    # ---- bf16 -----------------------------------------------------------------------------------
    measure("bf16", dense, bf16_weights)
    b = attempt("bf16 breakdown", lambda: breakdown(dense, device))
    if b:
        brk["bf16"] = b
    clear_cache(dense)
    dense = None
    gc.collect()  # reference cycles (transformers' generate) would keep the bf16 weights allocated
    if device == "cuda":
        torch.cuda.empty_cache()

    # ---- NVFP4 ----------------------------------------------------------------------------------
    import nvfp4_fix

    t = time.perf_counter()
    model = nvfp4_fix.from_pretrained(paths["nvfp4"], dtype=torch.bfloat16, device_map=device)
    sync()
    load_s = time.perf_counter() - t
    nv_weights = gib(torch.cuda.memory_allocated()) if device == "cuda" else float("nan")
    print(f"NVFP4 model loaded in {load_s:.1f} s, {nv_weights:.2f} GiB on the GPU", flush=True)
    notes.append(f"NVFP4 checkpoint loaded with nvfp4_fix.from_pretrained in {load_s:.1f} s")
    measure("NVFP4", model, nv_weights)
    b = attempt("NVFP4 breakdown", lambda: breakdown(model, device))
    if b:
        brk["nvfp4"] = b

    # ---- optional cases, while the budget allows -------------------------------------------------
    clear_cache(model)

    def low_memory_rows() -> None:  # NVFP4 input embedding as well (enable_low_memory_mode's load)
        lm = nvfp4_fix.from_pretrained(
            paths["nvfp4"], dtype=torch.bfloat16, device_map=device, quantize_embeddings=True
        )
        sync()
        lm_weights = gib(sum(t.numel() * t.element_size() for t in [*lm.parameters(), *lm.buffers()]))
        ids = prompt_ids(cfg.vocab_size, prompts[0], device)
        for label, fast, nn_ in (("this path (graph)", True, n), ("model.generate (eager)", False, n_hf)):
            r = run_case(f"NVFP4 + NVFP4 embedding, {label}", lm, ids, nn_, fast, device, reps)
            r["weights_gib"] = lm_weights
            rows.append(r)
        clear_cache(lm)

    if args.compile:
        clear_cache(model)
        for p in prompts:
            ids = prompt_ids(cfg.vocab_size, p, device)
            r = attempt(
                f"NVFP4 + torch.compile P={p}",
                lambda: run_case(
                    "NVFP4, this path + torch.compile", model, ids, n, True, device, reps, compile_step=True
                ),
                estimate_s=95,
            )
            if not r:
                break
            r["weights_gib"] = nv_weights
            rows.append(r)
    clear_cache(model)
    notes.append(
        f"peak GiB of the NVFP4 embedding / lm_head rows includes the plain NVFP4 model ({nv_weights:.2f} GiB), still loaded then"
    )
    lq = attempt(f"{LMH} load", lambda: nvfp4_fix.from_pretrained(
        paths["nvfp4"], dtype=torch.bfloat16, device_map=device, quantize_lm_head=True), estimate_s=40)  # fmt: skip
    if lq is not None:  # opt-in, lossy: the dense lm_head quantized at load
        lq_weights = gib(sum(t.numel() * t.element_size() for t in [*lq.parameters(), *lq.buffers()]))
        arms = [("this path (graph)", {}, 15)] + [
            ("this path + torch.compile", {"compile_step": True}, 95)
        ] * args.compile
        for label, kw, est in arms:  # as the NVFP4 arms: graph, and compile_step=True with --compile
            for p in prompts:
                ids = prompt_ids(cfg.vocab_size, p, device)
                r = attempt(f"{LMH} {label} P={p}", lambda: run_case(f"{LMH}, {label}", lq, ids, n, True, device, reps, **kw), est)  # fmt: skip
                if r:
                    r["weights_gib"] = lq_weights
                    rows.append(r)
                    base = next(
                        (x for x in rows if x["method"] == f"NVFP4, {label}" and x["prompt"] == p), None
                    )
                    agree(f"{LMH} P={p}, {label}: vs the dense lm_head", r, base)
            clear_cache(lq)
        b = attempt(f"{LMH} breakdown", lambda: breakdown(lq, device))
        if b:
            brk["nvfp4 + nvfp4 lm_head"] = b
        acc_ids = prompt_ids(cfg.vocab_size, 512, device)
        acc = attempt(f"{LMH} accuracy", lambda: compare(model, lq, acc_ids))
        if acc:
            notes.append(
                line(f"{LMH} accuracy, this random model vs its dense lm_head (bf16, {device})", acc)
            )
        del lq
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    for x in attempt(f"{LMH} accuracy on the demo model", demo_lines, estimate_s=10) or []:
        notes.append(x)
        print(f"  {x}", flush=True)
    attempt("NVFP4 low-memory load", low_memory_rows, estimate_s=25)
    for p in prompts:  # decode attention through transformers' own sdpa (repeat_kv), as before pack_gqa
        ids = prompt_ids(cfg.vocab_size, p, device)
        r = attempt(
            f"NVFP4 pack_gqa=False P={p}",
            lambda: run_case(
                "NVFP4, this path (graph), transformers sdpa attention (pack_gqa=False)",
                model,
                ids,
                n,
                True,
                device,
                reps,
                pack_gqa=False,
            ),
            estimate_s=15,
        )
        if r:
            r["weights_gib"] = nv_weights
            rows.append(r)
    report(echo=True)
    print(f"done ({elapsed():.0f} s total)")
    return 0


def batch_mode(args, cfg, dense, nvfp4_path, prompt: int, n: int, device: str, reps: int) -> int:
    """--batches: bf16 then NVFP4, each at every batch size; one table (benchmarks/batch_decode.py)."""
    from batch_decode import batch_rows, batch_table

    import nvfp4_fix

    batches = [int(b) for b in args.batches.split(",")]
    rows = batch_rows("bf16", dense, cfg.vocab_size, batches, prompt, n, device, reps)
    del dense
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    model = nvfp4_fix.from_pretrained(nvfp4_path, dtype=torch.bfloat16, device_map=device)
    rows += batch_rows("NVFP4", model, cfg.vocab_size, batches, prompt, n, device, reps)
    card = card_name()
    cmd, shape = command_and_shape(args)
    text = "\n".join([f"# Batched decode on {card}: {shape}", "", f"Card: **{card}**; {versions()}.", "",
                      f"Command: `{cmd}`", "", "Greedy, no stop token, no padding; decode tok/s counts every row's tokens: "
                      "B * (N-1) / the time of the N-1 steps after the first token (generate's stats['decode_s']).", "", *batch_table(rows, card)]) + "\n"  # fmt: skip
    out = Path(args.out if args.out != "benchmarks/RESULTS-generation.md" else "benchmarks/RESULTS-batch.md")
    out.write_text(text)
    print("\n" + text, flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
