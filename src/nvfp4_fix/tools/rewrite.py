"""``dequantize`` (NVFP4 -> plain dense checkpoint) and ``convert`` (compressed-tensors <-> ModelOpt).

Both read the input one tensor at a time (safetensors is memory-mapped), write shard by shard into a
temporary folder beside OUT and rename it into place only when everything is written.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from pathlib import Path
from typing import Any

from .. import __version__
from ..checkpoint import COMPRESSED_TENSORS, MODELOPT, CheckpointInfo, QuantizedModule, require_nvfp4
from ..errors import CheckpointError, NVFP4Error
from ..fsutil import atomic_directory
from . import mixed_convert, progress
from .analysis import FLOAT_DTYPES, modelopt_section, module_of, quant_algo, require_consistent
from .files import ShardWriter, check_output, copy_side_files, write_json

DTYPES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}
ROWS_PER_CHUNK = 4096


class _Reader:
    """One tensor at a time from any shard. The data is memory-mapped and pages read stay in the RSS
    until the file is closed: ``release()`` closes every handle (called after each input shard)."""

    def __init__(self, info: CheckpointInfo) -> None:
        self.info = info
        self.stack = contextlib.ExitStack()
        self.handles: dict[Path, Any] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        self.stack.close()
        self.stack = contextlib.ExitStack()
        self.handles = {}

    def get(self, name: str) -> Any:
        from safetensors import safe_open

        t = self.info.tensors[name]
        try:
            if t.file not in self.handles:
                self.handles[t.file] = self.stack.enter_context(
                    safe_open(str(t.file), framework="pt", device="cpu")
                )
            return self.handles[t.file].get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{t.file}: cannot read tensor {name!r} ({e})") from None


def _by_file(info: CheckpointInfo) -> list[tuple[Path, list[str]]]:
    files: dict[Path, list[str]] = {}
    for name, t in sorted(info.tensors.items(), key=lambda kv: (kv[1].file, kv[1].offsets[0])):
        files.setdefault(t.file, []).append(name)
    return list(files.items())


# ---------------------------------------------------------------------------------------------- dequantize


def dense_weight(reader: _Reader, prefix: str, dtype: Any) -> Any:
    """The dense [.., N, K] weight of one NVFP4 module in ``dtype``, dequantized in float32 row chunks;
    an AWQ ``pre_quant_scale`` is folded into the columns (x*s @ W.T == x @ (W*s).T)."""
    import torch

    from ..codec import dequantize

    info = reader.info
    packed = reader.get(info.packed_name(prefix)).view(torch.uint8)  # safetensors F4 reads as float4 pairs
    scale = reader.get(prefix + ".weight_scale")
    ct = info.format == COMPRESSED_TENSORS
    glob = reader.get(prefix + (".weight_global_scale" if ct else ".weight_scale_2")).to(torch.float32)
    mul = (1.0 / glob) if ct else glob
    pqs_name = prefix + ".pre_quant_scale"
    pqs = reader.get(pqs_name).to(torch.float32) if pqs_name in info.tensors else None
    lead = packed.shape[:-2]
    packed2, scale2 = packed.reshape(-1, *packed.shape[-2:]), scale.reshape(-1, *scale.shape[-2:])
    muls = mul.reshape(-1) if mul.numel() > 1 else mul.reshape(1).expand(packed2.shape[0])
    n, k = packed.shape[-2], packed.shape[-1] * 2
    out = torch.empty((packed2.shape[0], n, k), dtype=dtype)
    for e in range(packed2.shape[0]):
        for r in range(0, n, ROWS_PER_CHUNK):
            w = dequantize(
                packed2[e, r : r + ROWS_PER_CHUNK],
                scale2[e, r : r + ROWS_PER_CHUNK],
                muls[e],
                "multiplier",
                torch.float32,
            )
            if pqs is not None:
                w = w * pqs
            out[e, r : r + ROWS_PER_CHUNK] = w.to(dtype)
    return out.reshape(*lead, n, k)


def dense_fp8_weight(reader: _Reader, q: QuantizedModule, dtype: Any) -> Any:
    """The dense [N, K] weight of one FP8 module in ``dtype``, dequantized in float32 row chunks."""
    import torch

    from ..fp8 import dequantize_fp8

    assert q.fp8 is not None
    weight, scale = reader.get(q.prefix + ".weight"), reader.get(q.prefix + ".weight_scale")
    n = weight.shape[0]
    out = torch.empty(weight.shape, dtype=dtype)
    for r in range(0, n, ROWS_PER_CHUNK):
        out[r : r + ROWS_PER_CHUNK] = dequantize_fp8(
            weight, scale, q.fp8, dtype, (r, min(n, r + ROWS_PER_CHUNK))
        )
    return out


def dequantize_checkpoint(
    path: str | Path,
    out: str | Path,
    dtype: str = "bf16",
    force: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
) -> dict[str, Any]:
    import torch

    if dtype not in DTYPES:
        raise NVFP4Error(f"--dtype must be one of bf16, fp16, fp32, got {dtype!r}")
    torch_dtype = getattr(torch, DTYPES[dtype])
    info = require_nvfp4(path)
    require_consistent(info)
    out = Path(out)
    check_output(info.path, out, force)
    written = 0
    with atomic_directory(out, force) as tmp, _Reader(info) as reader:
        shards = ShardWriter(tmp, max_shard_bytes)
        items = [(file, name) for file, names in _by_file(info) for name in names]
        current = None
        for file, name in progress.track(items, desc="dequantizing", unit="tensor"):
            if file != current:
                reader.release()
                current = file
            prefix, leaf = module_of(name), name.rpartition(".")[2]
            if prefix in info.fp8:
                if leaf == "weight":
                    shards.add(name, dense_fp8_weight(reader, info.fp8[prefix], torch_dtype))
                    written += 1
                elif leaf == "bias":
                    shards.add(name, reader.get(name).to(torch_dtype))
                continue  # weight and input scales are folded or dropped
            if prefix in info.quantized:
                if name == info.packed_name(prefix):
                    shards.add(prefix + ".weight", dense_weight(reader, prefix, torch_dtype))
                    written += 1
                elif leaf == "bias":
                    shards.add(name, reader.get(name).to(torch_dtype))
                continue  # block/global/input scales and pre_quant_scale are folded or dropped
            t = reader.get(name)
            shards.add(name, t.to(torch_dtype) if info.tensors[name].dtype in FLOAT_DTYPES else t)
        files = shards.finish()
        config = copy.deepcopy(info.config)
        config.pop("quantization_config", None)
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
        for k in keys:
            config[k] = DTYPES[dtype]
        write_json(tmp / "config.json", config)
        copied = copy_side_files(info.path, tmp)
    return {
        "out": str(out),
        "layers": written,
        "files": files,
        "copied": copied,
        "dropped_activation_quantization": (info.scheme is not None and info.scheme.startswith("W4A4"))
        or any(q.fp8 is not None and q.fp8.activations != "none" for q in info.fp8.values()),
    }


# ---------------------------------------------------------------------------------------------- convert

_CT_TO_MO = {
    "weight_packed": "weight",
    "weight_global_scale": "weight_scale_2",
    "input_global_scale": "input_scale",
}
_MO_TO_CT = {v: k for k, v in _CT_TO_MO.items()}
_KEEP = {"weight_scale", "bias"}


def _glob_to_regex(pattern: str) -> str:
    return "re:" + fnmatch.translate(pattern).removeprefix("(?s:").removesuffix(")\\Z") + "$"


def _ct_ignore(info: CheckpointInfo) -> list[str]:
    """ModelOpt exclude_modules (fnmatch patterns) as a compressed-tensors ignore list, plus every 2-D
    weight the checkpoint leaves unquantized (compressed-tensors expects every other Linear packed)."""
    ignore: list[str] = []
    for pat in info.excluded:
        ignore.append(_glob_to_regex(pat) if any(c in pat for c in "*?[") else pat)
    globs = list(info.excluded)
    for name, t in info.tensors.items():
        m = module_of(name)
        if name.endswith(".weight") and len(t.shape) == 2 and m not in info.quantized:
            if (
                not any(fnmatch.fnmatchcase(m, g) or m == g or m.endswith("." + g) for g in globs)
                and m not in ignore
            ):
                ignore.append(m)
    return ignore


def _modelopt_exclude(info: CheckpointInfo) -> list[str]:
    """compressed-tensors ignore (names, suffixes or 're:' regexes) as ModelOpt fnmatch patterns: the
    plain names, plus the unquantized 2-D weights collapsed per layer (regexes have no glob form)."""
    from ..checkpoint import layer_pattern

    exclude = [x for x in info.excluded if not x.startswith("re:")]
    for name, t in info.tensors.items():
        m = module_of(name)
        if name.endswith(".weight") and len(t.shape) == 2 and m not in info.quantized:
            pat = layer_pattern(m)
            if pat not in exclude and not any(m == x or m.endswith("." + x) for x in exclude):
                exclude.append(pat)
    return exclude


def _refuse_unconvertible(info: CheckpointInfo, to: str) -> None:
    if info.format == to:
        raise NVFP4Error(f"{info.path}: already in the {to} layout; nothing to convert")
    if mixed_convert.is_mixed(info):
        mixed_convert.refuse_unconvertible(info, to)
    elif to == COMPRESSED_TENSORS:
        awq = [p for p, q in info.quantized.items() if q.has_pre_quant_scale]
        if awq:
            raise NVFP4Error(
                f"{info.path}: {len(awq)} layers carry a ModelOpt AWQ pre_quant_scale "
                f"(e.g. {awq[0]}.pre_quant_scale); compressed-tensors has no equivalent "
                "(load it with nvfp4-fix or vLLM, or `nvfp4-fix dequantize`)"
            )
        q = modelopt_section(info)
        if q.get("kv_cache_quant_algo"):
            raise NVFP4Error(
                f"{info.path}: FP8 KV-cache scales (kv_cache_quant_algo "
                f"{q['kv_cache_quant_algo']!r}) are not converted to compressed-tensors"
            )
        layers = q.get("quantized_layers") if isinstance(q.get("quantized_layers"), dict) else {}
        other = sorted({str(v.get("quant_algo")) for v in layers.values() if isinstance(v, dict)} - {"NVFP4"})
        if other:
            raise NVFP4Error(
                f"{info.path}: mixed-precision checkpoint with {', '.join(other)} layers; "
                "only NVFP4 layers can be converted"
            )
    for prefix in info.quantized:
        for name in (n for n in info.tensors if module_of(n) == prefix):
            leaf = name.rpartition(".")[2]
            if (
                leaf not in _KEEP
                and leaf not in _CT_TO_MO
                and leaf not in _MO_TO_CT
                and leaf != "pre_quant_scale"
            ):
                raise NVFP4Error(f"{info.tensors[name].file}: tensor {name!r} has no {to} equivalent")


def _convert_tensor(info: CheckpointInfo, name: str, tensor: Any) -> tuple[str, Any]:
    """New name and value: packed bytes and block scales unchanged, per-tensor scales inverted
    (compressed-tensors divides by its global scales, ModelOpt multiplies: g_ct = 1 / s_modelopt)."""
    import torch

    prefix, _, leaf = name.rpartition(".")
    if prefix in info.fp8:
        return name, mixed_convert.convert_fp8_tensor(info, name, tensor)
    if prefix not in info.quantized or leaf in _KEEP:
        return name, tensor
    to_mo = info.format == COMPRESSED_TENSORS
    new_leaf = (_CT_TO_MO if to_mo else _MO_TO_CT)[leaf]
    if new_leaf in ("weight", "weight_packed"):
        return f"{prefix}.{new_leaf}", tensor
    inv = (1.0 / tensor.to(torch.float64)).to(torch.float32)
    if info.quantized[prefix].experts is None:
        inv = inv.reshape(()) if to_mo else inv.reshape(1)
    return f"{prefix}.{new_leaf}", inv


def _modelopt_configs(info: CheckpointInfo) -> tuple[dict[str, Any], dict[str, Any]]:
    w4a4 = not info.weight_only
    algo = "NVFP4" if w4a4 else "W4A16_NVFP4"
    exclude = _modelopt_exclude(info)
    # vLLM recognises hf_quant_config.json by producer name "modelopt"; the version says who wrote it.
    producer = {
        "name": "modelopt",
        "version": f"nvfp4-fix {__version__} convert (from compressed-tensors "
        f"{info.producer_version or 'unknown'})",
    }
    hf_quant = {
        "producer": producer,
        "quantization": {
            "quant_algo": algo,
            "kv_cache_quant_algo": None,
            "group_size": 16,
            "exclude_modules": exclude,
        },
    }
    spec = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    group: dict[str, Any] = {"weights": spec, "targets": ["Linear"]}
    if w4a4:
        group = {"input_activations": spec, **group}
    qc = {
        "config_groups": {"group_0": group},
        "ignore": exclude,
        "quant_algo": algo,
        "producer": producer,
        "quant_method": MODELOPT,
    }
    return hf_quant, qc


def convert_checkpoint(path: str | Path, out: str | Path, to: str, force: bool = False) -> dict[str, Any]:
    from ..writer import ct_quantization_config

    if to not in (COMPRESSED_TENSORS, MODELOPT):
        raise NVFP4Error(f"--to must be {COMPRESSED_TENSORS} or {MODELOPT}, got {to!r}")
    info = require_nvfp4(path)
    require_consistent(info)
    _refuse_unconvertible(info, to)
    out = Path(out)
    check_output(info.path, out, force)
    with atomic_directory(out, force) as tmp, _Reader(info) as reader:
        shards = ShardWriter(tmp, max_bytes=1 << 62)  # one output shard per input shard
        files = _by_file(info)
        for _, names in progress.track(files, desc="converting", unit="shard"):
            for name in names:
                shards.add(*_convert_tensor(info, name, reader.get(name)))
            shards.flush()
            reader.release()
        written = shards.finish()
        config = copy.deepcopy(info.config)
        mixed = mixed_convert.is_mixed(info)
        if to == COMPRESSED_TENSORS:
            version = f"nvfp4-fix {__version__} convert (from modelopt {quant_algo(info)})"
            if mixed:
                qc = mixed_convert.ct_config(info, _ct_ignore(info), version)
            else:
                qc = ct_quantization_config(_ct_ignore(info), w4a4=not info.weight_only)
                qc["version"] = version
            config["quantization_config"] = qc
        else:
            hf_quant, qc = _modelopt_configs(info)
            if mixed:
                hf_quant, qc = mixed_convert.modelopt_configs(info, _modelopt_exclude(info), qc["producer"])
            config["quantization_config"] = qc
            write_json(tmp / "hf_quant_config.json", hf_quant)
        write_json(tmp / "config.json", config)
        copied = copy_side_files(info.path, tmp)
    return {"out": str(out), "to": to, "layers": len(info.quantized), "files": written, "copied": copied}
