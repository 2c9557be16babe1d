"""nvfp4-fix: NVFP4 checkpoints (compressed-tensors and ModelOpt) in transformers, packed and fast.

    from nvfp4_fix import apply_patch
    apply_patch()
    model = AutoModelForCausalLM.from_pretrained(path)   # NVFP4 layers stay packed

Attributes load lazily so that the start-up hook can import this package at no cost.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "apply_patch": "patch",
    "remove_patch": "patch",
    "is_patched": "patch",
    "patch_status": "patch",
    "enable_low_memory_mode": "patch",
    "from_pretrained": "loading",
    "generate": "generation",
    "NVFP4Linear": "layer",
    "NVFP4Embedding": "embedding",
    "inspect_checkpoint": "checkpoint",
    "NVFP4Error": "errors",
    "CheckpointError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'nvfp4_fix' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
