# ruff: noqa: E501
"""Eager prefill of the Llama-3-8B shape over a 2048-token prompt: NVFP4 with the default settings and
with Humming on, against bf16, in the same run (issue 18's target: NVFP4 >= 0.95x bf16).

    PYTHONPATH=src python benchmarks/bench_prefill_humming.py [--layers 32] [--prompt 2048] [--reps 7]
        [--out DIR] [--budget-s 150] [--tiny]

The model: benchmarks/llama8b.py's random Llama-3-8B shape (N(0, 0.02) weights, seeded) in bf16 on the
GPU, twice. In the second copy every decoder linear becomes an NVFP4Linear holding its weight
quantized on the GPU (``writer.quantized_tensors``; q/k/v and gate/up share one global scale, as the
producers write them), then q/k/v and gate/up are fused as the loader does (``fusion.fuse_siblings``);
the lm_head stays bf16, as in the producers' checkpoints. This is what ``from_pretrained`` builds from
such a checkpoint, without writing and reading one.
The prefill is one forward over the prompt as ``model.generate`` runs it (bench_generation.py's
``prefill_forward``: a fresh DynamicCache, the last position's logits). Rounds alternate bf16, NVFP4
(default settings) and NVFP4 with ``settings.humming`` on, each forward timed alone (device sync before
and after); two warm-up rounds first (Triton JIT, Humming's plans and compiles), then the median of
``--reps`` rounds. Also printed: the relative difference of the last logits, Humming on vs off (same
weights: kernel agreement) and NVFP4 vs bf16 (quantization).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generation import prefill_forward  # noqa: E402
from llama8b import card_name, llama8b_config, random_model, versions  # noqa: E402

from nvfp4_fix import settings  # noqa: E402
from nvfp4_fix.fusion import fuse_siblings  # noqa: E402
from nvfp4_fix.layer import NVFP4Linear  # noqa: E402
from nvfp4_fix.swap import set_module  # noqa: E402
from nvfp4_fix.writer import fused_amax, quantized_tensors  # noqa: E402

VARIANTS = {"bf16": None, "NVFP4 (default)": {"humming": False}, "NVFP4 (humming on)": {"humming": True}}


def quantize_linears(model: torch.nn.Module) -> int:
    """Every decoder linear of ``model`` (not the lm_head) as an NVFP4Linear of its weight; fused
    groups share one global scale. Returns the number of layers replaced."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    amax = fused_amax({n: model.get_submodule(n).weight for n in names})
    with torch.no_grad():
        for name in names:
            dense = model.get_submodule(name)
            w = dense.weight
            t = quantized_tensors(name, w, "compressed-tensors", weight_amax=amax[name])
            layer = NVFP4Linear(w.shape[1], w.shape[0], dtype=w.dtype, device="meta")
            layer.load_state_dict({k[len(name) + 1 :]: v.to(w.device) for k, v in t.items()}, assign=True)
            set_module(model, name, layer)
            dense.weight = None  # its bf16 weight is freed now, one layer at a time
    return len(names)


def last_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].float()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--budget-s", type=float, default=150.0, help="fewer timed rounds past this (seconds)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tiny", action="store_true", help="2-layer model on the CPU: smoke test")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = "cpu" if args.tiny else "cuda"
    lines: list[str] = []

    def log(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    cfg = llama8b_config(args.layers, tiny=args.tiny)
    log(f"card: {card_name()}; {versions()}; command: {' '.join(sys.argv)}")
    dense = random_model(cfg, device)
    nvfp4 = random_model(cfg, device)  # the same seed: the same weights
    t = time.perf_counter()
    count = quantize_linears(nvfp4)
    groups = fuse_siblings(nvfp4)
    sync()
    gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else float("nan")
    log(
        f"{count} linears quantized, {groups} fused groups, in {time.perf_counter() - t:.1f} s; {gib:.1f} GiB on the device (both models)"
    )

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=g).to(device)
    models = {"bf16": dense, "NVFP4 (default)": nvfp4, "NVFP4 (humming on)": nvfp4}
    forwards = {name: prefill_forward(models[name], ids) for name in VARIANTS}

    def timed(name: str) -> float:
        with settings.override(**(VARIANTS[name] or {})):
            sync()
            t0 = time.perf_counter()
            forwards[name]()
            sync()
            return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(2 + args.reps):
        if r >= 3 and time.perf_counter() - t_start > args.budget_s:
            log(f"(budget: {r - 2} timed rounds)")
            break
        for name in VARIANTS:
            sec = timed(name)
            if r == 0:
                log(f"  first forward {name}: {1000 * sec:.1f} ms (JIT, Humming plans)")
            if r >= 2:
                times[name].append(sec)

    with settings.override(humming=False):
        y_off = last_logits(nvfp4, ids)
    with settings.override(humming=True):
        y_on = last_logits(nvfp4, ids)
    y_bf16 = last_logits(dense, ids)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    card = card_name()
    log("")
    log(
        f"| weights ({card}) | prompt | forward ms (median of {len(times['bf16'])}) | min-max ms | prefill tok/s | vs bf16 |"
    )
    log("|---|---:|---:|---:|---:|---:|")
    base = statistics.median(times["bf16"])
    for name, ts in times.items():
        med = statistics.median(ts)
        log(
            f"| {name} | {args.prompt} | {1000 * med:.1f} | {1000 * min(ts):.1f}-{1000 * max(ts):.1f} | {args.prompt / med:.0f} | {base / med:.3f}x |"
        )
    log("")
    log(
        f"last-position logits: NVFP4 Humming on vs off {rel(y_on, y_off):.2e} (kernel agreement); NVFP4 vs bf16 {rel(y_off, y_bf16):.2e} (quantization)"
    )
    log("target: eager prefill at P=2048 >= 0.95x bf16 (the vs bf16 column)")
    log(f"(total {time.perf_counter() - t_start:.0f} s)")
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "prefill.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
