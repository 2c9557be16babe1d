"""Version-gated, idempotent, reversible fixes for compressed-tensors bugs that break NVFP4 loading.

Each fix is applied only when the installed release is in the affected range of ``KNOWN_BUGS`` AND the
code it replaces is still there. Originals are kept and put back by ``remove()``. If compressed-tensors
is not imported yet, ``apply()`` waits for its import (a post-import hook) instead of importing it.

Low-memory mode (the 0.10-0.14 ``CompressedLinear``, i.e. 0.13.x here): by default a layer
decompresses its weight on the first forward and then keeps the dense copy next to the packed one for
the rest of the process (16-bit dense: ~3.6x the packed bytes, on top of them). With
``enable_low_memory_mode()`` it decompresses on every forward and keeps nothing: memory stays at the
packed size plus one layer's dense weight at a time, at the price of a full dequantization per layer
per forward (decode gets many times slower). Load mode ``run_compressed=False`` decompresses the whole
model at load time and is not affected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import _nvfp4_fix_startup as _hooks

from . import ct_fixes
from .ct_fixes import _ORIGINALS, FIXES, _drop_dense_copies, _restore, _target_weight_dtype
from .known_bugs import (
    BUGS_BY_FIX,
    KNOWN_BUGS,
    MODULE,
    PACKAGE,
    KnownBug,
    bugs_for,
    in_range,
    installed_version,
    parse_version,
    versions,
)

__all__ = [
    "BUGS_BY_FIX", "FIXES", "KNOWN_BUGS", "PACKAGE", "FixRecord", "KnownBug", "apply", "bugs_for",
    "enable_low_memory_mode", "in_range", "installed_version", "is_applied", "low_memory_mode",
    "low_memory_supported", "parse_version", "remove", "status", "versions",
]  # fmt: skip

_ARMED = False


# ---- public API -----------------------------------------------------------------------------------


@dataclass
class FixRecord:
    name: str
    bug: str  # KnownBug.key
    summary: str
    target: str
    installed: str | None  # compressed-tensors version
    affected: str  # e.g. ">=0.13.0,<0.14.0"
    version_has_bug: bool
    target_present: bool | None  # None: compressed-tensors not imported yet
    needed: bool
    applied: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _range_text(bug: KnownBug) -> str:
    lo, hi = bug.affected
    text = ",".join(p for p in (f">={lo}" if lo else "", f"<{hi}" if hi else "") if p)
    return text + (f" with torch>={bug.needs_torch}" if bug.needs_torch else "")


def _imported() -> bool:
    return _hooks.is_imported(MODULE)


def status() -> list[FixRecord]:
    """One record per fix: does the installed version have the bug, is the fix applied, and why."""
    vers = versions()
    ct = vers[PACKAGE]
    imported = _imported()
    records = []
    for fix in FIXES:
        bug = BUGS_BY_FIX[fix.name]
        has_bug = bug.affects(vers)
        applied = fix.name in _ORIGINALS
        present = True if applied else (fix.find() is not None) if imported else None
        if ct is None:
            reason = "not needed: compressed-tensors is not installed"
        elif applied:
            reason = "applied"
        elif not has_bug:
            hi = bug.affected[1]
            if bug.needs_torch and in_range(ct, *bug.affected):
                reason = f"not needed: only with torch>={bug.needs_torch}, installed {vers['torch']}"
            elif hi and in_range(ct, hi, None):
                reason = f"not needed: fixed upstream in {PACKAGE} {hi}"
            else:
                reason = f"not needed: {PACKAGE} {ct} predates the bug ({_range_text(bug)})"
        elif present is None:
            reason = "pending: applies when compressed_tensors is imported" if _ARMED else "not applied"
        elif not present:
            reason = f"not applied: {fix.target} not found in {PACKAGE} {ct}"
        else:
            reason = "not applied"
        records.append(
            FixRecord(
                name=fix.name,
                bug=bug.key,
                summary=bug.summary,
                target=fix.target,
                installed=ct,
                affected=_range_text(bug),
                version_has_bug=has_bug,
                target_present=present,
                needed=has_bug and present is not False,
                applied=applied,
                reason=reason,
            )
        )
    return records


def _apply_now() -> None:
    vers = versions()
    for fix in FIXES:
        if fix.name in _ORIGINALS or not BUGS_BY_FIX[fix.name].affects(vers):
            continue
        target = fix.find()
        if target is None:
            continue
        saved: list[tuple[object, str, object]] = []
        try:
            fix.apply(target, saved)
        except Exception:
            _restore(saved)
            raise
        _ORIGINALS[fix.name] = saved


def apply() -> list[FixRecord]:
    """Apply every needed fix now, or as soon as compressed_tensors is imported. Idempotent."""
    global _ARMED
    _ARMED = True
    if installed_version(PACKAGE) is not None:
        _hooks.when_imported(MODULE, _apply_now)
    return status()


def remove() -> list[FixRecord]:
    """Undo every fix (and a pending post-import hook); the originals are put back."""
    global _ARMED
    _ARMED = False
    _hooks.cancel(MODULE, _apply_now)
    for name in list(_ORIGINALS)[::-1]:
        _restore(_ORIGINALS.pop(name))
    return status()


def is_applied() -> bool:
    """True when every fix this installation needs is in place (or waits for the import)."""
    return _ARMED and all(r.applied or not r.needed or r.target_present is None for r in status())


def enable_low_memory_mode(enabled: bool = True, model: Any = None) -> int:
    """Decompress 0.10-0.14 CompressedLinear weights on every forward and keep no dense copy.

    Works through the ``weight_dtype`` fix, so only for models loaded after ``apply()``. Layers that
    already ran keep their cached dense copy unless ``model`` is given: then those copies are dropped
    now (returns how many). No effect on compressed-tensors >= 0.15, which has no such CompressedLinear.
    """
    ct_fixes._LOW_MEMORY = enabled
    return _drop_dense_copies(model) if enabled and model is not None and _imported() else 0


def low_memory_mode() -> bool:
    return ct_fixes._LOW_MEMORY


def low_memory_supported() -> bool | None:
    """Whether the installed CompressedLinear can run in low-memory mode (None: not imported yet)."""
    if not _imported():
        return None
    return (
        "weight_dtype" in _ORIGINALS
        and _target_weight_dtype() not in (None,)
        and any(
            getattr(owner, "__name__", "") == "CompressedLinear" for owner, _, _ in _ORIGINALS["weight_dtype"]
        )
    )
