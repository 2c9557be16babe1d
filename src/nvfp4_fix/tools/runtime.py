"""Loading a checkpoint for verify/generate/bench: progress over shards, load errors as one line."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

from ..checkpoint import CheckpointInfo, require_nvfp4
from ..errors import CheckpointError, NVFP4Error
from . import progress
from .analysis import require_consistent

DTYPE_NAMES = {
    "auto": "auto",
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "float32": "float32",
}


def load(
    path: str, device: str = "cpu", dtype: str = "auto", quantize_lm_head: bool = False
) -> tuple[Any, CheckpointInfo, float]:
    """(model, checkpoint info, seconds) via nvfp4_fix.loading.from_pretrained, layers packed (the
    lm_head too with ``quantize_lm_head``: lossy, see from_pretrained)."""
    info = require_nvfp4(path)
    require_consistent(info)
    if dtype not in DTYPE_NAMES:
        raise NVFP4Error(f"--dtype must be one of bf16, fp16, fp32 or auto, got {dtype!r}")
    from ..loading import from_pretrained

    start = time.perf_counter()
    try:
        model_class = _model_class(info)
        with progress.transformers_bars():
            model = from_pretrained(
                info.path,
                model_class,
                dtype=_resolve(dtype, info),
                device_map=device,
                quantize_lm_head=quantize_lm_head,
            )
    except NVFP4Error:
        raise
    except Exception as e:  # transformers refusing this config/architecture: one line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{info.path}: cannot load ({type(e).__name__}: {first})") from None
    return model, info, time.perf_counter() - start


def _resolve(dtype: str, info: CheckpointInfo) -> Any:
    """The torch dtype to load in; "auto": config.json's where it is one a packed model computes in,
    else bfloat16. Resolved here: transformers 4.57 hands names ("auto", "bfloat16") to the quantizer."""
    import torch

    name = DTYPE_NAMES[dtype]
    if name == "auto":
        saved = info.config.get("dtype") or info.config.get("torch_dtype")
        name = saved if saved in ("bfloat16", "float16", "float32") else "bfloat16"
    return getattr(torch, name)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "tiktoken.model",
)


def _model_class(info: CheckpointInfo) -> Any:
    """The class config.json names (e.g. LlavaForConditionalGeneration), else AutoModelForCausalLM."""
    import transformers

    from .analysis import architecture

    arch = architecture(info.config)
    cls = getattr(transformers, arch, None) if arch else None
    return cls if isinstance(cls, type) else None


def tokenizer(path: Any) -> Any | None:
    """The checkpoint's tokenizer, or None when it has none (or transformers cannot build it)."""
    from pathlib import Path

    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError, ImportError):
        return None


def peak_memory(device: Any) -> tuple[int, str]:
    """(bytes, what was measured): CUDA peak allocated on a GPU, else the process's peak RSS."""
    import torch

    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(dev), "peak CUDA memory allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "peak process RSS"


def reset_peak(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(device)


def weight_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
