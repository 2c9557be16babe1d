"""Write a plain (unquantized) checkpoint that any runtime reads: every NVFP4 layer dequantized to
--dtype (an AWQ pre_quant_scale folded into the weight), other tensors cast to --dtype, config.json
without quantization_config, tokenizer and generation files copied. Shard by shard; OUT is written
into a temporary folder beside it and renamed into place at the end."""

from __future__ import annotations

import argparse

HELP = "write a plain bf16/fp16/fp32 checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="NVFP4 checkpoint folder or hub id (org/model)")
    p.add_argument("out", help="output folder (must not be PATH or inside it)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from ..tools.rewrite import dequantize_checkpoint

    r = dequantize_checkpoint(args.path, args.out, args.dtype, args.force)
    print(
        f"wrote {r['out']}: {r['layers']} layers dequantized to {args.dtype}, {len(r['files'])} shard(s); "
        f"copied {', '.join(r['copied']) or 'no side files'}"
    )
    if r["dropped_activation_quantization"]:
        print("note: the checkpoint is W4A4; the dense copy runs activations unquantized")
    return 0
