"""Safetensors headers and JSON configs read as untrusted input: validated as safetensors itself
validates them (so whatever passes here safetensors loads), every failure one CheckpointError line."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)
MAX_TENSOR_ELEMENTS = 2**40
MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 64  # real configs nest ~5 deep; deeper input would make later copies recurse

#: Bits per element of each safetensors dtype that torch can load.
SAFETENSORS_DTYPES: dict[str, int] = {
    "F4": 4,
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}


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


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (x.values() if isinstance(x, dict) else x))
    return deepest


def parse_json(raw: bytes, where: str, strict: bool = False) -> Any:
    """JSON from untrusted bytes; every failure is a one-line CheckpointError. ``strict`` (safetensors
    headers) also refuses NaN/Infinity and duplicate keys, as safetensors itself does."""
    try:
        hooks = {"parse_constant": _no_constant, "object_pairs_hook": _no_duplicates}
        data = json.loads(raw.decode("utf-8"), **(hooks if strict else {}))  # type: ignore[arg-type]
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, huge ints
        raise CheckpointError(f"{where}: not valid UTF-8 JSON ({e})") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def read_json(path: Path) -> dict[str, Any]:
    try:
        if not path.is_file():  # a FIFO or device would block or never end
            raise CheckpointError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: JSON file larger than {MAX_JSON_BYTES} bytes")
    data = parse_json(raw, str(path))
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensor table of one .safetensors file, validated as safetensors itself validates it (so
    whatever passes here safetensors loads): offsets tile the data region exactly, no duplicates."""
    try:
        if not path.is_file():
            raise CheckpointError(f"{path}: not a regular file")
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
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    header = parse_json(raw, f"{path}: safetensors header", strict=True)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name != "__metadata__":
            out[name] = _tensor_info(path, name, entry, data_size)
    end = 0
    for t in sorted(out.values(), key=lambda t: t.offsets):
        if t.offsets[0] != end:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} starts at byte {t.offsets[0]} of the data region, expected "
                f"{end} (tensors must tile it without gaps or overlaps)"
            )
        end = t.offsets[1]
    if end != data_size:
        raise CheckpointError(
            f"{path}: tensors cover {end} of the {data_size} data bytes (truncated or corrupt file?)"
        )
    return out


def _tensor_info(path: Path, name: str, meta: Any, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: header entry must be an object")
    dtype, shape, offs = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:  # (a list is unhashable)
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
    bits = numel * SAFETENSORS_DTYPES[dtype]
    if bits % 8:
        raise CheckpointError(f"{where}: {dtype}{shape} is not a whole number of bytes")
    expected = bits // 8
    if not (0 <= begin <= end <= data_size) or end - begin != expected:
        raise CheckpointError(
            f"{where}: data offsets {offs} do not hold {expected} bytes of {dtype}{shape} "
            f"within the {data_size}-byte data region (truncated or corrupt file?)"
        )
    return TensorInfo(name, dtype, tuple(shape), path, (begin, end))
