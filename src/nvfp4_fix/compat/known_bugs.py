"""The compressed-tensors / transformers bugs that break NVFP4 loading, by affected release range.

Each :class:`KnownBug` names the distribution and the releases ``[low, high)`` it was read or measured
on, and the fix in :mod:`.ct_fixes` that removes it (None for advisories). ``bugs_for()`` lists those
of the installed versions.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass

PACKAGE = "compressed-tensors"
MODULE = "compressed_tensors"


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """Leading numeric release of a version string: '2.13.0+cpu' -> (2, 13, 0); None if unparsable."""
    match = re.match(r"\d+(?:\.\d+)*", text or "")
    return tuple(int(p) for p in match.group(0).split(".")) if match else None


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def in_range(version: str | None, low: str | None, high: str | None) -> bool:
    """low <= version < high on numeric releases; None bounds are open."""
    v = parse_version(version)
    if v is None:
        return False
    lo, hi = parse_version(low), parse_version(high)
    return (lo is None or v >= lo) and (hi is None or v < hi)


@dataclass(frozen=True)
class KnownBug:
    key: str
    package: str  # distribution name the range refers to
    affected: tuple[str | None, str | None]  # [low, high): high is the first release without it
    summary: str
    symptom: str
    fixed_by: str  # a fix of ct_fixes.py, or what to do instead
    checked: str  # which releases the range was read or measured on
    needs_torch: str | None = None  # only with torch >= this
    fix: str | None = None  # name of the fix here that removes it, None for advisories

    def affects(self, versions: dict[str, str | None]) -> bool:
        if not in_range(versions.get(self.package), *self.affected):
            return False
        return self.needs_torch is None or in_range(versions.get("torch"), self.needs_torch, None)


KNOWN_BUGS: tuple[KnownBug, ...] = (
    KnownBug(
        key="ct-weight-scale-dropped",
        package=PACKAGE,
        affected=("0.13.0", "0.14.0"),
        summary="compress_model drops weight_scale of CompressedLinear layers (_skip_scale is True for "
        "NVFP4PackedCompressor and the weight was already deleted)",
        symptom="KeyError: 'weight_scale' at the first forward (default run_compressed=True)",
        fixed_by="fix keep_weight_scale; upstream 0.14.0 skips CompressedLinear in compress_model",
        checked="source of 0.12.0, 0.12.2 (no _skip_scale), 0.13.0 (measured), 0.14.0.1 (skips)",
        fix="keep_weight_scale",
    ),
    KnownBug(
        key="ct-float8-promotion",
        package=PACKAGE,
        affected=("0.13.0", "0.14.0"),
        summary="_quantize/_dequantize divide the float8 block scale by the global scale without a cast "
        "(#514 reverted by #527; back in 0.14.0 as #537)",
        symptom="RuntimeError: Promotion for Float8 Types is not supported (run_compressed=False: at "
        "load in _dequantize, then at every forward in _quantize)",
        fixed_by="fix cast_fp8_scale",
        checked="source of 0.10.2, 0.11.0, 0.12.0, 0.12.2 (cast), 0.13.0 (measured), 0.14.0.1 (cast)",
        fix="cast_fp8_scale",
    ),
    KnownBug(
        key="ct-decompress-module-buffers",
        package=PACKAGE,
        affected=("0.9.0", "0.15.0"),
        summary="BaseCompressor.decompress_module reads named_parameters() only, not buffers; latent "
        "while every compressed tensor is a Parameter",
        symptom="KeyError for a compressed tensor registered as a buffer; StopIteration if a module has none",
        fixed_by="fix decompress_module_buffers; 0.15.0 reads the module's whole direct state dict",
        checked="source of 0.9.4 through 0.14.0.1 and 0.15.0",
        fix="decompress_module_buffers",
    ),
    KnownBug(
        key="ct-pack-fp4-compile",
        package=PACKAGE,
        affected=("0.12.0", "0.15.0"),
        needs_torch="2.10",
        summary="pack_fp4_to_uint8 is torch.compile(fullgraph=True)d; torch >= 2.10 fails to trace "
        "torch.tensor(..., device='meta') with fake tensors when transformers compresses the meta model",
        symptom="torch._dynamo.exc.TorchRuntimeError in pack_fp4_to_uint8 (run_compressed=False)",
        fixed_by="fix eager_pack_fp4 (or TORCHDYNAMO_DISABLE=1)",
        checked="source of 0.11.0 (eager), 0.12.0-0.14.0.1 (compiled), 0.15.0 (moved); measured on "
        "0.13.0 with torch 2.13.0 only",
        fix="eager_pack_fp4",
    ),
    KnownBug(
        key="ct-bf16-decompressed-weight",
        package=PACKAGE,
        affected=("0.10.0", "0.15.0"),
        summary="NVFP4 decompress_weight returns bfloat16 whatever the model dtype; CompressedLinear "
        "and decompress_model use it as is (fix: dequantize in float32, cast to the model dtype)",
        symptom="RuntimeError: expected m1 and m2 to have the same dtype (float16/float32 model, first "
        "forward, both load modes; in 0.13 hidden behind the KeyError / Float8 errors)",
        fixed_by="fix weight_dtype (also what enable_low_memory_mode() works through)",
        checked="source of 0.10.2-0.14.0.1 (unpack_fp4_from_uint8 defaults to bfloat16), measured on 0.13.0",
        fix="weight_dtype",
    ),
    KnownBug(
        key="ct-bf16-weight-first-forward",
        package=PACKAGE,
        affected=("0.15.0", None),
        summary="the NVFP4 decompressor still returns bfloat16; the whole-model decompression at the first "
        "forward leaves bfloat16 weights in a float16/float32 model",
        symptom="RuntimeError: expected m1 and m2 to have the same dtype (default load with dtype=float16 "
        "or float32; dequantize=True and bfloat16 work)",
        fixed_by="advice: load with dtype=torch.bfloat16, or apply_patch() (nvfp4-fix's packed layers)",
        checked="measured on 0.20.0 with transformers 5.24.0; source of 0.15.0 has the same decompressor",
    ),
    KnownBug(
        key="tf-fp16-default",
        package="transformers",
        affected=(None, "5.24.0"),
        summary="transformers loads compressed-tensors models in float16 by default and casts the fp32 "
        "global scales to it: 448*6/amax overflows float16 when amax < 0.041",
        symptom="inf/NaN weights or logits for layers with small weights",
        fixed_by="advice: pass dtype=torch.bfloat16 (or float32) to from_pretrained",
        checked="4.57.3 has it, 5.24.0 does not; releases between not checked",
    ),
    KnownBug(
        key="ct-whole-model-decompress",
        package=PACKAGE,
        affected=("0.15.0", None),
        summary="the whole model is decompressed to bf16 on the first forward (layer bytes x3.8)",
        symptom="out of memory on a card the packed model fits",
        fixed_by="apply_patch(packed_layers=True): nvfp4-fix's packed layers",
        checked="measured on 0.19.0 and 0.20.0",
    ),
)

BUGS_BY_FIX: dict[str, KnownBug] = {b.fix: b for b in KNOWN_BUGS if b.fix}


def versions() -> dict[str, str | None]:
    return {d: installed_version(d) for d in ("torch", "transformers", PACKAGE)}


def bugs_for(vers: dict[str, str | None] | None = None) -> list[KnownBug]:
    vers = versions() if vers is None else vers
    return [b for b in KNOWN_BUGS if b.affects(vers)]
