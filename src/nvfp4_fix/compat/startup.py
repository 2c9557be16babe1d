"""The persistent start-up hook: a one-line ``nvfp4_fix_startup.pth`` in site-packages.

The line imports the stdlib-only ``_nvfp4_fix_startup`` module inside try/except, so a missing or
broken nvfp4-fix never makes the interpreter print or raise at start-up. That module only arms a
post-import hook; the fixes are applied when ``compressed_tensors`` is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from ..errors import NVFP4Error

PTH_NAME = "nvfp4_fix_startup.pth"
HOOK_MODULE = "_nvfp4_fix_startup"


class StartupHookError(NVFP4Error, RuntimeError):
    """The start-up hook could not be written or removed."""


LAZY_HOOK = "_NVFP4FixLazyHook"

# The .pth line defines this finder and nothing else: interpreter start-up imports no module of ours,
# and the code is kept short because compiling it is what the line costs. The first import of a
# trigger removes the finder and hands that import to the hook module (its ``lazy_fire``).
_LAZY_CODE = """\
import os
if os.environ.get("NVFP4_FIX_DISABLE","") in ("","0"):
 class {cls}:
  def find_spec(s,n,*a):
   if n in {triggers!r}:
    sys.meta_path.remove(s)
    try:
     import {module} as h;return h.lazy_fire(n,{packed!r},*a)
    except Exception:pass
 sys.meta_path.insert(0,{cls}())
"""


def pth_line(packed_layers: bool = True) -> str:
    triggers = ("compressed_tensors",) + (("transformers.modeling_utils",) if packed_layers else ())
    code = _LAZY_CODE.format(cls=LAZY_HOOK, packed=packed_layers, triggers=triggers, module=HOOK_MODULE)
    code = f"try:\n{textwrap.indent(code, ' ')}except Exception:pass\n"
    # site.py exec()s lines that start with "import"; the try/except lives in the exec'd string.
    return f"import sys; exec({code!r})\n"


def lazy_hook_waiting() -> bool:
    """The .pth line's finder is on sys.meta_path: armed, waiting for its first trigger."""
    return any(type(f).__name__ == LAZY_HOOK for f in sys.meta_path)


def site_packages(target: str | os.PathLike[str] | None = None) -> Path:
    return Path(target) if target is not None else Path(sysconfig.get_paths()["purelib"])


def pth_path(target: str | os.PathLike[str] | None = None) -> Path:
    return site_packages(target) / PTH_NAME


def install(target: str | os.PathLike[str] | None = None, packed_layers: bool = True) -> Path:
    """Write the .pth atomically (temp file + rename) into ``target`` (default: this environment's
    site-packages). Returns its path."""
    directory = site_packages(target)
    if not directory.is_dir():
        raise StartupHookError(f"cannot install the start-up hook: expected a directory at {directory}")
    path = directory / PTH_NAME
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".nvfp4_fix_startup.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(pth_line(packed_layers))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise StartupHookError(
            f"cannot write {path}: {exc.strerror or exc}; site-packages must be writable by this user "
            "(use the environment's owner, or a virtual environment)"
        ) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def remove(target: str | os.PathLike[str] | None = None) -> bool:
    """Delete the .pth; False when there was none."""
    path = pth_path(target)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StartupHookError(f"cannot remove {path}: {exc.strerror or exc}") from exc
    return True


def _parse_options(text: str) -> dict[str, bool] | None:
    for packed in (True, False):
        if text == pth_line(packed):
            return {"packed_layers": packed}
    return None


def status(target: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Is the hook installed, is its content one this version wrote, can it import its module, and
    did it arm in this process."""
    path = pth_path(target)
    text: str | None = None
    error: str | None = None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        pass
    except OSError as exc:
        error = f"cannot read {path}: {exc.strerror or exc}"
    options = _parse_options(text) if text is not None else None
    importable = importlib.util.find_spec(HOOK_MODULE) is not None
    hook = sys.modules.get(HOOK_MODULE)
    armed = getattr(hook, "ARMED", None)
    disabled = os.environ.get(getattr(hook, "DISABLE_ENV", "NVFP4_FIX_DISABLE"), "") not in ("", "0")
    problem = None
    if text is None:
        problem = error or "not installed"
    elif options is None:
        problem = f"{path} has unexpected content (not written by this nvfp4-fix version)"
    elif not importable:
        problem = f"module {HOOK_MODULE} is not importable: nvfp4-fix is missing from this environment"
    return {
        "path": str(path),
        "present": text is not None,
        "valid": problem is None,
        "options": options,
        "module_importable": importable,
        "armed_in_this_process": armed is not None or lazy_hook_waiting(),
        "disabled_by_env": disabled,
        "problem": problem,
    }
