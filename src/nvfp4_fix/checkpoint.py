"""What an NVFP4 checkpoint folder holds, read from configs and safetensors headers alone.

No tensor data is read here: headers are a few KB even for 100 GB checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError

COMPRESSED_TENSORS = "compressed-tensors"
MODELOPT = "modelopt"

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_TENSOR_ELEMENTS = 2**40
MAX_JSON_BYTES = 64 * 1024 * 1024

SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


@dataclass
class QuantizedModule:
    """One NVFP4 linear (or a stack of experts) found in the checkpoint."""

    prefix: str
    out_features: int
    in_features: int
    experts: int | None = None
    has_input_scale: bool = False
    has_pre_quant_scale: bool = False


@dataclass
class CheckpointInfo:
    path: Path
    format: str | None  # COMPRESSED_TENSORS, MODELOPT, or None when not NVFP4
    scheme: str | None  # "W4A16" (weight-only), "W4A4", or "W4A16-AWQ"/"W4A4-AWQ" for ModelOpt AWQ
    config: dict[str, Any]
    quant_config: dict[str, Any]
    producer: str | None
    producer_version: str | None
    tensors: dict[str, TensorInfo]
    quantized: dict[str, QuantizedModule] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)

    @property
    def weight_only(self) -> bool:
        return self.scheme is not None and self.scheme.startswith("W4A16")

    def packed_name(self, prefix: str) -> str:
        return f"{prefix}.weight_packed" if self.format == COMPRESSED_TENSORS else f"{prefix}.weight"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: JSON file larger than {MAX_JSON_BYTES} bytes")
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensor table of one .safetensors file, validated against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file size {size}")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor_info(path, name, meta, data_size)
    return out


def _tensor_info(path: Path, name: str, meta: Any, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: header entry must be an object")
    dtype, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
        raise CheckpointError(f"{where}: data_offsets must be two integers, got {offs!r}")
    numel = 1
    for d in shape:
        numel *= d
    if numel > MAX_TENSOR_ELEMENTS:
        raise CheckpointError(f"{where}: {numel} elements is beyond any real model")
    begin, end = offs
    expected = numel * SAFETENSORS_DTYPES[dtype]
    if not (0 <= begin <= end <= data_size) or end - begin != expected:
        raise CheckpointError(
            f"{where}: data offsets {offs} do not hold {expected} bytes of {dtype}{shape} "
            f"within the {data_size}-byte data region (truncated or corrupt file?)"
        )
    return TensorInfo(name, dtype, tuple(shape), path, (begin, end))


def weight_files(folder: Path) -> list[Path]:
    """The .safetensors files of a checkpoint, refusing pickles and index entries outside the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    root = folder.resolve()
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: expected a non-empty 'weight_map' object")
        files: list[Path] = []
        for fname in dict.fromkeys(weight_map.values()):
            if not isinstance(fname, str) or not fname.endswith(".safetensors"):
                raise CheckpointError(f"{index}: weight_map entry {fname!r} is not a .safetensors file name")
            p = (folder / fname).resolve()
            if os.path.isabs(fname) or p.parent != root:
                raise CheckpointError(f"{index}: weight_map file {fname!r} points outside {folder}")
            if not p.is_file():
                raise CheckpointError(f"{index}: shard {fname!r} is missing")
            files.append(p)
        return files
    files = sorted(p for p in folder.glob("*.safetensors"))
    for p in files:
        if p.resolve().parent != root:
            raise CheckpointError(f"{p}: symlink points outside {folder}")
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{folder}: weights are pickle files ({', '.join(pickles[:3])}); nvfp4-fix reads only "
            "safetensors (convert them with transformers' save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json found")


