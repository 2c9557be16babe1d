"""``inspect --scan``: read the scales (one tensor at a time) and report values that break loaders."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..checkpoint import COMPRESSED_TENSORS, CheckpointInfo
from ..errors import CheckpointError
from . import progress
from .analysis import FUSED, SCALE_SUFFIXES

FP16_MAX = 65504.0


class _Files:
    """safe_open handles kept open for the scan (one per shard), read one tensor at a time."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.open: dict[Path, Any] = {}

    def get(self, file: Path, name: str) -> Any:
        from safetensors import safe_open

        if file not in self.open:
            self.open[file] = self.stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
        try:
            return self.open[file].get_tensor(name)
        except Exception as e:  # a header that lies about the data (caught earlier in most cases)
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None


def _block_scale_stats(scale: Any) -> dict[str, int]:
    import torch

    b = scale.view(torch.uint8).reshape(-1)
    mag = b & 0x7F
    return {
        "blocks": int(b.numel()),
        "nan": int((mag == 0x7F).sum()),  # e4m3fn has no inf: S.1111.111 is NaN
        "zero": int((mag == 0).sum()),
        "negative": int(((b & 0x80) != 0).logical_and(mag != 0).sum()),
    }


def _as_divisor(value: float, fmt: str) -> float:
    if fmt == COMPRESSED_TENSORS:
        return value
    return 1.0 / value if value != 0 else math.inf


def scan(info: CheckpointInfo) -> dict[str, Any]:
    """Per-module findings plus totals; every finding names the tensor."""
    assert info.format is not None
    glob_suffix, act_suffix = SCALE_SUFFIXES[info.format]
    files = _Files()
    findings: list[str] = []
    warnings: list[str] = []
    totals = {"modules": 0, "blocks": 0, "nan": 0, "zero": 0, "negative": 0}
    zero_layers: list[str] = []
    fp16_overflow: list[str] = []
    globals_by_layer: dict[tuple[str, str], dict[str, float]] = {}
    with files.stack:
        for prefix in progress.track(sorted(info.quantized), desc="scanning scales", unit="layer"):
            t = info.tensors[prefix + ".weight_scale"]
            stats = _block_scale_stats(files.get(t.file, t.name))
            totals["modules"] += 1
            for k in ("blocks", "nan", "zero", "negative"):
                totals[k] += stats[k]
            if stats["nan"]:
                findings.append(f"{t.name}: {stats['nan']} of {stats['blocks']} block scales are NaN")
            if stats["negative"]:
                findings.append(
                    f"{t.name}: {stats['negative']} of {stats['blocks']} block scales are negative"
                )
            if stats["zero"] == stats["blocks"]:
                zero_layers.append(prefix)
            for suffix in (glob_suffix, act_suffix):
                g = info.tensors.get(prefix + suffix)
                if g is None:
                    continue
                values = files.get(g.file, g.name).float().reshape(-1).tolist()
                for v in values:
                    if not math.isfinite(v) or v <= 0:
                        findings.append(f"{g.name}: value {v} (must be finite and > 0)")
                        break
                else:
                    divisor = max(_as_divisor(v, info.format) for v in values)
                    if suffix == glob_suffix:
                        m = _fused_key(prefix)
                        if m:
                            globals_by_layer.setdefault(m, {})[prefix] = values[0]
                        if divisor > FP16_MAX:
                            fp16_overflow.append(f"{g.name} (amax {448 * 6 / divisor:.3g})")
    for (_, group), members in globals_by_layer.items():
        if len(set(members.values())) > 1:
            names = ", ".join(p.rpartition(".")[2] for p in sorted(members))
            warnings.append(
                f"{min(members)}: fused {group} partners ({names}) have different per-tensor scales; "
                "vLLM fuses them and uses one scale (outputs differ there)"
            )
    if zero_layers:
        findings.append(
            f"{len(zero_layers)} all-zero layers (every block scale is 0), e.g. " + ", ".join(zero_layers[:3])
        )
    if fp16_overflow:
        warnings.append(
            f"{len(fp16_overflow)} weight global scales exceed fp16's 65504 (amax < 0.041); loaders that "
            "cast them to float16 (transformers 4.57 + compressed-tensors) get inf, e.g. "
            + ", ".join(fp16_overflow[:3])
        )
    return {
        "totals": totals,
        "problems": findings,
        "warnings": warnings,
        "zero_layers": zero_layers,
        "fp16_overflow": fp16_overflow,
    }


def _fused_key(prefix: str) -> tuple[str, str] | None:
    parent, _, leaf = prefix.rpartition(".")
    group = FUSED.get(leaf)
    return (parent, group) if group else None


def scan_lines(result: dict[str, Any]) -> Iterator[str]:
    t = result["totals"]
    yield (
        f"scanned {t['modules']} layers, {t['blocks']:,} block scales: {t['nan']} NaN, "
        f"{t['negative']} negative, {t['zero']:,} zero"
    )
    for f in result["problems"]:
        yield f"  problem: {f}"
    for w in result["warnings"]:
        yield f"  warning: {w}"
