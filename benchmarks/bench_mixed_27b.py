# ruff: noqa: E501
"""Issue 15's scale figures: a Qwen3-27B-like mixed checkpoint (NVFP4 MLP + FP8 attention, random weights,
written by ``nvfp4_fix.writer.save_quantized``) loaded under a 24 GiB cap: resident GPU memory against the
checkpoint's bytes, load peak, and batch-1 decode tok/s with ``nvfp4_fix.generate``. One markdown table
naming the card.

    PYTHONPATH=src python benchmarks/bench_mixed_27b.py [--layers 64] [--cap-gib 24] [--out benchmarks/RESULTS-mixed.md]
    PYTHONPATH=src python benchmarks/bench_mixed_27b.py --tiny      # 2 small layers on the CPU: smoke test

Shape (Qwen3 architecture): hidden 5120, 64 layers, intermediate 17408, 40 query / 8 KV heads of 128,
vocab 151936, untied lm_head: ~22.7B parameters, 17.1B of them in the MLPs. The bf16 model is drawn on the
GPU (45 GiB; an H100 holds it), written as compressed-tensors ``mixed-precision`` (MLP NVFP4A16; q/k/v/o FP8
per-channel weights with dynamic per-token activations, the FP8_DYNAMIC recipe), freed, and loaded back with
``nvfp4_fix.from_pretrained(device_map="cuda", max_memory={0: cap})``. The cap is a hard limit: a load that
needs more fails (and the table says so).

Not yet run on a GPU (the session that wrote it had no device time left).
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
from bench_generation import gib, prompt_ids, run_case  # noqa: E402
from llama8b import random_model  # noqa: E402


def config(layers: int, tiny: bool):  # noqa: ANN201
    from transformers import Qwen3Config

    if tiny:
        cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False)
    else:
        cfg = Qwen3Config(vocab_size=151936, hidden_size=5120, intermediate_size=17408, num_hidden_layers=layers,
                          num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                          max_position_embeddings=8192, tie_word_embeddings=False)
    cfg.architectures = ["Qwen3ForCausalLM"]
    return cfg


def make_checkpoint(out: Path, layers: int, tiny: bool, device: str) -> float:
    from nvfp4_fix.schemes import FP8Spec
    from nvfp4_fix.writer import save_quantized

    t = time.perf_counter()
    model = random_model(config(layers, tiny), device)
    save_quantized(model, out, fp8=["re:.*self_attn\\.(q|k|v|o)_proj$"],
                   fp8_spec=FP8Spec("channel", "dynamic-token"))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--cap-gib", type=float, default=24.0)
    ap.add_argument("--prompts", default="128,2048")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ckpt", default="/tmp/nvfp4fix-bench-mixed")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="benchmarks/RESULTS-mixed.md")
    args = ap.parse_args()
    import nvfp4_fix
    from nvfp4_fix.checkpoint import inspect_checkpoint
    from nvfp4_fix.fp8 import FP8Linear
    from nvfp4_fix.layer import NVFP4Linear

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --tiny for a CPU smoke test")
        return 2
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    ckpt = Path(args.ckpt)
    made_s = make_checkpoint(ckpt, args.layers, args.tiny, device) if not (ckpt / "config.json").exists() else 0.0
    info = inspect_checkpoint(ckpt)
    ckpt_bytes = sum(f.stat().st_size for f in {t.file for t in info.tensors.values()})
    kinds = {q.scheme for q in info.quantized.values()}
    lines = [f"# Mixed NVFP4 + FP8 checkpoint under a {args.cap_gib:g} GiB cap ({card})", "",
             f"Command: `PYTHONPATH=src python {shlex.join(['benchmarks/bench_mixed_27b.py', *sys.argv[1:]])}`", "",
             f"Checkpoint: {len(info.quantized)} quantized layers ({', '.join(sorted(kinds))}), "
             f"{ckpt_bytes / 2**30:.2f} GiB on disk" + (f", written in {made_s:.0f} s" if made_s else ""), ""]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        kw = {"device_map": "cuda", "max_memory": {0: f"{args.cap_gib}GiB"}} if device == "cuda" else {}
        model = nvfp4_fix.from_pretrained(ckpt, **kw)
    except Exception as e:  # the cap is the point of the figure: report, do not hide
        lines.append(f"**Load failed under the cap**: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        Path(args.out).write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 1
    load_s = time.perf_counter() - t
    packed = sum(isinstance(m, NVFP4Linear) for m in model.modules())
    fp8 = sum(isinstance(m, FP8Linear) and m.weight.dtype == torch.float8_e4m3fn for m in model.modules())
    resident = torch.cuda.memory_allocated() if device == "cuda" else None
    load_peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    lines += [f"Loaded in {load_s:.1f} s: {packed} NVFP4 layers packed, {fp8} FP8 layers in float8_e4m3fn.", ""]
    if resident is not None:
        lines.append(f"Resident {gib(resident):.2f} GiB = {resident / ckpt_bytes:.3f}x the checkpoint's bytes; "
                     f"load peak {gib(load_peak):.2f} GiB ({load_peak / resident:.3f}x resident).")
        lines.append("")
    lines += ["| prompt | N | TTFT ms | decode tok/s | peak GiB | path |", "|---:|---:|---:|---:|---:|---|"]
    vocab = model.config.vocab_size
    for p in (int(x) for x in args.prompts.split(",")):
        r = run_case("NVFP4 + FP8", model, prompt_ids(vocab, p, device), args.new_tokens, True, device, reps=1)
        lines.append(f"| {p} | {args.new_tokens} | {1000 * r['ttft_s']:.1f} | {r['decode_tok_s']:.1f} | "
                     f"{r['peak_gib']:.2f} | {r['path']} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
