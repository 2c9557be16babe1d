"""The README demo: load a shipped NVFP4 checkpoint with plain transformers after apply_patch()."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nvfp4_fix import NVFP4Linear, apply_patch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "tests" / "fixtures" / "demo" / "ct-nvfp4a16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("path", nargs="?", default=str(DEFAULT))
    ap.add_argument("--prompt", default="Return the")
    ap.add_argument("--second-prompt", default="Open a file and")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args()

    status = apply_patch()
    print(
        f"apply_patch(): routing {status['routing']}, compressed-tensors fixes: "
        + ", ".join(f"{f['name']}={'applied' if f['applied'] else 'not needed'}" for f in status["fixes"])
    )
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.path)
    tok = AutoTokenizer.from_pretrained(args.path)
    load_s = time.perf_counter() - t

    packed = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dense = sum(m.in_features * m.out_features * 2 for m in packed)
    packed_bytes = sum(m.weight_packed.numel() + m.weight_scale.numel() for m in packed)
    q_dtype = model.model.layers[0].self_attn.q_proj.weight_packed.dtype
    print(
        f"loaded {args.path} in {load_s:.2f} s: {type(model).__name__}, "
        f"{len(packed)} NVFP4 layers kept packed (q_proj.weight_packed is {q_dtype})"
    )
    print(
        f"quantized layers: {packed_bytes / 1e6:.2f} MB packed vs {dense / 1e6:.2f} MB in bf16; "
        f"whole model {nbytes / 1e6:.2f} MB"
    )

    for n, prompt in enumerate((args.prompt, args.second_prompt)):
        ids = tok(prompt, return_tensors="pt")
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        gen_s = time.perf_counter() - t
        new = out.shape[1] - ids["input_ids"].shape[1]
        note = " (the first call: layers this small run eagerly, nothing to compile)" if n == 0 else ""
        print(f"greedy, {new} new tokens in {gen_s:.2f} s, {new / gen_s:.1f} tok/s on CPU{note}:")
        print("  " + tok.decode(out[0], skip_special_tokens=True).replace("\n", "\n  "))


if __name__ == "__main__":
    main()
