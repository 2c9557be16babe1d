# ruff: noqa: E501
"""Issue 15's scale figures: a Qwen3-27B-like mixed checkpoint (NVFP4 MLP + FP8 attention, random weights,
written by ``nvfp4_fix.writer.save_quantized``) loaded under a 24 GiB cap: resident GPU memory against the
checkpoint's bytes, load peak, and batch-1 decode tok/s with ``nvfp4_fix.generate``. One markdown table
naming the card.

    PYTHONPATH=src python benchmarks/bench_mixed_27b.py [--layers 64] [--cap-gib 24] [--out benchmarks/RESULTS-mixed.md]
    PYTHONPATH=src python benchmarks/bench_mixed_27b.py --tiny      # 2 small layers on the CPU: smoke test

Shape (Qwen3 architecture): hidden 5120, 64 layers, intermediate 17408, 40 query / 8 KV heads of 128,
vocab 151936, untied lm_head: ~22.7B parameters, 17.1B of them in the MLPs. The bf16 model is never built:
``save_quantized`` gets a meta-device model for names and config and the weights one decoder layer at a
time (N(0, 0.02) drawn on the GPU, norms 1), quantizes each on the GPU and streams ~4 GB shards to disk:
compressed-tensors ``mixed-precision`` (MLP NVFP4A16; q/k/v/o FP8 per-channel weights with dynamic
per-token activations, the FP8_DYNAMIC recipe). It is loaded back with ``nvfp4_fix.from_pretrained(
device_map="auto", max_memory={0: cap})``: with no CPU entry, anything that does not fit under the cap
would go to disk, which the loader refuses, so the cap is a hard limit; the table also shows a load
under half the checkpoint's size refused. Resident = torch.cuda.memory_allocated() after the load minus
before it (measured); load peak = max_memory_allocated() during it.
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


def config(layers: int, tiny: bool):  # noqa: ANN201
    from transformers import Qwen3Config

    if tiny:
        cfg = Qwen3Config(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            tie_word_embeddings=False,
        )
    else:
        cfg = Qwen3Config(
            vocab_size=151936,
            hidden_size=5120,
            intermediate_size=17408,
            num_hidden_layers=layers,
            num_attention_heads=40,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
        )
    cfg.architectures = ["Qwen3ForCausalLM"]
    if "dtype" in cfg.to_dict():  # transformers 5; 4.57 calls it torch_dtype
        cfg.dtype = torch.bfloat16
    else:
        cfg.torch_dtype = torch.bfloat16
    return cfg


def layer_batches(model: torch.nn.Module, device: str, seed: int = 0):  # noqa: ANN201
    """The weights of ``model`` (a meta-device model) in batches of one decoder layer (the embeddings,
    final norm and lm_head in one batch of their own), drawn on ``device``: N(0, 0.02), norms 1."""
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, p in model.state_dict().items():
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[1:2] == ["layers"] else "rest"
        groups.setdefault(key, []).append((name, p.shape))
    g = torch.Generator(device).manual_seed(seed)
    for items in groups.values():
        batch = {}
        for name, shape in items:
            t = torch.empty(shape, dtype=torch.bfloat16, device=device)
            batch[name] = t.normal_(0.0, 0.02, generator=g) if len(shape) >= 2 else t.fill_(1.0)
        yield batch


def make_checkpoint(out: Path, layers: int, tiny: bool, device: str) -> float:
    from transformers import AutoModelForCausalLM

    from nvfp4_fix.schemes import FP8Spec
    from nvfp4_fix.writer import save_quantized

    t = time.perf_counter()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(layers, tiny))
    save_quantized(
        model,
        out,
        fp8=["re:.*self_attn\\.(q|k|v|o)_proj$"],
        fp8_spec=FP8Spec("channel", "dynamic-token"),
        state=layer_batches(model, device),
    )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return time.perf_counter() - t


def load(ckpt: Path, device: str, cap_gib: float):  # noqa: ANN201
    import nvfp4_fix

    if device != "cuda":
        return nvfp4_fix.from_pretrained(ckpt, dtype=torch.bfloat16)
    return nvfp4_fix.from_pretrained(
        ckpt, dtype=torch.bfloat16, device_map="auto", max_memory={0: int(cap_gib * 2**30)}
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--cap-gib", type=float, default=24.0)
    ap.add_argument("--prompts", default="128,2048")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ckpt", default="/tmp/nvfp4fix-bench-mixed")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also decode with compile_step=True")
    ap.add_argument("--out", default="benchmarks/RESULTS-mixed.md")
    args = ap.parse_args()
    from nvfp4_fix import fp8_cuda
    from nvfp4_fix.checkpoint import inspect_checkpoint
    from nvfp4_fix.fp8 import FP8Linear
    from nvfp4_fix.layer import NVFP4Linear

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --tiny for a CPU smoke test")
        return 2
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    ckpt = Path(args.ckpt)
    made_s = (
        make_checkpoint(ckpt, args.layers, args.tiny, device) if not (ckpt / "config.json").exists() else 0.0
    )
    info = inspect_checkpoint(ckpt)
    ckpt_bytes = sum(f.stat().st_size for f in {t.file for t in info.tensors.values()})
    kinds = {q.scheme for q in info.quantized.values()}
    print(
        f"checkpoint {ckpt_bytes / 2**30:.2f} GiB" + (f", written in {made_s:.1f} s" if made_s else ""),
        flush=True,
    )
    lines = [
        f"# Mixed NVFP4 + FP8 checkpoint under a {args.cap_gib:g} GiB cap ({card})",
        "",
        f"Command: `PYTHONPATH=src python {shlex.join(['benchmarks/bench_mixed_27b.py', *sys.argv[1:]])}`; "
        f"torch {torch.__version__}",
        "",
        f"Checkpoint: {len(info.quantized)} quantized layers ({', '.join(sorted(kinds))}), "
        f"{ckpt_bytes / 2**30:.2f} GiB on disk" + (f", written in {made_s:.0f} s" if made_s else ""),
        "",
    ]

    def finish(code: int) -> int:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return code

    if (
        device == "cuda"
    ):  # the cap binds: half the checkpoint's size must be refused, before any weight is read
        small = ckpt_bytes / 2 / 2**30
        t = time.perf_counter()
        try:
            load(ckpt, device, small)
            lines += [f"**A load under {small:.1f} GiB was not refused**: the cap does not bind.", ""]
        except Exception as e:
            msg = " ".join(str(e).split())[:160]
            lines += [
                f"Under a {small:.1f} GiB cap the load is refused in {time.perf_counter() - t:.1f} s "
                f"({type(e).__name__}: {msg}).",
                "",
            ]
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        model = load(ckpt, device, args.cap_gib)
    except Exception as e:  # the cap is the point of the figure: report, do not hide
        lines.append(f"**Load failed under the cap**: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return finish(1)
    load_s = time.perf_counter() - t
    packed = sum(isinstance(m, NVFP4Linear) for m in model.modules())
    fp8 = [m for m in model.modules() if isinstance(m, FP8Linear) and m.weight.dtype == torch.float8_e4m3fn]
    lines += [
        f"Loaded in {load_s:.1f} s: {packed} NVFP4 layers packed, {len(fp8)} FP8 layers in float8_e4m3fn.",
        "",
    ]
    print(lines[-2], flush=True)
    if device == "cuda":
        resident = torch.cuda.memory_allocated() - base
        load_peak = torch.cuda.max_memory_allocated() - base
        placed = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]})
        x1 = torch.zeros(1, model.config.hidden_size, dtype=torch.bfloat16, device=device)
        path = fp8_cuda.scaled_mm_scaling(fp8[0].spec, x1, fp8[0].out_features) if fp8 else None
        lines += [
            f"Resident (measured) {gib(resident):.2f} GiB = {resident / ckpt_bytes:.3f}x the checkpoint's "
            f"bytes; load peak {gib(load_peak):.2f} GiB ({load_peak / resident:.3f}x resident); every tensor on "
            f"{', '.join(placed)}. FP8 layers: {fp8[0].spec.describe() if fp8 else '-'}, run through "
            f"{'torch._scaled_mm (' + path + ' scaling)' if path else 'the emulation + W8A16'}.",
            "",
        ]
    lines += ["| prompt | N | TTFT ms | decode tok/s | peak GiB | path |", "|---:|---:|---:|---:|---:|---|"]
    vocab = model.config.vocab_size
    for compile_step in (False, True)[: 1 + args.compile]:
        for p in (int(x) for x in args.prompts.split(",")):
            r = run_case(
                "NVFP4 + FP8",
                model,
                prompt_ids(vocab, p, device),
                args.new_tokens,
                True,
                device,
                reps=1,
                compile_step=compile_step,
            )
            lines.append(
                f"| {p} | {args.new_tokens} | {1000 * r['ttft_s']:.1f} | {r['decode_tok_s']:.1f} | "
                f"{r['peak_gib']:.2f} | {r['path']}{' + compile_step' if compile_step else ''} |"
            )
        Path(args.out).write_text("\n".join(lines) + "\n")  # what is done survives a timeout
    return finish(0)


if __name__ == "__main__":
    raise SystemExit(main())
