"""apply_patch / remove_patch: the in-process switch for nvfp4-fix's fixes (re-exported by the package)."""

from __future__ import annotations

from typing import Any

from .compat import compressed_tensors as _ct

_STATE: dict[str, Any] = {"active": False, "packed_layers": False, "routing": "not requested"}


def apply_patch(packed_layers: bool = True) -> dict[str, Any]:
    """Fix compressed-tensors bugs (now, or when it is imported) and, with ``packed_layers``, register
    the NVFP4 quantizers in transformers (:mod:`nvfp4_fix.registry`), so every ``from_pretrained``
    (ids, pipelines, servers) keeps NVFP4 layers packed. Idempotent; returns ``patch_status()``."""
    _ct.apply()
    _STATE.update(active=True, packed_layers=packed_layers)
    if packed_layers:
        from .registry import register

        register()
        _STATE["routing"] = "installed"
    elif _STATE["routing"] == "installed":
        _remove_routing()
    return patch_status()


def _remove_routing() -> None:
    from .registry import unregister

    unregister()
    _STATE["routing"] = "not requested"


def remove_patch() -> dict[str, Any]:
    """Undo ``apply_patch``: originals back, routing removed, low-memory mode off."""
    if _STATE["routing"] == "installed":
        _remove_routing()
    _ct.remove()
    _ct.enable_low_memory_mode(False)
    _STATE.update(active=False, packed_layers=False, routing="not requested")
    return patch_status()


def is_patched() -> bool:
    """True after ``apply_patch`` when every fix the installed versions need is in place (or waits for
    compressed_tensors to be imported)."""
    return bool(_STATE["active"]) and _ct.is_applied()


def enable_low_memory_mode(enabled: bool = True, model: Any = None) -> int:
    """No layer keeps a dequantized copy of its weight across forwards.

    nvfp4-fix's packed layers then always compute from the packed bytes (``dense_on_cpu`` is
    refused), and compressed-tensors 0.10-0.14 ``CompressedLinear`` decompresses on every forward
    instead of caching (memory stays packed; every forward pays a dequantization per layer). Pass
    ``model`` to drop the copies it already holds; returns how many were dropped.

    Loads made while it is on also quantize an untied input embedding table to NVFP4 (lossy: the
    rows differ from the checkpoint's by NVFP4 rounding; ``from_pretrained(...,
    quantize_embeddings=False)`` keeps it dense). A model already loaded keeps its table."""
    from . import layer
    from .fp8 import FP8Linear

    layer.LOW_MEMORY = enabled
    dropped = 0
    if enabled and model is not None:
        for m in model.modules():
            if isinstance(m, (layer.NVFP4Linear, FP8Linear)) and m.dense_weight is not None:
                m.keep_dense_copy(None)
                dropped += 1
    return dropped + _ct.enable_low_memory_mode(enabled, model)


def patch_status() -> dict[str, Any]:
    """Everything ``check`` reports about this process, JSON-serialisable."""
    from .compat import startup

    return {
        "versions": _ct.versions(),
        "active": bool(_STATE["active"]),
        "patched": is_patched(),
        "packed_layers": bool(_STATE["packed_layers"]),
        "routing": _STATE["routing"],
        "low_memory_mode": _ct.low_memory_mode(),
        "low_memory_supported": _ct.low_memory_supported(),
        "fixes": [r.as_dict() for r in _ct.status()],
        "known_bugs": [b.key for b in _ct.bugs_for()],
        "persistent": startup.status(),
    }
