"""``inspect --scan``: read the scales (one tensor at a time) and report values that break loaders."""

from __future__ import annotations

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
    """safe_open handles, at most two open at a time: the data is memory-mapped and the pages read stay
    in the process's RSS until the file is closed, so the scan walks shard by shard and closes behind."""

    def __init__(self) -> None:
        self.open: dict[Path, tuple[Any, Any]] = {}

    def get(self, file: Path, name: str) -> Any:
        from safetensors import safe_open

        try:
            if file not in self.open:
                if len(self.open) >= 2:
                    self._close(next(iter(self.open)))
                ctx = safe_open(str(file), framework="pt", device="cpu")
                self.open[file] = (ctx, ctx.__enter__())
            return self.open[file][1].get_tensor(name)
        except Exception as e:  # a header that lies about the data (caught earlier in most cases)
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None

    def _close(self, file: Path) -> None:
        ctx, _ = self.open.pop(file)
        ctx.__exit__(None, None, None)

    def close(self) -> None:
        for file in list(self.open):
            self._close(file)


def _block_scale_stats(scale: Any) -> dict[str, int]:
    """Counts from a histogram of the e4m3 bytes (one pass): NaN is S.1111.111 (e4m3fn has no inf)."""
    import torch

    hist = torch.bincount(scale.view(torch.uint8).reshape(-1), minlength=256).tolist()
    return {
        "blocks": sum(hist),
        "nan": hist[0x7F] + hist[0xFF],
        "zero": hist[0x00] + hist[0x80],
        "negative": sum(hist[0x81:0xFF]),
    }


def _as_divisor(value: float, fmt: str) -> float:
    if fmt == COMPRESSED_TENSORS:
        return value
    return 1.0 / value if value != 0 else math.inf


def _examples(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def scan(info: CheckpointInfo) -> dict[str, Any]:
    """Read every block scale and per-tensor scale once; return totals, per-kind lists, and one-line
    problems (NaN / negative / non-positive / all-zero) and warnings (fp16 overflow, fused partners)."""
    assert info.format is not None
    glob_suffix, act_suffix = SCALE_SUFFIXES[info.format]
    files = _Files()
    totals = {"modules": 0, "blocks": 0, "nan": 0, "zero": 0, "negative": 0, "fp8_modules": 0}
    nan: list[str] = []
    negative: list[str] = []
    bad_scalars: list[str] = []
    zero_layers: list[str] = []
    fp16_overflow: list[str] = []
    globals_by_layer: dict[tuple[str, str], dict[str, float]] = {}

    def where(prefix: str) -> tuple[Path, int]:
        t = info.tensors[prefix + ".weight_scale"]
        return t.file, t.offsets[0]

    try:
        for prefix in progress.track(sorted(info.quantized, key=where), desc="scanning scales", unit="layer"):
            t = info.tensors[prefix + ".weight_scale"]
            if info.quantized[prefix].scheme == "fp8":
                totals["fp8_modules"] += 1
                _scan_fp8(info, prefix, files, nan, bad_scalars)
                continue
            stats = _block_scale_stats(files.get(t.file, t.name))
            totals["modules"] += 1
            for k in ("blocks", "nan", "zero", "negative"):
                totals[k] += stats[k]
            if stats["nan"]:
                nan.append(f"{t.name} ({stats['nan']} of {stats['blocks']})")
            if stats["negative"]:
                negative.append(f"{t.name} ({stats['negative']} of {stats['blocks']})")
            if stats["zero"] == stats["blocks"]:
                zero_layers.append(prefix)
            for suffix in (glob_suffix, act_suffix):
                g = info.tensors.get(prefix + suffix)
                if g is None:
                    continue
                values = files.get(g.file, g.name).float().reshape(-1).tolist()
                bad = [v for v in values if not (math.isfinite(v) and v > 0)]
                if bad:
                    bad_scalars.append(f"{g.name} = {bad[0]}")
                    continue
                if suffix == glob_suffix:
                    key = _fused_key(prefix)
                    if key:
                        globals_by_layer.setdefault(key, {})[prefix] = values[0]
                    divisor = max(_as_divisor(v, info.format) for v in values)
                    if divisor > FP16_MAX:
                        fp16_overflow.append(f"{g.name} (amax {448 * 6 / divisor:.3g})")
    finally:
        files.close()
    fused = [
        f"{parent} ({', '.join(p.rpartition('.')[2] for p in sorted(members))})"
        for (parent, _), members in sorted(globals_by_layer.items())
        if len(set(members.values())) > 1
    ]
    problems = []
    if nan:
        problems.append(f"NaN block scales in {len(nan)} layers: {_examples(nan)}")
    if negative:
        problems.append(f"negative block scales in {len(negative)} layers: {_examples(negative)}")
    if bad_scalars:
        problems.append(
            f"{len(bad_scalars)} per-tensor scales are not finite and > 0: {_examples(bad_scalars)}"
        )
    if zero_layers:
        problems.append(
            f"{len(zero_layers)} all-zero layers (every block scale is 0): {_examples(zero_layers)}"
        )
    warnings = []
    if fp16_overflow:
        warnings.append(
            f"{len(fp16_overflow)} weight global scales exceed fp16's 65504 (amax < 0.041); loaders that "
            "cast them to float16 (transformers 4.57 + compressed-tensors) get inf: "
            + _examples(fp16_overflow)
        )
    if fused:
        warnings.append(
            f"{len(fused)} fused groups (q/k/v or gate/up) have partners with different per-tensor scales; "
            "vLLM fuses them and uses one scale, so its outputs differ there: " + _examples(fused)
        )
    return {
        "totals": totals,
        "problems": problems,
        "warnings": warnings,
        "nan": nan,
        "negative": negative,
        "bad_scalars": bad_scalars,
        "zero_layers": zero_layers,
        "fp16_overflow": fp16_overflow,
        "fused_mismatch": fused,
    }


def _scan_fp8(info: CheckpointInfo, prefix: str, files: _Files, nan: list[str], bad: list[str]) -> None:
    """An FP8 layer: no NaN e4m3 weight code (S.1111.111), every weight and input scale finite and > 0."""
    import torch

    w = info.tensors[prefix + ".weight"]
    codes = files.get(w.file, w.name).view(torch.uint8)
    count = int(((codes & 0x7F) == 0x7F).sum())
    if count:
        nan.append(f"{w.name} ({count} NaN FP8 weight codes of {codes.numel()})")
    for leaf in (".weight_scale", ".input_scale"):
        t = info.tensors.get(prefix + leaf)
        if t is None:
            continue
        values = files.get(t.file, t.name).float().reshape(-1)
        wrong = values[~(torch.isfinite(values) & (values > 0))]
        if wrong.numel():
            bad.append(
                f"{t.name} = {float(wrong[0])}" + (f" ({wrong.numel()} values)" if wrong.numel() > 1 else "")
            )


def _fused_key(prefix: str) -> tuple[str, str] | None:
    parent, _, leaf = prefix.rpartition(".")
    group = FUSED.get(leaf)
    return (parent, group) if group else None


def scan_lines(result: dict[str, Any]) -> Iterator[str]:
    t = result["totals"]
    yield (
        f"scanned {t['modules']} NVFP4 layers, {t['blocks']:,} block scales: {t['nan']} NaN, "
        f"{t['negative']} negative, {t['zero']:,} zero"
        + (f"; {t['fp8_modules']} FP8 layers (weights and scales)" if t.get("fp8_modules") else "")
    )
    for f in result["problems"]:
        yield f"  problem: {f}"
    for w in result["warnings"]:
        yield f"  warning: {w}"
