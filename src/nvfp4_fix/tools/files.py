"""Output folders for dequantize/convert: refuse to write into the input, copy side files, write shards."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import NVFP4Error

#: Files that describe the weights themselves: each command writes its own.
WEIGHT_FILES = {"config.json", "hf_quant_config.json", "model.safetensors.index.json", "recipe.yaml"}
PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".safetensors")


def check_output(src: Path, out: Path, force: bool) -> None:
    """OUT must not be PATH, lie inside it, or contain it; an existing non-empty OUT needs --force."""
    s, o = Path(src).resolve(), Path(out).resolve()
    if o == s:
        raise NVFP4Error(f"{out}: OUT is the input checkpoint itself; write to another folder")
    if s in o.parents:
        raise NVFP4Error(f"{out}: OUT is inside the input checkpoint {src}; write to another folder")
    if o in s.parents:
        raise NVFP4Error(
            f"{out}: OUT contains the input checkpoint {src}; replacing it would delete the input"
        )
    if out.exists() and not out.is_dir():
        raise NVFP4Error(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise NVFP4Error(f"{out}: output folder exists and is not empty (use --force to replace it)")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, generation config, chat template, processor configs, README etc. (top level only)."""
    copied = []
    for f in sorted(Path(src).iterdir()):
        if not f.is_file() or f.name.startswith(".") or f.name in WEIGHT_FILES or f.suffix in PICKLES:
            continue
        shutil.copyfile(f, dst / f.name)
        copied.append(f.name)
    return copied


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


class ShardWriter:
    """Collects tensors and writes them as safetensors shards: ``flush()`` ends a shard (or it ends by
    itself past ``max_bytes``); ``finish()`` names them model-0000i-of-0000n and writes the index."""

    def __init__(self, folder: Path, max_bytes: int = 5 * 1024**3) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, Any] = {}
        self.size = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: Any) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        part = self.folder / f".part-{len(self.parts):05d}.safetensors"
        try:
            save_file(self.pending, str(part), metadata={"format": "pt"})
        except Exception as e:  # safetensors reports a full disk or EFBIG as SafetensorError, not OSError
            raise NVFP4Error(f"{part}: cannot write ({e})") from None
        self.parts.append((part, list(self.pending)))
        self.pending, self.size = {}, 0

    def finish(self) -> list[str]:
        self.flush()
        n = len(self.parts)
        names = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        weight_map: dict[str, str] = {}
        for (part, keys), name in zip(self.parts, names, strict=True):
            os.replace(part, self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        if n > 1:
            write_json(
                self.folder / "model.safetensors.index.json",
                {"metadata": {"total_size": self.total}, "weight_map": weight_map},
            )
        return names
