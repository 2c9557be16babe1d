"""Every quantized layer of a checkpoint, classified by its tensors and cross-checked with its config.

A layer's kind comes from its tensors (uint8/F4 codes: NVFP4; an e4m3 ``weight``: FP8) and must be
what the config says of that layer (:mod:`nvfp4_fix.schemes`). Every tensor must have a consumer:
a quantized weight, scale or zero point outside a layer nvfp4-fix loads, or one a layer has no
place for, is a :class:`CheckpointError` naming the file, the tensor and what was expected. Nothing
is skipped silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError
from .schemes import (
    COMPRESSED_TENSORS,
    FP8Spec,
    LayerRule,
    Scheme,
    TargetGroup,
    ct_groups,
    ct_names_layer,
    modelopt_quantized_layers,
    rule_for,
)

if TYPE_CHECKING:
    from .checkpoint import TensorInfo

FP8_DTYPES = ("F8_E4M3",)
FP4_DTYPES = ("U8", "F4")
#: Tensor leaves that only exist in quantized layers: one outside a layer nvfp4-fix loads is an error.
QUANT_LEAVES = frozenset(
    {
        "weight_packed",
        "weight_scale",
        "weight_global_scale",
        "weight_scale_2",
        "weight_zero_point",
        "weight_shape",
        "weight_g_idx",
        "input_scale",
        "input_global_scale",
        "input_zero_point",
        "output_scale",
        "pre_quant_scale",
    }
)
#: KV-cache scales: the cache stays 16-bit, which is more precise than the producer's FP8 cache.
KV_CACHE_LEAVES = frozenset({"k_scale", "v_scale"})
#: Integer, 8-bit and 4-bit dtypes never hold a 16-bit model's own parameters.
_QUANT_DTYPES = frozenset({"U8", "I8", "F4", "F8_E4M3", "F8_E5M2", "F8_E8M0"})


@dataclass
class QuantizedModule:
    """One quantized linear (or a stack of experts) found in the checkpoint."""

    prefix: str
    out_features: int
    in_features: int
    experts: int | None = None
    has_input_scale: bool = False
    has_pre_quant_scale: bool = False
    scheme: Scheme = "nvfp4"
    fp8: FP8Spec | None = None  # for scheme "fp8": weight strategy and activation quantization
    packed_dtype: str = "U8"  # NVFP4 codes as stored: "U8" [N, K/2] or safetensors "F4" [N, K]
    # FP8 only: the checkpoint's scale tensors as stored (safetensors dtype names), so the layer built
    # for it holds exactly these and save_pretrained writes them back unchanged
    scale_shape: tuple[int, ...] = ()
    scale_dtype: str = "F32"
    input_scale_shape: tuple[int, ...] | None = None
    input_scale_dtype: str = "F32"

    def describe(self) -> str:
        if self.scheme == "fp8" and self.fp8 is not None:
            return self.fp8.describe()
        return "NVFP4 W4A4" if self.has_input_scale else "NVFP4 W4A16"


def codes_shape(info: TensorInfo) -> tuple[int, ...]:
    """The packed uint8 shape of NVFP4 codes: an F4 tensor's header holds the logical [.., N, K]."""
    if info.dtype == "F4":
        if not info.shape or info.shape[-1] % 2:
            raise CheckpointError(
                f"{info.file}: F4 tensor {info.name!r} has shape {list(info.shape)}; "
                "expected an even last dimension"
            )
        return (*info.shape[:-1], info.shape[-1] // 2)
    return info.shape


def _where(info: TensorInfo) -> str:
    return f"{info.file}: tensor {info.name!r}"


def _rule_text(rule: LayerRule | None) -> str:
    return "no quantization (not targeted, or ignored)" if rule is None else f"{rule.detail} ({rule.source})"


def _nvfp4(fmt: str, prefix: str, w: TensorInfo, t: dict[str, TensorInfo]) -> QuantizedModule:
    shape = codes_shape(w)
    if len(shape) not in (2, 3):
        raise CheckpointError(f"{_where(w)} (packed NVFP4 weight) has shape {list(w.shape)}")
    scale = t.get(prefix + ".weight_scale")
    if scale is None:
        raise CheckpointError(f"{w.file}: {prefix!r} has packed weights but no {prefix}.weight_scale")
    if scale.dtype != "F8_E4M3":
        raise CheckpointError(f"{_where(scale)} must be F8_E4M3, got {scale.dtype}")
    expected = (*shape[:-1], shape[-1] * 2 // 16)
    if shape[-1] * 2 % 16 or scale.shape != expected:
        raise CheckpointError(
            f"{_where(scale)} has shape {list(scale.shape)}; expected {list(expected)} for packed weight "
            f"{list(shape)} (16-element blocks)"
        )
    ct = fmt == COMPRESSED_TENSORS
    global_suffix, act_suffix = (
        (".weight_global_scale", ".input_global_scale") if ct else (".weight_scale_2", ".input_scale")
    )
    glob = t.get(prefix + global_suffix)
    if glob is None:
        raise CheckpointError(f"{w.file}: {prefix!r} has no per-tensor scale {prefix}{global_suffix}")
    if glob.dtype not in ("F32", "F16", "BF16"):
        raise CheckpointError(f"{_where(glob)} must be float32, got {glob.dtype}")
    per_tensor = {1, shape[0] if len(shape) == 3 else 1}  # one scale (per expert for stacked experts)
    for s in (glob, t.get(prefix + act_suffix)):
        if s is not None and s.numel not in per_tensor:
            raise CheckpointError(f"{_where(s)} has shape {list(s.shape)}; expected one per-tensor value")
    return QuantizedModule(
        prefix=prefix,
        out_features=shape[-2],
        in_features=shape[-1] * 2,
        experts=shape[0] if len(shape) == 3 else None,
        has_input_scale=(prefix + act_suffix) in t,
        has_pre_quant_scale=(prefix + ".pre_quant_scale") in t,
        packed_dtype=w.dtype,
    )


def fp8_scale_shape(spec: FP8Spec, n: int, k: int, fmt: str) -> tuple[tuple[int, ...], ...]:
    """The ``weight_scale`` shapes each producer writes for an [n, k] FP8 weight."""
    if spec.weights == "tensor":
        return ((1,),) if fmt == COMPRESSED_TENSORS else ((), (1,))
    if spec.weights == "channel":
        return ((n, 1),) if fmt == COMPRESSED_TENSORS else ((n,), (n, 1))
    assert spec.block is not None
    return ((-(-n // spec.block[0]), -(-k // spec.block[1])),)


def _fp8(fmt: str, prefix: str, w: TensorInfo, rule: LayerRule, t: dict[str, TensorInfo]) -> QuantizedModule:
    spec = rule.fp8
    assert spec is not None
    if len(w.shape) != 2:
        raise CheckpointError(
            f"{_where(w)} is an FP8 weight of shape {list(w.shape)}; nvfp4-fix loads 2-D FP8 linears only"
        )
    n, k = w.shape
    scale = t.get(prefix + ".weight_scale")
    if scale is None:
        raise CheckpointError(f"{_where(w)} is FP8 ({_rule_text(rule)}) but {prefix}.weight_scale is missing")
    if scale.dtype not in ("F32", "BF16", "F16"):
        raise CheckpointError(f"{_where(scale)} must be a float32/bf16/fp16 FP8 scale, got {scale.dtype}")
    shapes = fp8_scale_shape(spec, n, k, fmt)
    if scale.shape not in shapes:
        raise CheckpointError(
            f"{_where(scale)} has shape {list(scale.shape)}; {spec.describe()} ({rule.source}) of an "
            f"{n}x{k} weight expects {' or '.join(str(list(s)) for s in shapes)}"
        )
    inp = t.get(prefix + ".input_scale")
    if spec.activations == "static":
        if inp is None:
            raise CheckpointError(
                f"{w.file}: {prefix!r} has static FP8 activations ({rule.source}) but no {prefix}.input_scale"
            )
        if inp.numel != 1 or inp.dtype not in ("F32", "BF16", "F16"):
            raise CheckpointError(f"{_where(inp)} must be one float value, got {inp.dtype}{list(inp.shape)}")
    elif inp is not None:
        raise CheckpointError(
            f"{_where(inp)} has no place: {prefix!r} is {spec.describe()} ({rule.source}), which takes no "
            "static input scale"
        )
    return QuantizedModule(
        prefix,
        n,
        k,
        has_input_scale=inp is not None,
        scheme="fp8",
        fp8=spec,
        packed_dtype=w.dtype,
        scale_shape=scale.shape,
        scale_dtype=scale.dtype,
        input_scale_shape=None if inp is None else inp.shape,
        input_scale_dtype="F32" if inp is None else inp.dtype,
    )


def _allowed_leaves(fmt: str, q: QuantizedModule) -> frozenset[str]:
    ct = fmt == COMPRESSED_TENSORS
    if q.scheme == "fp8":
        return frozenset({"weight", "weight_scale", "input_scale", "bias"})
    if ct:
        return frozenset(
            {"weight_packed", "weight_scale", "weight_global_scale", "input_global_scale", "bias"}
        )
    return frozenset({"weight", "weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "bias"})


def _check_rule(fmt: str, prefix: str, kind: Scheme, w: TensorInfo, rule: LayerRule | None) -> LayerRule:
    what = {"nvfp4": "packed NVFP4 codes", "fp8": "an FP8 weight"}[kind]
    if rule is None:
        raise CheckpointError(
            f"{_where(w)} holds {what} ({w.dtype}) but the {fmt} config leaves {prefix!r} unquantized; "
            "expected a 16-bit weight or a config entry for this layer"
        )
    if rule.scheme is None:
        raise CheckpointError(
            f"{_where(w)}: layer {prefix!r} is {_rule_text(rule)}, a scheme nvfp4-fix does not load "
            "(it loads NVFP4 and FP8 layers)"
        )
    if rule.scheme != kind:
        raise CheckpointError(
            f"{_where(w)} holds {what} ({w.dtype}) but the config says {prefix!r} is {_rule_text(rule)}"
        )
    return rule


def find_quantized(
    fmt: str, tensors: dict[str, TensorInfo], qc: dict[str, Any] | None = None
) -> dict[str, QuantizedModule]:
    """Every NVFP4 and FP8 module, each checked against the config (``qc``; None: trust the tensors,
    NVFP4 only) and its scales' dtypes and shapes; then every tensor must have a consumer."""
    groups: list[TargetGroup] | None = ct_groups(qc) if qc is not None and fmt == COMPRESSED_TENSORS else None
    nvfp4_suffix = ".weight_packed" if fmt == COMPRESSED_TENSORS else ".weight"
    out: dict[str, QuantizedModule] = {}
    for name, info in tensors.items():
        if name.endswith(nvfp4_suffix) and info.dtype in FP4_DTYPES:
            prefix = name[: -len(nvfp4_suffix)]
            q = _nvfp4(fmt, prefix, info, tensors)
            if qc is not None:
                rule = _check_rule(fmt, prefix, "nvfp4", info, rule_for(fmt, prefix, qc, groups))
                _check_activation_scale(fmt, q, rule, tensors)
            out[prefix] = q
        elif name.endswith(".weight") and info.dtype in FP8_DTYPES and qc is not None:
            prefix = name[: -len(".weight")]
            rule = _check_rule(fmt, prefix, "fp8", info, rule_for(fmt, prefix, qc, groups))
            out[prefix] = _fp8(fmt, prefix, info, rule, tensors)
    if qc is not None:
        _check_consumers(fmt, tensors, out, qc, groups)
    return out


def _check_activation_scale(fmt: str, q: QuantizedModule, rule: LayerRule, t: dict[str, TensorInfo]) -> None:
    if rule.w4a4 == q.has_input_scale:
        return
    leaf = "input_global_scale" if fmt == COMPRESSED_TENSORS else "input_scale"
    packed = t[f"{q.prefix}.{'weight_packed' if fmt == COMPRESSED_TENSORS else 'weight'}"]
    if rule.w4a4:
        raise CheckpointError(
            f"{packed.file}: {q.prefix!r} is {_rule_text(rule)} with NVFP4 activations but has no "
            f"{q.prefix}.{leaf}"
        )
    raise CheckpointError(
        f"{_where(t[f'{q.prefix}.{leaf}'])} has no place: {q.prefix!r} is {_rule_text(rule)}, weight-only"
    )


def _check_consumers(
    fmt: str,
    tensors: dict[str, TensorInfo],
    quantized: dict[str, QuantizedModule],
    qc: dict[str, Any],
    groups: list[TargetGroup] | None,
) -> None:
    for name, info in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        q = quantized.get(prefix)
        if q is not None:
            if leaf not in _allowed_leaves(fmt, q):
                raise CheckpointError(
                    f"{_where(info)} has no place: {prefix!r} is {q.describe()} ({fmt}), whose tensors are "
                    f"{', '.join(sorted(_allowed_leaves(fmt, q)))}"
                )
            continue
        if leaf in KV_CACHE_LEAVES:
            continue
        if leaf in QUANT_LEAVES or info.dtype in _QUANT_DTYPES:
            rule = rule_for(fmt, prefix, qc, groups)
            raise CheckpointError(
                f"{_where(info)} ({info.dtype}{list(info.shape)}) belongs to no layer nvfp4-fix loads: "
                f"{prefix!r} has no NVFP4 codes or FP8 weight, and the config says {_rule_text(rule)}"
            )
        if (
            leaf == "weight"
            and len(info.shape) == 2
            and _names_layer(fmt, prefix, qc, groups)
            and (rule := rule_for(fmt, prefix, qc, groups)) is not None
        ):
            raise CheckpointError(
                f"{_where(info)} is a {info.dtype} weight but the config names {prefix!r} as "
                f"{_rule_text(rule)}; expected its quantized tensors"
            )


def _names_layer(fmt: str, prefix: str, qc: dict[str, Any], groups: list[TargetGroup] | None) -> bool:
    """Whether the config names this layer itself (not only by class or as "everything else")."""
    if groups is not None:
        return ct_names_layer(prefix, groups)
    return prefix in modelopt_quantized_layers(qc)
