# ruff: noqa: E501
"""LoRA fine-tuning step time and peak GPU memory: this package's packed NVFP4 base against a bf16 base
and a bitsandbytes NF4 base (QLoRA), on a random-weight Llama-3-8B-shaped model, in one run.

    PYTHONPATH=src python benchmarks/bench_lora.py [--out benchmarks/RESULTS-lora.md]
    PYTHONPATH=src python benchmarks/bench_lora.py --quick      # tiny model on the CPU, nvfp4 + bf16 arms

Every arm: LoRA r=16 (alpha 32, no dropout) on q/k/v/o/gate/up/down through peft's get_peft_model,
gradient checkpointing (non-reentrant), AdamW (lr 1e-4) on the adapters, random token ids as labels,
bf16 base weights / compute. Shapes: sequence 2048 batch 1 and sequence 512 batch 8. Each (arm, shape)
runs in a fresh subprocess: load, 3 warm-up steps, then N timed steps (cuda.synchronize around each);
step time is the median, peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (reset
after warm-up), resident is ``memory_allocated`` after the load.
Arms: nvfp4 = ``nvfp4_fix.from_pretrained`` of the NVFP4 checkpoint (benchmarks/llama8b.py, W4A16,
compressed-tensors layout); bf16 = ``AutoModelForCausalLM`` of the bf16 checkpoint; nf4 = the same with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=bfloat16)`` (skipped with a note when bitsandbytes does not import).
Issue 17's targets: NVFP4 step time <= 0.8x NF4, peak memory <= 1.1x NF4.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1 << 30
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = ("nvfp4", "bf16", "nf4")


def load(arm: str, root: Path, device: str):  # noqa: ANN201
    import torch
    from transformers import AutoModelForCausalLM

    if arm == "nvfp4":
        import nvfp4_fix

        return nvfp4_fix.from_pretrained(root / "nvfp4", dtype=torch.bfloat16, device_map=device)
    kw: dict = {"dtype": torch.bfloat16}
    if device == "cuda":
        kw["device_map"] = "cuda"
    if arm == "nf4":
        import bitsandbytes  # noqa: F401 - the arm needs it; the caller reports the ImportError
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return AutoModelForCausalLM.from_pretrained(root / "bf16", **kw)


def run_case(args: argparse.Namespace) -> dict:
    import peft
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    cuda = device == "cuda"
    if cuda:
        torch.zeros(1, device="cuda")
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = load(args.arm, Path(args.ckpt_root), device)
    res: dict = {"arm": args.arm, "seq": args.seq, "batch": args.batch, "load_s": time.perf_counter() - t}
    if cuda:
        torch.cuda.synchronize()
        res["resident"] = torch.cuda.memory_allocated()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=KINDS)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    res["lora_params"] = sum(p.numel() for p in params)
    res["lora_layers"] = sum(
        1 for n, m in model.named_modules() if n.endswith(tuple(KINDS)) and hasattr(m, "lora_A")
    )
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device) for _ in range(4)]
    model.train()

    def step(i: int) -> float:
        ids = batches[i % len(batches)]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        res["loss"] = loss.item()
        return time.perf_counter() - t0

    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = [step(i) for i in range(args.steps)]
    res["step_ms"] = 1000 * statistics.median(times)
    res["step_ms_min"] = 1000 * min(times)
    res["step_ms_max"] = 1000 * max(times)
    if cuda:
        res["peak"] = torch.cuda.max_memory_allocated()
    return res


def fmt(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x / scale:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--shapes", default="2048x1,512x8", help="SEQxBATCH,...")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ckpt-root", default="/tmp/nvfp4fix-bench/l32")
    ap.add_argument("--quick", action="store_true", help="tiny 2-layer model on the CPU, nvfp4 and bf16 arms")
    ap.add_argument("--timeout", type=float, default=400)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    ap.add_argument("--arm", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(run_case(args)), flush=True)
        return 0

    import torch

    sys.path.insert(0, str(HERE))
    from llama8b import card_name, ensure_checkpoints, llama8b_config, versions

    if args.quick:
        args.arms, args.shapes, args.steps, args.warmup = "nvfp4,bf16", "64x2,32x4", 2, 1
        args.ckpt_root = (
            args.ckpt_root.rstrip("/") + "-tiny" if args.ckpt_root.endswith("l32") else args.ckpt_root
        )
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    cfg = llama8b_config(args.layers, tiny=args.quick)
    t0 = time.perf_counter()
    ensure_checkpoints(Path(args.ckpt_root), ("nvfp4", "bf16"), cfg, device)
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f} s under {args.ckpt_root}", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()

    results: dict[tuple[str, int, int], dict] = {}
    notes: list[str] = []
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    for seq, batch in shapes:
        for arm in [a for a in args.arms.split(",") if a]:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--seq", str(seq), "--batch", str(batch),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--ckpt-root", args.ckpt_root]  # fmt: skip
            if args.quick:
                cmd.append("--quick")
            t = time.perf_counter()
            try:
                p = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=args.timeout, env=dict(os.environ)
                )
            except subprocess.TimeoutExpired:
                notes.append(f"{arm} {seq}x{batch}: timed out after {args.timeout:.0f} s")
                continue
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if p.returncode or line is None:
                err = (p.stderr.strip().splitlines() or ["?"])[-1]
                notes.append(f"{arm} {seq}x{batch}: failed (exit {p.returncode}): {err[:300]}")
                print(f"{arm} {seq}x{batch}: FAILED\n{p.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(line[len("RESULT ") :])
            results[(arm, seq, batch)] = r
            print(f"{arm} {seq}x{batch}: {time.perf_counter() - t:.0f} s {json.dumps(r)}", flush=True)

    cmdline = "PYTHONPATH=src python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/bench_lora.py", *sys.argv[1:]]
    )
    model = (
        "tiny 2-layer smoke-test model on the CPU"
        if args.quick
        else f"random-weight Llama-3-8B shape ({args.layers} layers)"
    )
    lines = [f"# LoRA fine-tuning step: {model}", "", f"Card: **{card_name() if device == 'cuda' else 'CPU'}**; {versions()}.", "",
             f"Command: `{cmdline}`", "",
             "LoRA r=16 on all seven linear kinds, gradient checkpointing, AdamW on the adapters; median of "
             f"{args.steps} steps after {args.warmup} warm-up. GiB = 2^30 bytes.", "",
             "| seq x batch | base | step ms (min-max) | peak GiB | resident GiB | step vs NF4 | peak vs NF4 | loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for seq, batch in shapes:
        nf4 = results.get(("nf4", seq, batch), {})
        for arm in ARMS:
            r = results.get((arm, seq, batch))
            if r is None:
                continue
            t_ratio = f"{r['step_ms'] / nf4['step_ms']:.2f}x" if nf4 else "-"
            m_ratio = f"{r['peak'] / nf4['peak']:.2f}x" if nf4 and "peak" in r else "-"
            lines.append(
                f"| {seq} x {batch} | {arm} | {r['step_ms']:.1f} ({r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}) |"
                f" {fmt(r.get('peak'), GIB)} | {fmt(r.get('resident'), GIB)} | {t_ratio} | {m_ratio} | {r['loss']:.3f} |"
            )
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
