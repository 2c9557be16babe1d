"""``save_pretrained`` of a packed model: atomic, and ModelOpt's hf_quant_config.json written too."""

from __future__ import annotations

import functools
import os
import re
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import CheckpointInfo
from .fsutil import atomic_directory, carry_over

#: What a save replaces in an existing folder: weight files, their index, the ModelOpt config.
_REPLACED_ON_SAVE = re.compile(
    r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)|(model\.safetensors|pytorch_model\.bin)"
    r"\.index\.json|hf_quant_config\.json"
)


def wrap_save(model: nn.Module, info: CheckpointInfo) -> None:
    """transformers writes into a dot-prefixed temporary folder beside the target, which then replaces
    the target in one rename (an interrupted save leaves the old folder or none, never a half-written
    checkpoint). Files of an existing target that the save does not write (tokenizer, README,
    sub-folders) are kept, as transformers keeps them. ModelOpt checkpoints carry hf_quant_config.json
    beside config.json: it is written too."""
    original = model.save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        target = Path(save_directory)
        src = info.path / "hf_quant_config.json"
        if kwargs.get("push_to_hub") or kwargs.get("is_main_process") is False or target.is_file():
            result = original(save_directory, *args, **kwargs)  # transformers' own rules (repo name, ranks)
            if src.is_file() and target.is_dir():
                shutil.copyfile(src, target / "hf_quant_config.json")
            return result
        with atomic_directory(target, force=True) as tmp:
            result = original(tmp, *args, **kwargs)
            if src.is_file():
                shutil.copyfile(src, tmp / "hf_quant_config.json")
            if target.is_dir():
                carry_over(target, tmp, _REPLACED_ON_SAVE)
        return result

    model.save_pretrained = save_pretrained  # type: ignore[method-assign]
