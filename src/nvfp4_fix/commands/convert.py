"""Rewrite an NVFP4 checkpoint between the compressed-tensors and ModelOpt layouts. Packed codes and
e4m3 block scales are copied byte for byte; names change (weight_packed <-> weight) and per-tensor
scales are inverted (weight_global_scale = 1 / weight_scale_2, input_global_scale = 1 / input_scale,
as compressed-tensors' own converter does); quantization_config <-> hf_quant_config.json. ModelOpt
AWQ checkpoints (pre_quant_scale) have no compressed-tensors equivalent and are refused."""

from __future__ import annotations

import argparse

HELP = "convert between compressed-tensors and ModelOpt layouts (packed bytes unchanged)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="NVFP4 checkpoint folder or hub id (org/model)")
    p.add_argument("out", help="output folder (must not be PATH or inside it)")
    p.add_argument("--to", required=True, choices=["compressed-tensors", "modelopt"])
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from ..tools.rewrite import convert_checkpoint

    r = convert_checkpoint(args.path, args.out, args.to, args.force)
    print(
        f"wrote {r['out']}: {r['layers']} NVFP4 layers in the {r['to']} layout, {len(r['files'])} shard(s); "
        f"copied {', '.join(r['copied']) or 'no side files'}"
    )
    return 0
