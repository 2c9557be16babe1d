"""nvfp4-fix start-up hook: stdlib only, imported from ``nvfp4_fix_startup.pth`` at interpreter start.

Importing this module costs next to nothing: ``arm()`` only puts a small finder on ``sys.meta_path``.
When ``compressed_tensors`` is imported later, the finder lets the import finish and then calls
``nvfp4_fix.patch.apply_patch()``. Nothing here may raise at start-up; set ``NVFP4_FIX_DISABLE=1``
to turn the hook off without uninstalling it.
"""

import os
import sys

TYPE_CHECKING = False  # not `from typing import ...`: nothing beyond os/sys is imported at start-up
if TYPE_CHECKING:
    from collections.abc import Callable

DISABLE_ENV = "NVFP4_FIX_DISABLE"
TRIGGER = "compressed_tensors"
#: transformers imports compressed_tensors only inside the first from_pretrained: routing must be in
#: place before that, so the hook also fires when transformers' modeling code (which has torch) loads.
ROUTING_TRIGGER = "transformers.modeling_utils"

#: Set by ``arm()``: the options the start-up hook was armed with, or None.
ARMED: dict[str, bool] | None = None


class _PostImportFinder:
    """Runs callbacks right after a named top-level module has finished importing."""

    def __init__(self) -> None:
        self.hooks: dict[str, list[Callable[[], None]]] = {}
        self._busy: set[str] = set()
        self.firing: set[str] = set()

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> object:
        if fullname not in self.hooks or fullname in self._busy:
            return None
        import importlib.util

        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_notify(module: object) -> None:
            exec_module(module)
            self._fire(fullname)

        # The loader object belongs to this one spec, so patching the instance touches nothing else.
        loader.exec_module = exec_and_notify
        return spec

    def _fire(self, name: str) -> None:
        # The module is executed but importlib still marks it as initializing until we return.
        self.firing.add(name)
        try:
            for callback in self.hooks.pop(name, []):
                _call_quietly(callback)
        finally:
            self.firing.discard(name)
        if not self.hooks and self in sys.meta_path:
            sys.meta_path.remove(self)


_FINDER = _PostImportFinder()


def _call_quietly(callback: "Callable[[], None]") -> None:
    try:
        callback()
    except Exception as exc:  # a failed fix must not break the user's import
        import warnings

        warnings.warn(f"nvfp4-fix: could not apply its fixes: {exc!r}", RuntimeWarning, stacklevel=2)


def is_imported(name: str) -> bool:
    """``name`` is in sys.modules and done executing (or its post-import callbacks are running)."""
    module = sys.modules.get(name)
    if module is None:
        return False
    return name in _FINDER.firing or not getattr(getattr(module, "__spec__", None), "_initializing", False)


def when_imported(name: str, callback: "Callable[[], None]") -> bool:
    """Call ``callback`` once ``name`` (a top-level module) is imported; now if it already is.

    Returns True when it ran now, False when it waits for the import. A callback that is already
    waiting for ``name`` is not added twice.
    """
    if is_imported(name):
        _call_quietly(callback)
        return True
    waiting = _FINDER.hooks.setdefault(name, [])
    if callback not in waiting:
        waiting.append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return False


def cancel(name: str, callback: "Callable[[], None]") -> None:
    """Forget a callback that is still waiting for ``name``."""
    waiting = _FINDER.hooks.get(name, [])
    if callback in waiting:
        waiting.remove(callback)
    if not waiting:
        _FINDER.hooks.pop(name, None)
    if not _FINDER.hooks and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def pending(name: str) -> bool:
    return bool(_FINDER.hooks.get(name))


def _apply_patch() -> None:
    try:
        from nvfp4_fix.patch import apply_patch
    except ImportError:  # the package was uninstalled but this hook was left behind: stay silent
        return
    apply_patch(packed_layers=bool(ARMED and ARMED.get("packed_layers", True)))


def lazy_fire(name: str, packed_layers: bool, path: object = None, target: object = None) -> object:
    """Called by the .pth line's finder on the first import of a trigger: arm, then take that import."""
    arm(packed_layers)
    return _FINDER.find_spec(name, path, target)


def arm(packed_layers: bool = True) -> None:
    """Entry point of the .pth line."""
    global ARMED
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return
    ARMED = {"packed_layers": packed_layers}
    when_imported(TRIGGER, _apply_patch)
    if packed_layers:
        when_imported(ROUTING_TRIGGER, _apply_patch)
