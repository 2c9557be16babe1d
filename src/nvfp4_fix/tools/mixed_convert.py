"""``convert`` for mixed-precision checkpoints (NVFP4 + FP8 layers): compressed-tensors ``mixed-precision``
config groups <-> ModelOpt ``MIXED_PRECISION`` ``quantized_layers``, where both can express a layer.

ModelOpt's FP8 is per-tensor weights with a static per-tensor input scale; compressed-tensors' FP8
per-channel, block or dynamic activations have no ModelOpt MIXED_PRECISION equivalent and are refused.
FP8 tensors keep their names and bytes; their scales change shape ([1] <-> []) and, toward ModelOpt,
become float32 (exact from bf16)."""

from __future__ import annotations

from typing import Any

from ..checkpoint import COMPRESSED_TENSORS, CheckpointInfo, QuantizedModule
from ..errors import NVFP4Error
from ..schemes import NVFP4_PACKED
from ..writer import MODELOPT_FP8  # the one FP8 kind both layouts express: ModelOpt "FP8"


def is_mixed(info: CheckpointInfo) -> bool:
    return bool(info.fp8) or str(info.format_name).upper() in ("MIXED_PRECISION", "MIXED-PRECISION")


def refuse_unconvertible(info: CheckpointInfo, to: str) -> None:
    for prefix, q in sorted(info.fp8.items()):
        if q.fp8 != MODELOPT_FP8:
            assert q.fp8 is not None
            raise NVFP4Error(
                f"{info.path}: layer {prefix!r} is {q.fp8.describe()}, which has no ModelOpt equivalent "
                f"(ModelOpt FP8 is {MODELOPT_FP8.describe()}); nvfp4-fix loads it as it is, "
                "`nvfp4-fix dequantize` writes it dense"
            )
    awq = [p for p, q in info.nvfp4.items() if q.has_pre_quant_scale]
    if to == COMPRESSED_TENSORS and awq:
        raise NVFP4Error(
            f"{info.path}: {awq[0]}.pre_quant_scale (ModelOpt AWQ) has no compressed-tensors equivalent"
        )


def _algo(q: QuantizedModule) -> str:
    if q.scheme == "fp8":
        return "FP8"
    return "NVFP4" if q.has_input_scale else "W4A16_NVFP4"


def convert_fp8_tensor(info: CheckpointInfo, name: str, tensor: Any) -> Any:
    """An FP8 layer's tensor in the other layout: codes unchanged, a per-tensor scale [1] <-> []."""
    import torch

    leaf = name.rpartition(".")[2]
    if leaf not in ("weight_scale", "input_scale"):
        return tensor
    if info.format == COMPRESSED_TENSORS:  # to ModelOpt: float32 scalars
        return tensor.to(torch.float32).reshape(())
    return tensor.reshape(1)


def modelopt_configs(
    info: CheckpointInfo, exclude: list[str], producer: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """hf_quant_config.json and config.json's quantization_config for a MIXED_PRECISION checkpoint."""
    layers: dict[str, dict[str, Any]] = {}
    for prefix, q in info.quantized.items():
        algo = _algo(q)
        layers[prefix] = {"quant_algo": algo} if algo == "FP8" else {"quant_algo": algo, "group_size": 16}
    section = {
        "quant_algo": "MIXED_PRECISION",
        "kv_cache_quant_algo": None,
        "exclude_modules": exclude,
        "quantized_layers": layers,
    }
    qc = {**section, "producer": producer, "quant_method": "modelopt"}
    return {"producer": producer, "quantization": section}, qc


def _nvfp4_args() -> dict[str, Any]:
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "strategy": "tensor_group",
        "group_size": 16,
        "dynamic": False,
        "scale_dtype": "torch.float8_e4m3fn",
        "block_structure": None,
    }


def _fp8_args(strategy: str) -> dict[str, Any]:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False}


def ct_config(info: CheckpointInfo, ignore: list[str], version: str) -> dict[str, Any]:
    """A compressed-tensors ``mixed-precision`` quantization_config: one group per layer kind, each
    targeting its layers by exact name (the most specific target, whatever else the model holds)."""
    kinds: dict[str, list[str]] = {}
    for prefix, q in sorted(info.quantized.items()):
        kinds.setdefault(_algo(q), []).append(prefix)
    groups: dict[str, Any] = {}
    for i, (algo, targets) in enumerate(sorted(kinds.items())):
        if algo == "FP8":
            group = {
                "format": "float-quantized",
                "weights": _fp8_args("tensor"),
                "input_activations": _fp8_args("tensor"),
            }
        else:
            acts = dict(_nvfp4_args(), dynamic="local") if algo == "NVFP4" else None
            group = {"format": NVFP4_PACKED, "weights": _nvfp4_args(), "input_activations": acts}
        groups[f"group_{i}"] = {"targets": targets, "output_activations": None, **group}
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": COMPRESSED_TENSORS,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": version,
    }
