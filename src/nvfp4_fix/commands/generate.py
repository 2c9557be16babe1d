"""Generate text from an NVFP4 checkpoint loaded packed, streaming it as it comes (the tokenizer's chat
template is used when it has one), then print decode tok/s, time to first token and peak memory.

--fast hands generation to ``nvfp4_fix.generation.generate(model, input_ids, max_new_tokens,
temperature=, top_k=, top_p=, streamer=, pad_token_id=)`` (static KV cache, decode step captured in a
CUDA graph; it falls back to ``model.generate`` where it cannot capture, e.g. on the CPU). --fast
--compile also passes ``compile_step=True`` (torch.compile of the captured step). --batch B generates
for B copies of the prompt in one batch (sampled rows differ) and prints each row afterwards."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import time
from typing import Any

from ..errors import NVFP4Error

HELP = "stream generated text, then tok/s, time to first token, peak memory"
FAST_MODULE = "nvfp4_fix.generation"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint folder or hub id (org/model), with a tokenizer")
    p.add_argument("prompt")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="auto", help="bf16, fp16, fp32 or auto (config's dtype)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy; default: generation_config")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    p.add_argument(
        "--fast", action="store_true", help=f"use {FAST_MODULE}.generate (static cache, CUDA graphs)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="with --fast: torch.compile the decode step inside the graph (faster decode, ~1 min setup)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=1,
        help="generate for this many copies of the prompt at once (printed after, not streamed)",
    )
    p.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="quantize the dense lm_head to NVFP4 at load (faster decode; lossy: logits move a little)",
    )


def sampling(args: argparse.Namespace) -> dict[str, Any]:
    """generate() keyword arguments from the flags; nothing given = the checkpoint's generation_config."""
    if args.temperature is None and args.top_k is None and args.top_p is None:
        return {}
    if args.temperature == 0:
        return {"do_sample": False}
    out: dict[str, Any] = {"do_sample": True}
    for k in ("temperature", "top_k", "top_p"):
        if getattr(args, k) is not None:
            out[k] = getattr(args, k)
    return out


def fast_sampling(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """temperature/top_k/top_p for nvfp4_fix.generation.generate (temperature 0 = greedy)."""
    s = sampling(args)
    if not s:  # the checkpoint's generation_config decides, as model.generate would
        gc = getattr(model, "generation_config", None)
        if gc is None or not getattr(gc, "do_sample", False):
            return {"temperature": 0}
        s = {"temperature": gc.temperature or 1.0, "top_k": gc.top_k, "top_p": gc.top_p}
    if not s.pop("do_sample", False):
        return {"temperature": 0}
    return {"temperature": s.get("temperature", 1.0), "top_k": s.get("top_k"), "top_p": s.get("top_p")}


def encode(tok: Any, prompt: str, chat: bool) -> dict[str, Any]:
    if chat and getattr(tok, "chat_template", None):
        enc = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
    else:
        enc = tok(prompt, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc.get("attention_mask")}


def make_streamer(tok: Any) -> Any:
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        """TextStreamer that notes when the first new token arrives and counts new tokens."""

        def __init__(self) -> None:
            super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
            self.prompt_seen = False
            self.first: float | None = None
            self.last: float | None = None
            self.count = 0

        def put(self, value: Any) -> None:
            if self.prompt_seen:
                now = time.perf_counter()
                self.first = self.first or now
                self.last = now
                self.count += int(value.numel())
            self.prompt_seen = True
            super().put(value)

    return TimedStreamer()


def run(args: argparse.Namespace) -> int:
    import torch

    from ..tools import runtime
    from ..tools.analysis import human

    if args.max_new_tokens < 1:
        raise NVFP4Error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch < 1:
        raise NVFP4Error(f"--batch must be at least 1, got {args.batch}")
    if getattr(args, "compile", False) and not args.fast:
        raise NVFP4Error("--compile needs --fast (it compiles the fast path's decode step)")
    fast = None
    if args.fast:
        if importlib.util.find_spec(FAST_MODULE) is None:
            raise NVFP4Error(f"--fast needs {FAST_MODULE}, which this nvfp4-fix version does not have")
        fast = importlib.import_module(FAST_MODULE).generate
    model, info, load_s = runtime.load(args.path, args.device, args.dtype, args.quantize_lm_head)
    tok = runtime.tokenizer(info.path)
    if tok is None:
        raise NVFP4Error(
            f"{info.path}: no tokenizer (tokenizer.json / tokenizer_config.json) to encode the prompt"
        )
    inputs = {
        k: v.to(args.device)
        for k, v in encode(tok, args.prompt, not args.no_chat_template).items()
        if v is not None
    }
    if args.batch > 1:
        inputs = {k: v.expand(args.batch, -1).contiguous() for k, v in inputs.items()}
    streamer = make_streamer(tok) if args.batch == 1 else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    runtime.reset_peak(args.device)
    start = time.perf_counter()
    with torch.no_grad():
        if fast is None:
            out = model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                streamer=streamer,
                pad_token_id=pad,
                **sampling(args),
            )
        else:
            out = fast(
                model,
                inputs["input_ids"],
                args.max_new_tokens,
                attention_mask=inputs.get("attention_mask"),
                streamer=streamer,
                pad_token_id=pad,
                compile_step=bool(getattr(args, "compile", False)),
                **fast_sampling(args, model),
            )
    runtime.sync(args.device)
    end = time.perf_counter()
    peak, what = runtime.peak_memory(args.device)
    if streamer is None:
        plen = inputs["input_ids"].shape[1]
        return _report_batch(tok, out, plen, pad, end - start, load_s, peak, what, args)
    n = streamer.count
    ttft = (streamer.first - start) if streamer.first else float("nan")
    decode = (
        (n - 1) / (streamer.last - streamer.first)
        if n > 1 and streamer.last and streamer.last > streamer.first
        else 0.0
    )
    print()
    print(
        f"--- {n} tokens in {end - start:.2f} s (load {load_s:.1f} s): {decode:.1f} tok/s decode, "
        f"time to first token {ttft:.3f} s, {what} {human(peak)} ({args.device})"
    )
    return 0


def _report_batch(tok: Any, out: Any, plen: int, pad: int, seconds: float, load_s: float, peak: int,
                  what: str, args: argparse.Namespace) -> int:  # fmt: skip
    """Each row's text, then the whole batch's new tokens per second (prefill included)."""
    from ..tools.analysis import human

    new = out[:, plen:].cpu()
    tokens = 0
    for row, ids in enumerate(new.tolist()):
        while ids and ids[-1] == pad:  # rows that stopped early are padded
            ids.pop()
        tokens += len(ids)
        print(f"[{row}] {tok.decode(ids, skip_special_tokens=True)}")
    print()
    print(
        f"--- batch {new.shape[0]}: {tokens} tokens in {seconds:.2f} s (load {load_s:.1f} s): "
        f"{tokens / max(seconds, 1e-9):.1f} tok/s for the batch, prefill included, {what} {human(peak)} "
        f"({args.device})"
    )
    return 0
