#!/usr/bin/env python
"""Quantize the demo model (scripts/train_demo_model.py) to NVFP4 with the real producers, on CPU.

Run inside a producer env (see scripts/make_fixture_envs.sh):

    fixture-envs/current/bin/python  scripts/quantize_demo_model.py --producer llmcompressor --scheme NVFP4A16
    fixture-envs/current/bin/python  scripts/quantize_demo_model.py --producer llmcompressor --scheme NVFP4
    fixture-envs/modelopt/bin/python scripts/quantize_demo_model.py --producer modelopt --scheme W4A16_NVFP4
    fixture-envs/modelopt/bin/python scripts/quantize_demo_model.py --producer modelopt --scheme NVFP4

Defaults: --model tests/fixtures/demo/bf16, --out tests/fixtures/demo/<ct-nvfp4a16|ct-nvfp4|modelopt-...>.
lm_head is left in bf16 (llmcompressor ``ignore=["lm_head"]``; ModelOpt excludes it by default).

Calibration text: held-out stdlib docstrings (the same deterministic split as the training script) that
are NOT in tests/fixtures/demo/heldout.txt, so the evaluation text stays unseen by every step.
Calibration matters only for activation scales (schemes NVFP4 / NVFP4_DEFAULT_CFG); the weight bytes
are a pure function of the bf16 weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_demo_model import collect_docstrings, is_heldout  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODELOPT_CFGS = {"W4A16_NVFP4": "W4A16_NVFP4_CFG", "NVFP4": "NVFP4_DEFAULT_CFG"}
DEFAULT_OUT = {
    ("llmcompressor", "NVFP4A16"): "ct-nvfp4a16",
    ("llmcompressor", "NVFP4"): "ct-nvfp4",
    ("modelopt", "W4A16_NVFP4"): "modelopt-w4a16_nvfp4",
    ("modelopt", "NVFP4"): "modelopt-nvfp4",
}


def calibration_ids(tok, heldout_txt: Path, n: int, seq_len: int, stdlib: str | None):
    """n rows of seq_len tokens: the stream <s> doc </s> ... of the held-out docs not in heldout.txt."""
    import sysconfig

    import torch

    eval_text = heldout_txt.read_text(encoding="utf-8")
    docs = [
        d
        for d in collect_docstrings(stdlib or sysconfig.get_paths()["stdlib"])
        if is_heldout(d) and d not in eval_text
    ]
    stream: list[int] = []
    for d in docs:
        stream += [tok.bos_token_id, *tok(d, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        if len(stream) >= n * seq_len:
            break
    rows = len(stream) // seq_len
    if rows < n:
        print(f"warning: only {rows} calibration rows of {seq_len} tokens available")
    n = min(n, rows)
    ids = torch.tensor(stream[: n * seq_len]).reshape(n, seq_len)
    print(f"calibration: {n} x {seq_len} tokens from {len(docs)} held-out docstrings not in {heldout_txt}")
    return ids


def copy_tokenizer(src: Path, dst: Path) -> None:
    """The portable tokenizer files of the bf16 dir (transformers 5 would write TokenizersBackend)."""
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, dst / f)


def run_llmcompressor(args, model, tok, ids) -> None:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    recipe = QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=["lm_head"])
    kw = {}
    if args.scheme != "NVFP4A16":
        ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        kw = dict(dataset=ds, num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
    oneshot(model=model, recipe=recipe, tokenizer=tok, **kw)
    model.save_pretrained(str(args.out), save_compressed=True)


def patch_modelopt_cpu() -> None:
    """ModelOpt's NVFP4 dynamic block quantizer asserts CUDA tensors; give it a CPU quantize-dequantize.

    Only used by forwards with quantization enabled (not by max calibration, not by the export, whose
    weight bytes come from ModelOpt's own NVFP4QTensor code)."""
    import torch
    from modelopt.torch.quantization import tensor_quant

    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

    def dynamic_block_quantize_cpu(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits,
                                   scale_exponent_bits):  # fmt: skip
        assert (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4)
        shape, dtype = inputs.shape, inputs.dtype
        x = inputs.float().reshape(-1, block_size)
        amax = (x.abs().amax() if amax is None else amax).float().amax()
        gscale = (amax / (6.0 * 448.0)).clamp(min=1e-12)
        bscale = (x.abs().amax(-1, keepdim=True) / 6.0 / gscale).clamp(max=448.0)
        bscale = bscale.to(torch.float8_e4m3fn).float() * gscale
        bscale = torch.where(bscale == 0, torch.ones_like(bscale), bscale)
        y = (x / bscale).clamp(-6.0, 6.0)
        q = grid[(y.abs().unsqueeze(-1) - grid).abs().argmin(-1)] * y.sign()
        return (q * bscale).reshape(shape).to(dtype)

    tensor_quant.dynamic_block_quantize_op = dynamic_block_quantize_cpu
    import modelopt.torch.quantization.nn.modules.tensor_quantizer as tq

    if hasattr(tq, "dynamic_block_quantize_op"):
        tq.dynamic_block_quantize_op = dynamic_block_quantize_cpu


def run_modelopt(args, model, tok, ids) -> None:
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    patch_modelopt_cpu()
    cfg = getattr(mtq, MODELOPT_CFGS[args.scheme])

    def forward_loop(m):
        with torch.no_grad():
            for i in range(0, ids.shape[0], 4):
                m(input_ids=ids[i : i + 4])

    model = mtq.quantize(model, cfg, forward_loop)
    mtq.print_quant_summary(model)
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=str(args.out))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("llmcompressor", "compressed-tensors", "nvidia-modelopt", "transformers", "torch"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--producer", required=True, choices=["llmcompressor", "modelopt"])
    ap.add_argument(
        "--scheme", required=True, help="llmcompressor: NVFP4A16 | NVFP4; modelopt: W4A16_NVFP4 | NVFP4"
    )
    ap.add_argument("--model", default="tests/fixtures/demo/bf16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--heldout", default=None, help="evaluation text to keep out of calibration")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--stdlib", default=None, help="stdlib dir the docstrings come from (default: running)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    ok = {"llmcompressor": ("NVFP4A16", "NVFP4"), "modelopt": tuple(MODELOPT_CFGS)}[args.producer]
    if args.scheme not in ok:
        ap.error(f"--scheme for {args.producer} must be one of {ok}")
    src = Path(args.model)
    args.out = Path(args.out or src.parent / DEFAULT_OUT[(args.producer, args.scheme)])
    heldout = Path(args.heldout) if args.heldout else src.parent / "heldout.txt"

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    model.eval()
    ids = calibration_ids(tok, heldout, args.calib_samples, args.calib_len, args.stdlib)

    if args.out.exists():
        shutil.rmtree(args.out)
    t0 = time.time()
    if args.producer == "llmcompressor":
        run_llmcompressor(args, model, tok, ids)
    else:
        run_modelopt(args, model, tok, ids)
    copy_tokenizer(src, args.out)
    if (src / "generation_config.json").exists() and not (args.out / "generation_config.json").exists():
        shutil.copy2(src / "generation_config.json", args.out / "generation_config.json")
    info = dict(
        producer=args.producer,
        scheme=args.scheme,
        source=str(src),
        calibration=f"{ids.shape[0]} x {ids.shape[1]} tokens of held-out stdlib docstrings not in {heldout}",
        versions=versions(),
        command=" ".join([Path(sys.executable).as_posix(), *sys.argv]),
        seconds=round(time.time() - t0, 1),
    )
    print(json.dumps(info, indent=2))
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {args.out} ({size / 1e6:.2f} MB): {sorted(p.name for p in args.out.iterdir())}")


if __name__ == "__main__":
    main()
