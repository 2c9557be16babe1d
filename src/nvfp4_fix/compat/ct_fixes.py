"""The fixes for :mod:`.known_bugs`: each finds the code it replaces (None where this release has
none) and swaps in a wrapper, recording the originals so that they can be put back.

``FIXES`` maps a fix name to its target and its apply function; :mod:`.compressed_tensors` decides
which to apply (version range and target present) and when (at once, or at the package's import).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .known_bugs import MODULE

# ---- patch bookkeeping ----------------------------------------------------------------------------

_MISSING = object()
# fix name -> list of (owner, attribute, previous value in owner.__dict__ or _MISSING)
_ORIGINALS: dict[str, list[tuple[object, str, object]]] = {}
_LOW_MEMORY = False  # set by compressed_tensors.enable_low_memory_mode, read by the CompressedLinear forward


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
