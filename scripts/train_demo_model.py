#!/usr/bin/env python
"""Train the small demo Llama model on the docstrings of Python's standard library (CPU, minutes).

The text ships with every Python install, so the model can be rebuilt anywhere without a model hub:

    python scripts/train_demo_model.py --out tests/fixtures/demo/bf16

What it does, deterministically (fixed seed, sorted file walk, hash-based split):
  1. collects the docstrings (module, class, function) of the stdlib .py files of the running
     interpreter with ``ast`` (tests, idlelib, lib2to3, turtledemo and site-packages skipped), dedupes them;
  2. holds out ~5% of the documents (sha1 of the text mod 20 == 0) for evaluation and writes ~8 KB of
     them, separated by blank lines, to ``heldout.txt`` next to the checkpoint directory (``--heldout``);
  3. trains a byte-level BPE tokenizer (``tokenizers``) on the training documents;
  4. trains a ``LlamaForCausalLM`` (hidden 256, 4 layers, 4 heads of 64, 2 kv heads, intermediate 688,
     untied lm_head, context 256) with AdamW + cosine schedule (bf16 autocast, fp32 master weights) on
     random 256-token windows of the stream ``<s> doc </s> <s> doc </s> ...``, printing the loss curve
     and the held-out loss; keeps the weights of the best held-out evaluation;
  5. saves the model in bfloat16 with its tokenizer and a generation_config carrying the eos id.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import sysconfig
import time
from pathlib import Path

SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "turtledemo",
    "ensurepip",
    "pydoc_data",
    "site-packages",
    "dist-packages",
    "__pycache__",
}

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def collect_docstrings(root: str) -> list[str]:
    """Module/class/function docstrings of every .py file under ``root``; cleaned, deduped, in walk order."""
    docs: list[str] = []
    seen: set[str] = set()
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS and not x.startswith("config-"))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(d, f).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    s = ast.get_docstring(node, clean=True)
                    if s and len(s) >= 20 and s.isascii() and s not in seen:
                        seen.add(s)
                        docs.append(s)
    return docs


def is_heldout(doc: str) -> bool:
    return int(hashlib.sha1(doc.encode()).hexdigest()[:8], 16) % 20 == 0


def heldout_selection(eval_docs: list[str], max_bytes: int) -> list[str]:
    """The held-out docs of heldout.txt: in sha1 order (a spread over the stdlib), <= 1500 chars each."""
    chosen, size = [], 0
    for d in sorted(eval_docs, key=lambda d: hashlib.sha1(d.encode()).hexdigest()):
        if size >= max_bytes:
            break
        if len(d) <= 1500:
            chosen.append(d)
            size += len(d) + 2
    return chosen


def write_heldout(eval_docs: list[str], path: Path, max_bytes: int) -> None:
    chosen = heldout_selection(eval_docs, max_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(chosen) + "\n", encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(chosen)} docstrings)")


def build_tokenizer(train_docs: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_docs, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Llama-style: the tokenizer prepends <s> when add_special_tokens=True
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_portable_tokenizer(tok, out_dir)
    return fast


def save_portable_tokenizer(tok, out_dir: Path) -> None:
    """tokenizer.json + a hand-written tokenizer_config.json naming PreTrainedTokenizerFast.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, which transformers 4.x cannot load;
    this form loads offline with ``AutoTokenizer.from_pretrained(dir)`` in 4.57 and 5.x alike.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in (BOS, EOS, PAD)
    }
    cfg = {
        "added_tokens_decoder": added,
        **specials,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],  # 4.x would add token_type_ids
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the bf16 checkpoint + tokenizer")
    ap.add_argument("--heldout", default=None, help="held-out text file (default: <out>/../heldout.txt)")
    ap.add_argument("--heldout-bytes", type=int, default=8192, help="approximate size of heldout.txt")
    ap.add_argument("--heldout-only", action="store_true", help="write heldout.txt and stop")
    ap.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=600, help="length of the LR schedule")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after N steps (default: --steps)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 is deterministic and far faster than 2 on a machine other jobs share",
    )
    ap.add_argument("--no-amp", action="store_true", help="float32 training (default: bf16 autocast)")
    ap.add_argument("--max-minutes", type=float, default=25.0, help="safety stop (then not repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import numpy as np
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    out = Path(args.out)
    heldout_path = Path(args.heldout) if args.heldout else out.parent / "heldout.txt"

    # ---- data ---------------------------------------------------------------------------------------
    docs = collect_docstrings(args.stdlib)
    train_docs = [d for d in docs if not is_heldout(d)]
    eval_docs = [d for d in docs if is_heldout(d)]
    print(
        f"stdlib {args.stdlib}: {len(docs)} docstrings ({sum(map(len, docs))} chars); "
        f"train {len(train_docs)}, held out {len(eval_docs)} ({sum(map(len, eval_docs))} chars)"
    )

    write_heldout(eval_docs, heldout_path, args.heldout_bytes)
    if args.heldout_only:
        return

    tok = build_tokenizer(train_docs, args.vocab_size, out)
    bos_id, eos_id, pad_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id

    def encode_stream(ds: list[str]) -> np.ndarray:
        ids: list[int] = []
        for enc in tok.backend_tokenizer.encode_batch(ds, add_special_tokens=False):
            ids.append(bos_id)
            ids.extend(enc.ids)
            ids.append(eos_id)
        return np.asarray(ids, dtype=np.int64)

    train_ids = encode_stream(train_docs)
    eval_ids = encode_stream(eval_docs)
    print(
        f"tokenizer: vocab {len(tok)}; train tokens {len(train_ids)}, eval tokens {len(eval_ids)} "
        f"({sum(map(len, train_docs)) / len(train_ids):.2f} chars/token)"
    )
    T = args.ctx
    n_eval = len(eval_ids) // T
    eval_x = torch.from_numpy(eval_ids[: n_eval * T].reshape(n_eval, T))

    # ---- model --------------------------------------------------------------------------------------
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=T,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=0.02,
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    @torch.no_grad()
    def eval_loss() -> float:
        model.eval()
        tot, n = 0.0, 0
        for i in range(0, n_eval, 32):
            xb = eval_x[i : i + 32]
            with amp_ctx():
                out_ = model(input_ids=xb, labels=xb)
            tot += out_.loss.item() * xb.shape[0]
            n += xb.shape[0]
        model.train()
        return tot / n

    def amp_ctx():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_amp)

    gen = torch.Generator().manual_seed(args.seed)
    best = (float("inf"), 0, None)
    max_start = len(train_ids) - T - 1
    t0 = time.time()
    model.train()
    smooth = None
    for step in range(args.steps):
        starts = torch.randint(0, max_start, (args.batch,), generator=gen)
        xb = torch.stack([torch.from_numpy(train_ids[s : s + T]) for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with amp_ctx():
            loss = model(input_ids=xb, labels=xb).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        elapsed = time.time() - t0
        if step % 20 == 0 or step == args.steps - 1:
            tps = (step + 1) * args.batch * T / elapsed
            print(
                f"step {step:5d}  loss {loss.item():.4f}  (ema {smooth:.4f})  lr {lr_at(step):.2e}  "
                f"{elapsed:6.0f}s  {tps:.0f} tok/s",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step + 1 in (args.steps, args.stop_after):
            el = eval_loss()
            print(f"  eval  step {step + 1:5d}  held-out loss {el:.4f}  ppl {math.exp(el):.2f}", flush=True)
            if el < best[0]:
                best = (el, step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if args.stop_after is not None and step + 1 >= args.stop_after:
            print(f"stopping after step {step + 1} (--stop-after)")
            break
        if elapsed > args.max_minutes * 60:
            print(f"stopping early at step {step + 1}: --max-minutes {args.max_minutes} reached")
            break

    # ---- save ---------------------------------------------------------------------------------------
    if best[2] is not None:
        print(f"keeping the weights of step {best[1]} (best held-out loss {best[0]:.4f})")
        model.load_state_dict(best[2])
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False, max_new_tokens=64
    )
    model.save_pretrained(out, safe_serialization=True)
    save_portable_tokenizer(tok.backend_tokenizer, out)
    (out / "training_args.json").write_text(json.dumps(vars(args), indent=2) + "\n")

    model.eval()
    args.no_amp = True  # the saved bf16 model, evaluated as is
    el = eval_loss()
    print(f"final bf16 held-out loss {el:.4f}  ppl {math.exp(el):.2f}")
    for prompt in ["Return the", "Create a new", "This module provides"]:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=40, do_sample=False)
        print(f"--- {prompt!r}\n{tok.decode(g[0], skip_special_tokens=True)}")


if __name__ == "__main__":
    main()
