"""Print the "how to load" section of a model card, filled in from the checkpoint (format, scheme, size):
transformers with nvfp4-fix, plain transformers, and vLLM."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "print the markdown loading section for a model card"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint folder or hub id (org/model)")
    p.add_argument("--name", default=None, help="model id to show in the snippets (default: PATH)")


def card(rep: dict[str, Any], name: str) -> str:
    from ..checkpoint import COMPRESSED_TENSORS
    from ..tools.analysis import human

    ct = rep["format"] == COMPRESSED_TENSORS
    scheme = rep["scheme"] or ""
    w4a4 = scheme.startswith("W4A4")
    awq = scheme.endswith("AWQ")
    what = ("weights and activations in NVFP4 (W4A4)" if w4a4 else "weight-only NVFP4 (W4A16)") + (
        ", with AWQ pre-quantization scales" if awq else ""
    )
    layout = (
        "the compressed-tensors `nvfp4-pack-quantized` layout"
        if ct
        else f"the NVIDIA ModelOpt layout (`hf_quant_config.json`, `{rep['quant_algo']}`)"
    )
    mem = rep["memory"]
    arch = rep["architecture"] or ""
    auto = "AutoModelForImageTextToText" if "ConditionalGeneration" in arch else "AutoModelForCausalLM"
    out = [
        "## How to load",
        "",
        "This checkpoint is NVFP4 (4-bit E2M1 weights with an FP8 scale per 16 values and one FP32 scale "
        f"per tensor) in {layout}: {what}, {rep['quantized_count']} quantized linear layers. "
        f"Size: {human(mem['disk'])} on disk, {human(mem['packed'])} in memory with packed layers, "
        f"about {human(mem['bf16'])} as bf16.",
        "",
        "### Transformers with nvfp4-fix (layers stay packed)",
        "",
        "```bash",
        "pip install nvfp4-fix",
        "```",
        "",
        "```python",
        "from nvfp4_fix import apply_patch",
        "",
        "apply_patch()  # before loading: NVFP4 layers load packed, compressed-tensors bugs fixed",
        "",
        f"from transformers import AutoTokenizer, {auto}",
        "",
        f'model = {auto}.from_pretrained("{name}", device_map="auto")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        "### Plain transformers",
        "",
    ]
    if ct:
        out += [
            "With `compressed-tensors >= 0.14` installed, `AutoModelForCausalLM.from_pretrained` loads this "
            "checkpoint, but decompresses every layer to bf16 on the first forward "
            f"(about {human(mem['bf16'])}"
            " instead of "
            + human(mem["packed"])
            + ")"
            + (", and `dequantize=True` drops the W4A4 activation quantization" if w4a4 else "")
            + (
                ". Its mixture-of-experts layers come out wrong there: transformers dequantizes NVFP4 "
                "experts without their `weight_global_scale` (transformers#48371)"
                if rep.get("moe")
                else ""
            )
            + ". With compressed-tensors 0.13.x the first forward raises `KeyError: 'weight_scale'` "
            "unless nvfp4-fix's `apply_patch()` runs first.",
        ]
    else:
        out += [
            "Transformers has no ModelOpt quantizer and compressed-tensors does not read this layout, so "
            "plain transformers cannot load it; use nvfp4-fix (above) or vLLM (below)."
            + (
                ""
                if awq
                else " `nvfp4-fix convert PATH OUT --to compressed-tensors` writes a copy that "
                "compressed-tensors reads."
            ),
        ]
    out += [
        "",
        "### vLLM",
        "",
        "```bash",
        f"vllm serve {name}",
        "```",
        "",
        "```python",
        "from vllm import LLM",
        "",
        f'llm = LLM(model="{name}")',
        'print(llm.generate("Hello, my name is")[0].outputs[0].text)',
        "```",
        "",
        "vLLM runs NVFP4 with native FP4 GEMMs on Blackwell GPUs and with weight-only Marlin FP4 kernels on "
        "GPUs of compute capability 7.5 and newer (Turing, Ampere, Ada, Hopper)"
        + (", where activations stay 16-bit." if w4a4 else "."),
    ]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import inspect_checkpoint
    from ..tools.analysis import report, require_consistent

    info = inspect_checkpoint(args.path, getattr(args, "tensors", None))
    rep = report(info)
    require_consistent(info)
    print(card(rep, args.name or args.path))
    return 0
