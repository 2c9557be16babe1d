"""Version-gated, idempotent, reversible fixes for compressed-tensors bugs that break NVFP4 loading.

Each fix is applied only when the installed release is in the affected range of ``KNOWN_BUGS`` AND the
code it replaces is still there. Originals are kept and put back by ``remove()``. If compressed-tensors
is not imported yet, ``apply()`` waits for its import (a post-import hook) instead of importing it.

Low-memory mode (the 0.10-0.14 ``CompressedLinear``, i.e. 0.13.x here): by default a layer
decompresses its weight on the first forward and then keeps the dense copy next to the packed one for
the rest of the process (16-bit dense: ~3.6x the packed bytes, on top of them). With
``enable_low_memory_mode()`` it decompresses on every forward and keeps nothing: memory stays at the
packed size plus one layer's dense weight at a time, at the price of a full dequantization per layer
per forward (decode gets many times slower). Load mode ``run_compressed=False`` decompresses the whole
model at load time and is not affected.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import _nvfp4_fix_startup as _hooks

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
    fixed_by: str  # a fix in this module, or what to do instead
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


# ---- patch bookkeeping ----------------------------------------------------------------------------

_MISSING = object()
# fix name -> list of (owner, attribute, previous value in owner.__dict__ or _MISSING)
_ORIGINALS: dict[str, list[tuple[object, str, object]]] = {}
_ARMED = False
_LOW_MEMORY = False


def _swap(saved: list[tuple[object, str, object]], owner: object, attr: str, new: object) -> None:
    saved.append((owner, attr, vars(owner).get(attr, _MISSING)))
    setattr(owner, attr, new)


def _restore(saved: list[tuple[object, str, object]]) -> None:
    for owner, attr, old in reversed(saved):
        if old is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, old)


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


_PACK_MODULES = (
    "compressed_tensors.compressors.quantized_compressors.fp4_quantized",  # 0.13, 0.14
    "compressed_tensors.compressors.quantized_compressors.nvfp4_quantized",  # 0.12
)


# ---- the fixes ------------------------------------------------------------------------------------


def _target_keep_weight_scale() -> Any:
    mod = _module("compressed_tensors.compressors.quantized_compressors.base")
    cls = getattr(mod, "BaseQuantizationCompressor", None)
    return cls if cls is not None and hasattr(cls, "_skip_scale") and hasattr(cls, "compress") else None


def _apply_keep_weight_scale(cls: Any, saved: list) -> None:
    original = cls.compress

    def compress(self: Any, model_state: dict, names_to_scheme: dict, *args: Any, **kwargs: Any) -> dict:
        out = original(self, model_state, names_to_scheme, *args, **kwargs)
        device = kwargs.get("compression_device", args[1] if len(args) > 1 else "cpu")
        for name, value in model_state.items():
            # A scale whose weight is absent (CompressedLinear deleted it) was not re-emitted by
            # compress_weight, so _skip_scale() must not drop it.
            if (
                name.endswith("weight_scale")
                and name not in out
                and name[: -len("_scale")] not in model_state
            ):
                out[name] = value.to(device)
        return out

    compress.__wrapped__ = original  # type: ignore[attr-defined]
    _swap(saved, cls, "compress", compress)


def _target_cast_fp8_scale() -> Any:
    mod = _module("compressed_tensors.quantization.lifecycle.forward")
    ok = all(callable(getattr(mod, n, None)) for n in ("_quantize", "_dequantize"))
    return mod if ok else None


def _apply_cast_fp8_scale(mod: Any, saved: list) -> None:
    import inspect

    import torch

    fp8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu") if hasattr(torch, n)}

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            scale, g = bound.arguments.get("scale"), bound.arguments.get("global_scale")
            if g is not None and scale is not None and scale.dtype in fp8:
                # As 0.12.x did: divide in the global scale's dtype (float32 unless the model cast it).
                bound.arguments["scale"] = scale.to(
                    g.dtype if g.dtype.is_floating_point and g.dtype not in fp8 else torch.float32
                )
            return original(*bound.args, **bound.kwargs)

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        wrapper.__name__ = original.__name__
        return wrapper

    for name in ("_quantize", "_dequantize"):
        _swap(saved, mod, name, wrap(getattr(mod, name)))


def _target_decompress_module_buffers() -> Any:
    mod = _module("compressed_tensors.compressors.base")
    cls = getattr(mod, "BaseCompressor", None)
    return cls if cls is not None and callable(getattr(cls, "decompress_module", None)) else None


def _apply_decompress_module_buffers(cls: Any, saved: list) -> None:
    from compressed_tensors.utils import has_offloaded_params

    original = cls.decompress_module

    def decompress_module(self: Any, module: Any) -> Any:
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None or not hasattr(scheme, "weights"):
            return None  # module is not quantized / weights are not quantized
        data = dict(module.named_parameters())
        for name, buf in module.named_buffers():
            data.setdefault(name, buf)
        first = next(iter(data.values()), None)
        device = "cpu" if first is None or has_offloaded_params(module) else first.device
        return self.decompress_weight(compressed_data=data, quantization_args=scheme.weights).to(device)

    decompress_module.__wrapped__ = original  # type: ignore[attr-defined]
    _swap(saved, cls, "decompress_module", decompress_module)


def _target_eager_pack_fp4() -> Any:
    for name in _PACK_MODULES:
        fn = getattr(_module(name), "pack_fp4_to_uint8", None)
        if fn is not None and getattr(fn, "_torchdynamo_orig_callable", None) is not None:
            return fn
    return None


def _apply_eager_pack_fp4(compiled: Any, saved: list) -> None:
    eager = compiled._torchdynamo_orig_callable
    # Swap every module-level reference (the defining module and the star re-exports).
    for name, mod in list(sys.modules.items()):
        if (name == MODULE or name.startswith(MODULE + ".")) and vars(mod).get(
            "pack_fp4_to_uint8"
        ) is compiled:
            _swap(saved, mod, "pack_fp4_to_uint8", eager)


def _target_weight_dtype() -> Any:
    mod = _module("compressed_tensors.linear.compressed_linear")
    cls = getattr(mod, "CompressedLinear", None)
    # 0.15+ keeps a stub whose from_linear raises; only the 0.9-0.14 class decompresses in forward.
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    linear = cls if code is not None and "decompress_module" in code.co_names else None
    mc = getattr(
        _module("compressed_tensors.compressors.model_compressors.model_compressor"), "ModelCompressor", None
    )
    mc = mc if callable(getattr(mc, "decompress_model", None)) else None
    fp4 = next(
        (m for m in map(_module, _PACK_MODULES) if callable(getattr(m, "unpack_fp4_from_uint8", None))), None
    )
    return (linear, mc, fp4) if linear is not None or mc is not None else None


def _apply_weight_dtype(targets: tuple[Any, Any, Any], saved: list) -> None:
    linear, mc, fp4 = targets
    if fp4 is not None:
        _apply_unpack_float32(fp4, saved)
    if linear is not None:
        _apply_compressed_linear_forward(linear, saved)
    if mc is not None:
        _apply_decompress_model_dtype(mc, saved)


def _apply_unpack_float32(mod: Any, saved: list) -> None:
    import torch

    original = mod.unpack_fp4_from_uint8

    def unpack_fp4_from_uint8(a: Any, m: int, n: int, dtype: Any = torch.float32) -> Any:
        # decompress_weight dequantizes in the dtype of the unpacked codes: make that float32, so the
        # dense weight is rounded once, to the model's dtype, instead of to bfloat16 first.
        return original(a, m, n, dtype=dtype)

    unpack_fp4_from_uint8.__wrapped__ = original  # type: ignore[attr-defined]
    _swap(saved, mod, "unpack_fp4_from_uint8", unpack_fp4_from_uint8)


def _apply_decompress_model_dtype(cls: Any, saved: list) -> None:
    original = cls.decompress_model

    def decompress_model(self: Any, model: Any) -> Any:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        dtype = getattr(getattr(emb, "weight", None), "dtype", None) or getattr(model, "dtype", None)
        result = original(self, model)
        if dtype is not None and dtype.is_floating_point and dtype.itemsize > 1:
            # decompress_weight returns bfloat16: bring dense weights back to the model's dtype.
            for module in model.modules():
                weight = module._parameters.get("weight") if hasattr(module, "quantization_scheme") else None
                if weight is not None and weight.dtype.is_floating_point and weight.dtype != dtype:
                    weight.data = weight.data.to(dtype)
        return result

    decompress_model.__wrapped__ = original  # type: ignore[attr-defined]
    _swap(saved, cls, "decompress_model", decompress_model)


def _apply_compressed_linear_forward(cls: Any, saved: list) -> None:
    import torch
    from compressed_tensors.quantization import QuantizationStatus

    utils = _module("compressed_tensors.utils")
    register = getattr(utils, "register_offload_parameter", None)
    original = cls.forward

    def forward(self: Any, input: Any) -> Any:
        if self.quantization_status == QuantizationStatus.COMPRESSED:
            # decompress_weight returns bfloat16 whatever the model dtype: cast to the activations'.
            weight = self.compressor.decompress_module(self).to(input.dtype)
            if _LOW_MEMORY:
                return torch.nn.functional.linear(input, weight, self.bias)
            param = torch.nn.Parameter(weight, requires_grad=False)
            register(self, "weight", param) if register else self.register_parameter("weight", param)
            self.quantization_status = QuantizationStatus.FROZEN
        return torch.nn.functional.linear(input, self.weight.to(input.dtype), self.bias)

    forward.__wrapped__ = original  # type: ignore[attr-defined]
    _swap(saved, cls, "forward", forward)


def _drop_dense_copies(model: Any) -> int:
    """Delete the dense weights CompressedLinear layers cached, so they decompress again."""
    from compressed_tensors.quantization import QuantizationStatus

    delete = getattr(_module("compressed_tensors.utils"), "delete_offload_parameter", None)
    dropped = 0
    for module in model.modules():
        params = getattr(module, "_parameters", {})
        if type(module).__name__ == "CompressedLinear" and "weight_packed" in params and "weight" in params:
            delete(module, "weight") if delete else delattr(module, "weight")
            module.quantization_status = QuantizationStatus.COMPRESSED
            dropped += 1
    return dropped


@dataclass(frozen=True)
class _Fix:
    name: str
    target: str
    find: Callable[[], Any]
    apply: Callable[[Any, list], None]


FIXES: tuple[_Fix, ...] = (
    _Fix(
        "keep_weight_scale",
        "BaseQuantizationCompressor._skip_scale / .compress",
        _target_keep_weight_scale,
        _apply_keep_weight_scale,
    ),
    _Fix(
        "cast_fp8_scale",
        "quantization.lifecycle.forward._quantize / _dequantize",
        _target_cast_fp8_scale,
        _apply_cast_fp8_scale,
    ),
    _Fix(
        "decompress_module_buffers",
        "BaseCompressor.decompress_module",
        _target_decompress_module_buffers,
        _apply_decompress_module_buffers,
    ),
    _Fix(
        "eager_pack_fp4",
        "fp4_quantized.pack_fp4_to_uint8 (torch.compile'd)",
        _target_eager_pack_fp4,
        _apply_eager_pack_fp4,
    ),
    _Fix(
        "weight_dtype",
        "CompressedLinear.forward / ModelCompressor.decompress_model",
        _target_weight_dtype,
        _apply_weight_dtype,
    ),
)


# ---- public API -----------------------------------------------------------------------------------


@dataclass
class FixRecord:
    name: str
    bug: str  # KnownBug.key
    summary: str
    target: str
    installed: str | None  # compressed-tensors version
    affected: str  # e.g. ">=0.13.0,<0.14.0"
    version_has_bug: bool
    target_present: bool | None  # None: compressed-tensors not imported yet
    needed: bool
    applied: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _range_text(bug: KnownBug) -> str:
    lo, hi = bug.affected
    text = ",".join(p for p in (f">={lo}" if lo else "", f"<{hi}" if hi else "") if p)
    return text + (f" with torch>={bug.needs_torch}" if bug.needs_torch else "")


def _imported() -> bool:
    return _hooks.is_imported(MODULE)


def status() -> list[FixRecord]:
    """One record per fix: does the installed version have the bug, is the fix applied, and why."""
    vers = versions()
    ct = vers[PACKAGE]
    imported = _imported()
    records = []
    for fix in FIXES:
        bug = BUGS_BY_FIX[fix.name]
        has_bug = bug.affects(vers)
        applied = fix.name in _ORIGINALS
        present = True if applied else (fix.find() is not None) if imported else None
        if ct is None:
            reason = "not needed: compressed-tensors is not installed"
        elif applied:
            reason = "applied"
        elif not has_bug:
            hi = bug.affected[1]
            if bug.needs_torch and in_range(ct, *bug.affected):
                reason = f"not needed: only with torch>={bug.needs_torch}, installed {vers['torch']}"
            elif hi and in_range(ct, hi, None):
                reason = f"not needed: fixed upstream in {PACKAGE} {hi}"
            else:
                reason = f"not needed: {PACKAGE} {ct} predates the bug ({_range_text(bug)})"
        elif present is None:
            reason = "pending: applies when compressed_tensors is imported" if _ARMED else "not applied"
        elif not present:
            reason = f"not applied: {fix.target} not found in {PACKAGE} {ct}"
        else:
            reason = "not applied"
        records.append(
            FixRecord(
                name=fix.name,
                bug=bug.key,
                summary=bug.summary,
                target=fix.target,
                installed=ct,
                affected=_range_text(bug),
                version_has_bug=has_bug,
                target_present=present,
                needed=has_bug and present is not False,
                applied=applied,
                reason=reason,
            )
        )
    return records


def _apply_now() -> None:
    vers = versions()
    for fix in FIXES:
        if fix.name in _ORIGINALS or not BUGS_BY_FIX[fix.name].affects(vers):
            continue
        target = fix.find()
        if target is None:
            continue
        saved: list[tuple[object, str, object]] = []
        try:
            fix.apply(target, saved)
        except Exception:
            _restore(saved)
            raise
        _ORIGINALS[fix.name] = saved


def apply() -> list[FixRecord]:
    """Apply every needed fix now, or as soon as compressed_tensors is imported. Idempotent."""
    global _ARMED
    _ARMED = True
    if installed_version(PACKAGE) is not None:
        _hooks.when_imported(MODULE, _apply_now)
    return status()


def remove() -> list[FixRecord]:
    """Undo every fix (and a pending post-import hook); the originals are put back."""
    global _ARMED
    _ARMED = False
    _hooks.cancel(MODULE, _apply_now)
    for name in list(_ORIGINALS)[::-1]:
        _restore(_ORIGINALS.pop(name))
    return status()


def is_applied() -> bool:
    """True when every fix this installation needs is in place (or waits for the import)."""
    return _ARMED and all(r.applied or not r.needed or r.target_present is None for r in status())


def enable_low_memory_mode(enabled: bool = True, model: Any = None) -> int:
    """Decompress 0.10-0.14 CompressedLinear weights on every forward and keep no dense copy.

    Works through the ``weight_dtype`` fix, so only for models loaded after ``apply()``. Layers that
    already ran keep their cached dense copy unless ``model`` is given: then those copies are dropped
    now (returns how many). No effect on compressed-tensors >= 0.15, which has no such CompressedLinear.
    """
    global _LOW_MEMORY
    _LOW_MEMORY = enabled
    return _drop_dense_copies(model) if enabled and model is not None and _imported() else 0


def low_memory_mode() -> bool:
    return _LOW_MEMORY


def low_memory_supported() -> bool | None:
    """Whether the installed CompressedLinear can run in low-memory mode (None: not imported yet)."""
    if not _imported():
        return None
    return (
        "weight_dtype" in _ORIGINALS
        and _target_weight_dtype() not in (None,)
        and any(
            getattr(owner, "__name__", "") == "CompressedLinear" for owner, _, _ in _ORIGINALS["weight_dtype"]
        )
    )
