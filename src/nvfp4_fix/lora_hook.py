"""Teach peft about packed NVFP4 layers as soon as both exist in the process, importing nothing early.

``arm()`` runs when :mod:`nvfp4_fix.layer` is imported. If peft is already imported it installs
:mod:`nvfp4_fix.lora`'s dispatcher at once; otherwise a finder waits on ``sys.meta_path`` for the
first ``import peft`` (importing peft costs ~1.7 s, which a model used only for inference should not
pay) and installs it right after peft's package has finished importing.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import Any

logger = logging.getLogger("nvfp4_fix")

TRIGGER = "peft"


def _install() -> None:
    try:
        from . import lora

        if hasattr(lora, "install"):  # else lora.py is importing right now and installs at its end
            lora.install()
    except Exception as e:  # never break `import peft`; say how to do it by hand
        logger.warning(
            "nvfp4-fix: could not register the NVFP4 LoRA layer with peft (%s: %s); use"
            " config._register_custom_module(nvfp4_fix.lora.custom_modules())",
            type(e).__name__,
            e,
        )


class _PeftFinder:
    """Meta-path finder that fires once, on the import of ``peft``, and removes itself."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != TRIGGER:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_install(module: Any) -> None:
            exec_module(module)
            _install()

        loader.exec_module = exec_then_install
        return spec


def arm() -> None:
    if TRIGGER in sys.modules:
        _install()
    elif not any(isinstance(f, _PeftFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftFinder())
