#!/usr/bin/env python
"""Measure the NVFP4 demo checkpoints against their bf16 source on held-out text.

    .venvs/current/bin/python scripts/eval_demo_model.py            # all of tests/fixtures/demo/*

The NVFP4 weights are decoded by a small numpy dequantizer written from the format description only
(no torch, no compressed-tensors, no ModelOpt code): the safetensors file is parsed by hand, e4m3
scales are decoded by a 256-entry table, E2M1 codes are {0, .5, 1, 1.5, 2, 3, 4, 6} with bit 3 the
sign, the low nibble of each byte is the even column, one e4m3 scale covers 16 inputs, and the
per-tensor scale is a DIVISOR in compressed-tensors (``weight_global_scale``) and a MULTIPLIER in
ModelOpt (``weight_scale_2``).  The float32 weights are then loaded into a plain float32
``LlamaForCausalLM`` built from the bf16 config.

Metrics on heldout.txt (tokenized with <s> prepended, cut into 256-token windows; every position but
the first of a window is predicted): perplexity, top-1 next-token accuracy, and top-1 agreement of
argmax(logits) with the bf16 model (bf16 weights, float32 compute).  W4A4 checkpoints are measured
twice: weights only, and with an emulation of the NVFP4 activation quantization (16-element groups,
e4m3 group scale from the checkpoint's input global scale).  Compressed-tensors checkpoints are also
loaded through transformers + compressed-tensors when that is installed, as a cross-check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
FP4_LUT = np.concatenate([E2M1, -E2M1]).astype(np.float32)  # index = 4-bit code, bit 3 = sign
GROUP = 16


def _e4m3fn_table() -> np.ndarray:
    out = np.empty(256, dtype=np.float32)
    for b in range(256):
        s, e, m = b >> 7, (b >> 3) & 0xF, b & 0x7
        if e == 0xF and m == 0x7:
            v = float("nan")
        elif e == 0:
            v = (m / 8.0) * 2.0**-6
        else:
            v = (1.0 + m / 8.0) * 2.0 ** (e - 7)
        out[b] = -v if s else v
    return out


E4M3_LUT = _e4m3fn_table()


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor as float32 (float types) or its raw integer type (U8 etc.); fp8 decoded by table."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[base + a : base + b]
        dt, shape = info["dtype"], tuple(info["shape"])
        if dt == "BF16":
            arr = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dt == "F8_E4M3":
            arr = E4M3_LUT[np.frombuffer(buf, dtype=np.uint8)]
        else:
            np_dt = {"F32": "<f4", "F16": "<f2", "U8": "u1", "I8": "i1", "I32": "<i4", "I64": "<i8"}[dt]
            arr = np.frombuffer(buf, dtype=np_dt)
            if dt == "F16":
                arr = arr.astype(np.float32)
        out[name] = np.array(arr).reshape(shape)
    return out


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] -> float32 [N, K]; the low nibble is column 2j, the high nibble column 2j+1."""
    lo, hi = FP4_LUT[packed & 0x0F], FP4_LUT[packed >> 4]
    return np.stack([lo, hi], axis=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def dequant(packed: np.ndarray, block_scale: np.ndarray, global_mult: float) -> np.ndarray:
    vals = unpack_fp4(packed)
    scale = np.repeat(block_scale.astype(np.float32), GROUP, axis=1)
    assert scale.shape == vals.shape, (scale.shape, vals.shape)
    return vals * scale * np.float32(global_mult)


def load_checkpoint(d: Path) -> tuple[dict[str, np.ndarray], dict[str, float], str]:
    """float32 weights keyed by the dense names, input-activation global multipliers, format name."""
    t = {}
    for f in sorted(d.glob("*.safetensors")):
        t.update(read_safetensors(f))
    weights, act = {}, {}
    if any(k.endswith(".weight_packed") for k in t):
        fmt = "compressed-tensors"
        for k, v in t.items():
            if k.endswith(".weight_packed"):
                p = k[: -len(".weight_packed")]
                gs = float(t[p + ".weight_global_scale"].reshape(-1)[0])
                weights[p + ".weight"] = dequant(v, t[p + ".weight_scale"], 1.0 / gs)  # a DIVISOR
                if p + ".input_global_scale" in t:
                    act[p] = 1.0 / float(t[p + ".input_global_scale"].reshape(-1)[0])
            elif k.rsplit(".", 1)[-1] in ("weight_scale", "weight_global_scale", "input_global_scale"):
                continue
            else:
                weights[k] = v.astype(np.float32)
    elif (d / "hf_quant_config.json").exists():
        fmt = "modelopt"
        for k, v in t.items():
            if k.endswith(".weight") and v.dtype == np.uint8:
                p = k[: -len(".weight")]
                ws2 = float(t[p + ".weight_scale_2"].reshape(-1)[0])
                weights[k] = dequant(v, t[p + ".weight_scale"], ws2)  # a MULTIPLIER
                if p + ".input_scale" in t:
                    act[p] = float(t[p + ".input_scale"].reshape(-1)[0])
            elif k.rsplit(".", 1)[-1] in ("weight_scale", "weight_scale_2", "input_scale"):
                continue
            else:
                weights[k] = v.astype(np.float32)
    else:
        fmt = "dense"
        weights = {k: v.astype(np.float32) for k, v in t.items()}
    return weights, act, fmt


def fp4_fake_quant_act(x, global_mult: float):
    """NVFP4 activation quantize-dequantize: groups of 16 along the last dim, e4m3 group scale."""
    import torch

    shape = x.shape
    g = x.float().reshape(-1, GROUP)
    amax = g.abs().amax(-1, keepdim=True)
    scale = (amax / 6.0 / global_mult).clamp(max=448.0).to(torch.float8_e4m3fn).float() * global_mult
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = (g / scale).clamp(-6.0, 6.0)
    grid = torch.from_numpy(E2M1)
    q = grid[(y.abs().unsqueeze(-1) - grid).abs().argmin(-1)] * y.sign()
    return (q * scale).reshape(shape).to(x.dtype)


def build_model(config_dir: Path, weights: dict[str, np.ndarray]):
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(str(config_dir))
    cfg.dtype = torch.float32
    model = LlamaForCausalLM(cfg).float().eval()
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model


def add_act_quant(model, act: dict[str, float]) -> list:
    hooks = []
    for name, mod in model.named_modules():
        if name in act:
            gm = act[name]
            hooks.append(mod.register_forward_pre_hook(lambda m, a, gm=gm: (fp4_fake_quant_act(a[0], gm),)))
    return hooks


def windows(tok, text: str, ctx: int):
    import torch

    ids = tok(text)["input_ids"]
    return [torch.tensor([ids[i : i + ctx]]) for i in range(0, len(ids), ctx) if len(ids[i : i + ctx]) > 1]


def logits_on(model, wins):
    import torch

    with torch.no_grad():
        return [model(input_ids=w).logits[0, :-1].float() for w in wins]


def metrics(logits, wins, ref=None) -> dict:
    import torch

    nll, correct, agree, n = 0.0, 0, 0, 0
    for i, (lg, w) in enumerate(zip(logits, wins, strict=True)):
        tgt = w[0, 1:]
        nll += torch.nn.functional.cross_entropy(lg, tgt, reduction="sum").item()
        pred = lg.argmax(-1)
        correct += (pred == tgt).sum().item()
        if ref is not None:
            agree += (pred == ref[i].argmax(-1)).sum().item()
        n += tgt.numel()
    out = {"ppl": math.exp(nll / n), "nll": nll / n, "top1_acc": correct / n, "tokens": n}
    if ref is not None:
        out["top1_agree_bf16"] = agree / n
    return out


def greedy(model, tok, prompt: str, n: int) -> str:
    import torch

    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        g = model.generate(**enc, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)  # fmt: skip
    return tok.decode(g[0], skip_special_tokens=True)


def crosscheck_transformers(d: Path, wins, mine) -> dict | None:
    """Load a compressed-tensors dir with transformers + compressed-tensors; compare logits with ours
    (for W4A4, with our activation-quantization emulation: transformers quantizes activations too)."""
    try:
        import compressed_tensors  # noqa: F401
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    import transformers

    # bfloat16: compressed-tensors decompresses into the checkpoint's dtype, and a float32 load then
    # fails in F.linear (float input, bf16 weight) in compressed-tensors 0.20
    try:
        m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
        theirs = logits_on(m, wins)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}
    diff = max((a - b).abs().max().item() for a, b in zip(theirs, mine, strict=True))
    agree = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(theirs, mine, strict=True))
    n = sum(a.shape[0] for a in mine)
    return {
        "loader": f"transformers {transformers.__version__} + compressed-tensors "
        f"{compressed_tensors.__version__}, dtype bfloat16 (default load)",
        "max_abs_logit_diff_vs_numpy_fp32": diff,
        "top1_agree_with_numpy_dequant": agree / n,
        "ppl": metrics(theirs, wins)["ppl"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="tests/fixtures/demo")
    ap.add_argument("--dirs", default="", help="comma-separated subdirs (default: all with safetensors)")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--prompts", default="Return the|Create a new|This module provides")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--json", default=None, help="write results here (default: <root>/eval.json)")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    root = Path(args.root)
    bf16_dir = root / "bf16"
    tok = AutoTokenizer.from_pretrained(str(bf16_dir))
    text = (root / "heldout.txt").read_text(encoding="utf-8")
    wins = windows(tok, text, args.ctx)
    prompts = args.prompts.split("|")
    names = [s for s in args.dirs.split(",") if s] or sorted(
        p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.safetensors")) and p.name != "bf16"
    )

    w, _, _ = load_checkpoint(bf16_dir)
    ref_model = build_model(bf16_dir, w)
    ref = logits_on(ref_model, wins)
    results = {
        "heldout": {"chars": len(text), "tokens": sum(x.shape[1] for x in wins), "windows": len(wins)},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },  # fmt: skip
        "models": {},
    }
    native = transformers.AutoModelForCausalLM.from_pretrained(str(bf16_dir), dtype=torch.bfloat16).eval()
    results["models"]["bf16"] = {
        "weights_only": metrics(ref, wins, ref),
        "bf16_compute": metrics(logits_on(native, wins), wins, ref),
        "size_bytes": sum(f.stat().st_size for f in bf16_dir.glob("*.safetensors")),
        "greedy": {p: greedy(ref_model, tok, p, args.gen_tokens) for p in prompts},
    }
    for name in names:
        d = root / name
        weights, act, fmt = load_checkpoint(d)
        model = build_model(bf16_dir, weights)
        mine = logits_on(model, wins)
        r = {
            "format": fmt,
            "size_bytes": sum(f.stat().st_size for f in d.glob("*.safetensors")),
            "weights_only": metrics(mine, wins, ref),
            "greedy": {p: greedy(model, tok, p, args.gen_tokens) for p in prompts},
        }
        # weight error relative to bf16, over the quantized Linear weights
        num = den = 0.0
        for k, v in weights.items():
            if k in w and k.endswith("proj.weight"):
                num += float(((v - w[k]) ** 2).sum())
                den += float((w[k] ** 2).sum())
        r["weight_rel_rmse"] = math.sqrt(num / den)
        if act:
            hooks = add_act_quant(model, act)
            mine = logits_on(model, wins)
            r["w4a4"] = metrics(mine, wins, ref)
            r["w4a4_greedy"] = {p: greedy(model, tok, p, args.gen_tokens) for p in prompts}
            for h in hooks:
                h.remove()
        if fmt == "compressed-tensors":
            cc = crosscheck_transformers(d, wins, mine)
            if cc is not None:
                r["transformers_load"] = cc
        results["models"][name] = r
        print(f"done {name}", flush=True)

    out = Path(args.json) if args.json else root / "eval.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print("\n| model | size | ppl | top-1 acc | top-1 agree w/ bf16 |\n|---|---|---|---|---|")
    for name, r in results["models"].items():
        for key in ("weights_only", "bf16_compute", "w4a4"):
            if key in r:
                m = r[key]
                print(f"| {name} ({key}) | {r['size_bytes'] / 1e6:.2f} MB | {m['ppl']:.2f} | "
                      f"{m['top1_acc']:.3f} | {m['top1_agree_bf16']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
