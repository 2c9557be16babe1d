"""What an NVFP4 checkpoint folder holds, read from configs and safetensors headers alone.

No tensor data is read here: headers are a few KB even for 100 GB checkpoints.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .classify import QuantizedModule, codes_shape, find_quantized
from .errors import CheckpointError
from .safetensors_header import (
    MAX_HEADER_BYTES,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_TENSOR_ELEMENTS,
    SAFETENSORS_DTYPES,
    TensorInfo,
    parse_json,
    read_header,
    read_json,
)
from .schemes import COMPRESSED_TENSORS, MODELOPT, config_format_name, ct_has_nvfp4, modelopt_has_nvfp4

__all__ = [
    "COMPRESSED_TENSORS",
    "MODELOPT",
    "CheckpointInfo",
    "QuantizedModule",
    "TensorInfo",
    "codes_shape",
    "detect_format",
    "find_quantized",
    "inspect_checkpoint",
    "parse_json",
    "read_header",
    "read_json",
    "require_nvfp4",
    "MAX_HEADER_BYTES",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_TENSOR_ELEMENTS",
    "SAFETENSORS_DTYPES",
]


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

    @property
    def nvfp4(self) -> dict[str, QuantizedModule]:
        return {p: q for p, q in self.quantized.items() if q.scheme == "nvfp4"}

    @property
    def fp8(self) -> dict[str, QuantizedModule]:
        return {p: q for p, q in self.quantized.items() if q.scheme == "fp8"}

    @property
    def format_name(self) -> str | None:
        """The format as the config names it (``nvfp4-pack-quantized``, ``mixed-precision``, ``NVFP4``,
        ``MIXED_PRECISION``)."""
        return config_format_name(self.format, self.quant_config)

    def packed_name(self, prefix: str) -> str:
        return f"{prefix}.weight_packed" if self.format == COMPRESSED_TENSORS else f"{prefix}.weight"


def _obj(x: Any) -> dict[str, Any]:
    """A JSON sub-object, or {} when the field is missing or of another type."""
    return x if isinstance(x, dict) else {}


def _inside(path: Path, root: Path) -> bool:
    """``path`` (a file of the folder ``root``, resolved) stays in it; or, for a folder of a Hugging Face
    cache snapshot (``.../snapshots/<rev>/[subfolder/]``), it is one of that repository's ``blobs/``."""
    real = path.resolve()
    if real.parent == root:
        return True
    snapshots = next((p for p in root.parents if p.name == "snapshots"), None)
    return snapshots is not None and real.parent == snapshots.parent / "blobs"


