"""LoRA fine-tuning on the shipped NVFP4 demo model, on the CPU: held-out perplexity before and after.

The demo model (tests/fixtures/demo/ct-nvfp4a16) was trained on the docstrings of Python's standard
library. Here LoRA adapters (all seven linear kinds, the packed NVFP4 base frozen) are trained on the
docstrings of an installed third-party package it never saw (peft by default: the same version in
both test environments), and the perplexity on a held-out split of those docstrings is measured before
and after. The split is deterministic: sha1(docstring) mod 5 == 0 is held out.

    python scripts/train_lora_demo.py                 # 200 steps: 138.69 -> 34.17
    python scripts/train_lora_demo.py --steps 16 --batch 6 --lr 5e-3 --eval-windows 24   # the test
    python scripts/train_lora_demo.py --steps 30 --batch 6 --lr 5e-3 --eval-windows 24 --merge
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import math
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "tests" / "fixtures" / "demo" / "ct-nvfp4a16"
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def docstrings(package: str) -> list[str]:
    """Module, class and function docstrings of an installed package, sorted by file, deduplicated."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    seen: set[str] = set()
    out = []
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and len(doc) >= 20 and doc.isascii() and doc not in seen:
                    seen.add(doc)
                    out.append(doc)
    return out


def split(docs: list[str]) -> tuple[list[str], list[str]]:
    held = [d for d in docs if int(hashlib.sha1(d.encode()).hexdigest(), 16) % 5 == 0]
    return [d for d in docs if d not in set(held)], held


def token_stream(tok, docs: list[str]) -> torch.Tensor:  # noqa: ANN001
    ids: list[int] = []
    for d in docs:
        ids += tok(d)["input_ids"] + [tok.eos_token_id]  # the tokenizer prepends <s>
    return torch.tensor(ids)


def windows(stream: torch.Tensor, seq: int) -> torch.Tensor:
    n = (len(stream) - 1) // seq
    return stream[: n * seq + 1].unfold(0, seq + 1, seq)[:n]


@torch.no_grad()
def perplexity(model, stream: torch.Tensor, seq: int, max_windows: int) -> float:  # noqa: ANN001
    model.eval()
    w = windows(stream, seq)[:max_windows]
    nll = count = 0.0
    for chunk in w.split(16):
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"
        )
        nll, count = nll + loss.item(), count + chunk[:, 1:].numel()
    return math.exp(nll / count)


def run(
    steps: int = 200,
    package: str = "peft",
    seq: int = 128,
    batch: int = 8,
    lr: float = 3e-3,
    rank: int = 8,
    eval_windows: int = 64,
    seed: int = 0,
    log: bool = True,
    merge: bool = False,
) -> dict[str, float]:
    import peft
    from transformers import AutoTokenizer

    import nvfp4_fix

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(DEMO)
    train_docs, held_docs = split(docstrings(package))
    train, held = token_stream(tok, train_docs), token_stream(tok, held_docs)
    model = nvfp4_fix.from_pretrained(DEMO, dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=KINDS)
    model = peft.get_peft_model(model, config)
    before = perplexity(model, held, seq, eval_windows)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    data = windows(train, seq)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        b = data[torch.randint(0, len(data), (batch,), generator=gen)]
        loss = model(input_ids=b[:, :-1], labels=b[:, :-1]).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log and (step % 25 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - t0:6.1f} s", flush=True)
    seconds = time.perf_counter() - t0
    after = perplexity(model, held, seq, eval_windows)
    merged = None
    if merge:  # re-quantize W + BA to NVFP4 (lossy) and score the merged packed model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.merge_adapter()
        merged = perplexity(model, held, seq, eval_windows)
        model.unmerge_adapter()
    return {
        "ppl_merged": merged,
        "train_docs": len(train_docs),
        "held_docs": len(held_docs),
        "train_tokens": len(train),
        "held_tokens_scored": min(eval_windows, len(windows(held, seq))) * seq,
        "steps": steps,
        "seconds": seconds,
        "ppl_before": before,
        "ppl_after": after,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--package", default="peft", help="installed package whose docstrings are the new data")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument(
        "--merge", action="store_true", help="also score the adapter merged (re-quantized to NVFP4)"
    )
    args = ap.parse_args()
    r = run(
        args.steps,
        args.package,
        args.seq,
        args.batch,
        args.lr,
        args.rank,
        args.eval_windows,
        merge=args.merge,
    )
    print(f"{args.package} docstrings: {r['train_docs']} train ({r['train_tokens']} tokens), ", end="")
    print(f"{r['held_docs']} held out ({r['held_tokens_scored']} tokens scored)")
    shape = f"{args.batch}x{args.seq}"
    steps = f"{r['steps']} steps of {shape} tokens in {r['seconds']:.1f} s"
    print(f"LoRA r={args.rank} on the packed NVFP4 base: {steps}")
    ratio = r["ppl_after"] / r["ppl_before"]
    print(f"held-out perplexity {r['ppl_before']:.2f} -> {r['ppl_after']:.2f} ({ratio:.3f}x)")
    if r["ppl_merged"] is not None:
        print(f"merged into the packed base (re-quantized to NVFP4): {r['ppl_merged']:.2f}")


if __name__ == "__main__":
    main()
