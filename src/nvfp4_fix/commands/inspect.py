"""Describe an NVFP4 checkpoint from its configs and safetensors headers alone (no tensor data is read
unless --scan): producer, format, scheme, quantized and excluded modules per layer pattern, dtype and
shape checks, memory packed vs bf16, and which runtimes can load it. Exit code 1 when a check fails."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

HELP = "describe an NVFP4 checkpoint (headers only; --scan reads the scales)"

SCHEMES = {
    "W4A16": "weight-only (NVFP4 weights, 16-bit activations)",
    "W4A4": "NVFP4 weights and activations",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="checkpoint folder or hub id (org/model)")
    p.add_argument("--scan", action="store_true", help="also read every scale tensor and check its values")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def build(path: str, scan: bool = False, tensors: dict[str, Any] | None = None) -> dict[str, Any]:
    """``tensors``: the tensor table read from a hub checkpoint's headers (its weights not downloaded)."""
    from ..checkpoint import inspect_checkpoint
    from ..tools.analysis import report

    info = inspect_checkpoint(path, tensors)
    rep = report(info)
    if scan:
        from ..tools.scan import scan as run_scan

        rep["scan"] = run_scan(info)
    return rep


def failed(rep: dict[str, Any]) -> bool:
    return bool(rep["problems"]) or bool(rep.get("scan", {}).get("problems"))


def render(rep: dict[str, Any]) -> str:
    from ..tools.analysis import human
    from ..tools.scan import scan_lines

    algo = f", quant_algo {rep['quant_algo']}" if rep["quant_algo"] else ""
    scheme = rep["scheme"] or "?"
    base = scheme.removesuffix("-AWQ")
    awq = " + AWQ pre_quant_scale" if scheme.endswith("-AWQ") else ""
    lines = [
        f"{rep['path']}",
        f"  format     {rep['format_name']}{algo}",
        f"  scheme     {scheme}: {SCHEMES.get(base, base)}{awq}"
        + (" (NVFP4 layers; FP8 layers below)" if any(k.startswith("FP8") for k in rep["kinds"]) else ""),
        f"  producer   {rep['producer']} {rep['producer_version'] or '(version unknown)'}",
        f"  model      {rep['architecture']} ({rep['model_type']}), {rep['layers']} layers, "
        f"hidden {rep['hidden_size']}",
        f"  quantized  {rep['quantized_count']} layers in {len(rep['quantized'])} patterns: "
        + ", ".join(f"{kind} x{n}" for kind, n in sorted(rep["kinds"].items())),
    ]
    width = max((len(q["pattern"]) for q in rep["quantized"]), default=0)
    kind_width = max((len(q["kind"]) for q in rep["quantized"]), default=0)
    for q in rep["quantized"]:
        extra = "".join(
            [
                f" x{q['experts']} experts" if q["experts"] else "",
                " +input scale" if q["input_scale"] else "",
                " +pre_quant_scale" if q["pre_quant_scale"] else "",
            ]
        )
        lines.append(
            f"             {q['pattern']:<{width}}  x{q['count']:<4} {q['kind']:<{kind_width}}  "
            f"{', '.join(q['shapes'])}{extra}"
        )
    excl = ", ".join(rep["excluded"]) or "(none listed)"
    unq = ", ".join(f"{u['pattern']} x{u['count']}" for u in rep["unquantized"]) or "(none)"
    t = rep["tensors"]
    dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(t["dtypes"].items()))
    m = rep["memory"]
    lines += [
        f"  excluded   config: {excl}",
        f"             unquantized 2-D weights: {unq}",
        f"  tensors    {t['count']} in {len(t['files'])} file{'s' if len(t['files']) != 1 else ''}: {dtypes}",
        f"  memory     on disk {human(m['disk'])}; loaded packed {human(m['packed'])}; "
        f"as bf16 {human(m['bf16'])}"
        f" (x{m['bf16'] / max(m['packed'], 1):.1f})",
        "  runtimes",
    ]
    for r in rep["runtimes"]:
        lines.append(f"    {r['loads']:<5} {r['runtime']}: {r['note']}")
    inst = ", ".join(f"{k} {v}" for k, v in rep["installed"].items() if v)
    lines.append(f"  installed  {inst}")
    if rep["problems"]:
        lines.append(f"  checks     FAILED ({len(rep['problems'])}):")
        lines += [f"    problem: {p}" for p in rep["problems"]]
    else:
        lines.append("  checks     OK: tensor dtypes and shapes match the format and config.json")
    if "scan" in rep:
        lines += [
            "  scan       " + s.strip() if i == 0 else "  " + s for i, s in enumerate(scan_lines(rep["scan"]))
        ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rep = build(args.path, scan=args.scan, tensors=getattr(args, "tensors", None))
    if args.json:
        json.dump(rep, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(render(rep))
    return 1 if failed(rep) else 0