def tensor_index(folder: Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in weight_files(folder):
        for name, info in read_header(f).items():
            if name in tensors:
                raise CheckpointError(f"{f}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = info
    return tensors


def _quant_config(folder: Path, config: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    qc = config.get("quantization_config")
    hf_quant = folder / "hf_quant_config.json"
    if isinstance(qc, dict) and qc.get("quant_method") == COMPRESSED_TENSORS:
        return (COMPRESSED_TENSORS if qc.get("format") == "nvfp4-pack-quantized" or _ct_is_nvfp4(qc) else None), qc
    if hf_quant.exists():
        hq = _read_json(hf_quant)
        algo = (hq.get("quantization") or {}).get("quant_algo")
        return (MODELOPT if _modelopt_is_nvfp4(algo, hq.get("quantization") or {}) else None), hq
    if isinstance(qc, dict) and qc.get("quant_method") == MODELOPT:
        algo = qc.get("quant_algo") or (qc.get("quantization") or {}).get("quant_algo")
        return (MODELOPT if _modelopt_is_nvfp4(algo, qc) else None), qc
    return None, qc if isinstance(qc, dict) else {}


def _ct_is_nvfp4(qc: dict[str, Any]) -> bool:
    groups = qc.get("config_groups") or {}
    return any(
        isinstance(g, dict) and g.get("format") == "nvfp4-pack-quantized" for g in groups.values()
    )


def _modelopt_is_nvfp4(algo: Any, q: dict[str, Any]) -> bool:
    if isinstance(algo, str) and "NVFP4" in algo.upper():
        return True
    layers = q.get("quantized_layers") or {}
    return isinstance(layers, dict) and any(
        isinstance(v, dict) and "NVFP4" in str(v.get("quant_algo", "")).upper() for v in layers.values()
    )


def _scheme(fmt: str, qc: dict[str, Any], quantized: dict[str, QuantizedModule]) -> str:
    w4a4 = any(m.has_input_scale for m in quantized.values())
    if fmt == COMPRESSED_TENSORS:
        groups = qc.get("config_groups") or {}
        w4a4 = w4a4 or any(isinstance(g, dict) and g.get("input_activations") for g in groups.values())
        return "W4A4" if w4a4 else "W4A16"
    awq = any(m.has_pre_quant_scale for m in quantized.values())
    algo = str((qc.get("quantization") or qc).get("quant_algo", ""))
    if "AWQ" in algo.upper():
        awq = True
    return ("W4A4" if w4a4 else "W4A16") + ("-AWQ" if awq else "")


def _shape_of(info: TensorInfo, what: str, ndim: tuple[int, ...]) -> tuple[int, ...]:
    if len(info.shape) not in ndim:
        raise CheckpointError(f"{info.file}: tensor {info.name!r} ({what}) has shape {list(info.shape)}")
    return info.shape


def find_quantized(fmt: str, tensors: dict[str, TensorInfo]) -> dict[str, QuantizedModule]:
    """Every NVFP4 module, checked: uint8 codes [.., N, K/2], e4m3 scales [.., N, K/16], a global scale."""
    if fmt == COMPRESSED_TENSORS:
        packed_suffix, global_suffix, act_suffix = ".weight_packed", ".weight_global_scale", ".input_global_scale"
    else:
        packed_suffix, global_suffix, act_suffix = ".weight", ".weight_scale_2", ".input_scale"
    out: dict[str, QuantizedModule] = {}
    for name, info in tensors.items():
        if not name.endswith(packed_suffix) or info.dtype != "U8":
            continue
        prefix = name[: -len(packed_suffix)]
        shape = _shape_of(info, "packed weight", (2, 3))
        scale = tensors.get(prefix + ".weight_scale")
        if scale is None:
            raise CheckpointError(f"{info.file}: {prefix!r} has packed weights but no {prefix}.weight_scale")
        if scale.dtype != "F8_E4M3":
            raise CheckpointError(f"{scale.file}: tensor {scale.name!r} must be F8_E4M3, got {scale.dtype}")
        expected = (*shape[:-1], shape[-1] * 2 // 16)
        if shape[-1] * 2 % 16 or scale.shape != expected:
            raise CheckpointError(
                f"{scale.file}: tensor {scale.name!r} has shape {list(scale.shape)}; expected "
                f"{list(expected)} for packed weight {list(shape)} (16-element blocks)"
            )
        glob = tensors.get(prefix + global_suffix)
        if glob is None:
            raise CheckpointError(f"{info.file}: {prefix!r} has no per-tensor scale {prefix}{global_suffix}")
        if glob.dtype not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{glob.file}: tensor {glob.name!r} must be float32, got {glob.dtype}")
        out[prefix] = QuantizedModule(
            prefix=prefix,
            out_features=shape[-2],
            in_features=shape[-1] * 2,
            experts=shape[0] if len(shape) == 3 else None,
            has_input_scale=(prefix + act_suffix) in tensors,
            has_pre_quant_scale=(prefix + ".pre_quant_scale") in tensors,
        )
    return out


def _excluded(fmt: str, qc: dict[str, Any]) -> list[str]:
    if fmt == COMPRESSED_TENSORS:
        ign = qc.get("ignore") or []
    else:
        ign = (qc.get("quantization") or qc).get("exclude_modules") or qc.get("modules_to_not_convert") or []
    return [str(x) for x in ign] if isinstance(ign, list) else []


def inspect_checkpoint(folder: str | os.PathLike[str]) -> CheckpointInfo:
    """Describe a local checkpoint folder. Raises CheckpointError on anything malformed."""
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint folder with config.json)")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no config.json; not a transformers checkpoint folder")
    config = _read_json(cfg_path)
    fmt, qc = _quant_config(path, config)
    tensors = tensor_index(path)
    info = CheckpointInfo(path, fmt, None, config, qc, None, None, tensors)
    if fmt is None:
        return info
    info.quantized = find_quantized(fmt, tensors)
    if not info.quantized:
        raise CheckpointError(f"{path}: config says {fmt} NVFP4 but no tensor holds packed NVFP4 weights")
    info.scheme = _scheme(fmt, qc, info.quantized)
    info.excluded = _excluded(fmt, qc)
    if fmt == COMPRESSED_TENSORS:
        info.producer, info.producer_version = "llmcompressor / compressed-tensors", _str(qc.get("version"))
    else:
        producer = qc.get("producer") or {}
        info.producer = _str(producer.get("name")) or "modelopt"
        info.producer_version = _str(producer.get("version"))
    return info


def _str(x: Any) -> str | None:
    return str(x) if x is not None else None


def require_nvfp4(folder: str | os.PathLike[str]) -> CheckpointInfo:
    info = inspect_checkpoint(folder)
    if info.format is None:
        qm = info.quant_config.get("quant_method") or info.quant_config.get("quant_algo")
        what = f"quantization {qm!r}" if qm else "no quantization_config and no hf_quant_config.json"
        raise CheckpointError(
            f"{info.path}: not an NVFP4 checkpoint ({what}); expected compressed-tensors "
            "'nvfp4-pack-quantized' or ModelOpt quant_algo NVFP4"
        )
    return info


def layer_pattern(prefix: str) -> str:
    """Collapse layer indices: model.layers.17.mlp.up_proj -> model.layers.*.mlp.up_proj."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", prefix)