def weight_files(folder: Path) -> list[Path]:
    """The .safetensors files of a checkpoint, refusing pickles and index entries outside the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    root = folder.resolve()
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: expected a non-empty 'weight_map' object")
        files: list[Path] = []
        for fname in weight_map.values():
            if not isinstance(fname, str) or not fname.endswith(".safetensors"):
                raise CheckpointError(f"{index}: weight_map entry {fname!r} is not a .safetensors file name")
        for fname in dict.fromkeys(weight_map.values()):
            if "/" in fname or "\\" in fname or fname.startswith(".") or "\0" in fname:
                raise CheckpointError(f"{index}: weight_map entry {fname!r} is not a plain file name")
            p = folder / fname
            if not p.is_file():
                raise CheckpointError(f"{index}: shard {fname!r} is missing")
            if not _inside(p, root):
                raise CheckpointError(f"{index}: weight_map file {fname!r} links outside {folder}")
            files.append(p)
        return files
    # dot files are never weights: left-over temporary files, macOS "._" resource forks
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("."))
    for p in files:
        if not _inside(p, root):
            raise CheckpointError(f"{p}: symlink points outside {folder}")
        if not p.is_file():
            raise CheckpointError(f"{p}: not a regular file")
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
        return (COMPRESSED_TENSORS if ct_has_nvfp4(qc) else None), qc
    if hf_quant.exists():
        hq = read_json(hf_quant)
        return (MODELOPT if modelopt_has_nvfp4(hq) else None), hq
    if isinstance(qc, dict) and qc.get("quant_method") == MODELOPT:
        return (MODELOPT if modelopt_has_nvfp4(qc) else None), qc
    return None, qc if isinstance(qc, dict) else {}


def detect_format(folder: str | os.PathLike[str]) -> str | None:
    """COMPRESSED_TENSORS, MODELOPT or None, from config.json and hf_quant_config.json alone."""
    path = Path(folder)
    return _quant_config(path, read_json(path / "config.json"))[0]


def _scheme(fmt: str, qc: dict[str, Any], quantized: dict[str, QuantizedModule]) -> str:
    w4a4 = any(m.has_input_scale for m in quantized.values() if m.scheme == "nvfp4")
    if fmt == COMPRESSED_TENSORS:  # the config agrees: find_quantized checks each layer against it
        return "W4A4" if w4a4 else "W4A16"
    awq = any(m.has_pre_quant_scale for m in quantized.values())
    algo = str(_obj(qc.get("quantization") or qc).get("quant_algo", ""))
    if "AWQ" in algo.upper():
        awq = True
    return ("W4A4" if w4a4 else "W4A16") + ("-AWQ" if awq else "")


def _excluded(fmt: str, qc: dict[str, Any]) -> list[str]:
    if fmt == COMPRESSED_TENSORS:
        ign = qc.get("ignore") or []
    else:
        q = _obj(qc.get("quantization") or qc)
        ign = q.get("exclude_modules") or qc.get("modules_to_not_convert") or []
    return [str(x) for x in ign] if isinstance(ign, list) else []


#: config keys (and their GPT-2 style aliases) whose values size the model transformers builds.
SIZE_KEYS = {
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "vocab_size": None,
    "num_attention_heads": "n_head",
    "num_key_value_heads": None,
    "head_dim": None,
    "num_experts": "num_local_experts",
    "n_routed_experts": None,
    "intermediate_size": None,
}


def _size(cfg: dict[str, Any], key: str, where: str) -> int:
    alias = SIZE_KEYS[key]
    value = cfg.get(key, cfg.get(alias) if alias else None)
    if value is None:
        return 0
    if type(value) is not int or value < 0:
        raise CheckpointError(f"{where}: {key} must be a non-negative integer, got {value!r}")
    return value


def check_config_sizes(path: Path, config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
    """Refuse a config.json that sizes a model far beyond the checkpoint's tensor bytes, before
    transformers builds anything (10^7 layers take hours to build even on the meta device, and some
    buffers are allocated for real). The bound is a loose lower bound on parameters: one
    hidden x hidden matrix per layer, the embedding, one attention layer's query projection, one MLP and
    one router; real models hold ~12x more. A tensor byte holds at most 2 elements (4-bit codes)."""
    where = f"{path / 'config.json'}"
    capacity = 2 * sum(t.nbytes for t in tensors.values())
    subs = [config, *(v for v in config.values() if isinstance(v, dict) and v.get("hidden_size") is not None)]
    bound = 0
    for cfg in subs:
        keys = ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
        h, layers, vocab, inter = (_size(cfg, k, where) for k in keys)
        heads = max(_size(cfg, "num_attention_heads", where), _size(cfg, "num_key_value_heads", where))
        head_dim = _size(cfg, "head_dim", where) or (h // heads if heads else 0)
        experts = max(_size(cfg, "num_experts", where), _size(cfg, "n_routed_experts", where))
        bound = max(bound, layers * h * h + vocab * h + heads * head_dim * h + experts * h + inter * h)
    if bound > 8 * capacity + 2**24:
        raise CheckpointError(
            f"{where}: its sizes imply at least {bound:.3g} parameters but the checkpoint's tensors hold at "
            f"most {capacity:.3g} (absurd or corrupt config?)"
        )


def inspect_checkpoint(
    folder: str | os.PathLike[str], tensors: dict[str, TensorInfo] | None = None
) -> CheckpointInfo:
    """Describe a local checkpoint folder. Raises CheckpointError on anything malformed. ``tensors``: the
    tensor table when the weights are elsewhere (a hub checkpoint read from its headers alone)."""
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint folder with config.json)")
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{path}: no config.json; not a transformers checkpoint folder")
    config = read_json(cfg_path)
    fmt, qc = _quant_config(path, config)
    tensors = tensor_index(path) if tensors is None else tensors
    info = CheckpointInfo(path, fmt, None, config, qc, None, None, tensors)
    if fmt is None:
        return info
    check_config_sizes(path, config, tensors)
    info.quantized = find_quantized(fmt, tensors, qc)
    if not info.nvfp4:
        raise CheckpointError(f"{path}: config says {fmt} NVFP4 but no tensor holds packed NVFP4 weights")
    info.scheme = _scheme(fmt, qc, info.quantized)
    info.excluded = _excluded(fmt, qc)
    if fmt == COMPRESSED_TENSORS:
        info.producer, info.producer_version = "llmcompressor / compressed-tensors", _str(qc.get("version"))
    else:
        producer = _obj(qc.get("producer"))
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
