"""Putting the NVFP4 quantizers into transformers' registry, and taking them out again.

* ``"modelopt"`` (``quant_method: modelopt`` in config.json) is registered, as transformers has none;
  older ModelOpt exports that describe the quantization only in hf_quant_config.json get the
  ``quantization_config`` newer exports write themselves.
* ``"compressed-tensors"``: transformers' entries are replaced by :class:`CompressedTensorsEntry` (and
  :class:`~nvfp4_fix.quant_configs.CompressedTensorsConfigEntry`), which take checkpoints holding NVFP4
  groups and hand every other one (FP8-only, int4, dense, or a request for compressed-tensors' own
  decompression) to transformers' own classes, unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers.quantizers import HfQuantizer
from transformers.quantizers import auto as _auto

from .checkpoint import COMPRESSED_TENSORS, MODELOPT
from .quant_configs import CompressedTensorsConfigEntry, ModelOptConfig, _nvfp4_compressed_tensors
from .quantizer import _RESOLVED_FILES, _TRANSFORMERS_MAJOR, NVFP4Quantizer


class CompressedTensorsEntry(HfQuantizer):
    """transformers' ``"compressed-tensors"`` entry: NVFP4 checkpoints to :class:`NVFP4Quantizer`,
    everything else to transformers' own quantizer, constructed exactly as transformers would."""

    original: type[HfQuantizer] | None = None

    def __new__(cls, quantization_config: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        if _nvfp4_compressed_tensors(quantization_config):
            return NVFP4Quantizer(quantization_config, **kwargs)
        assert cls.original is not None
        return cls.original(quantization_config, **kwargs)


def _record_files(resolve: Any) -> Any:
    def resolved(*args: Any, **kwargs: Any) -> Any:
        result = resolve(*args, **kwargs)
        _RESOLVED_FILES.set(list(result[0]) if result and result[0] else None)
        return result

    resolved.nvfp4_fix_original = resolve  # type: ignore[attr-defined]
    return resolved


def _hf_quant_config(name: Any, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    from transformers.utils import cached_file

    keys = ("cache_dir", "force_download", "proxies", "token", "local_files_only", "revision", "subfolder")
    try:
        path = cached_file(
            name,
            "hf_quant_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **{k: kwargs[k] for k in keys if kwargs.get(k) is not None},
        )
    except (OSError, ValueError):
        return None
    if path is None:
        return None
    from .checkpoint import read_json

    return read_json(Path(path))


def _with_hf_quant_config(get_config_dict: Any) -> Any:
    """Older ModelOpt exports describe the quantization only in hf_quant_config.json beside config.json;
    transformers reads config.json alone and would build a dense model. Give it the quantization_config
    that newer exports write themselves."""

    def patched(cls: Any, pretrained_model_name_or_path: Any, **kwargs: Any) -> Any:
        config_dict, unused = get_config_dict.__func__(cls, pretrained_model_name_or_path, **kwargs)
        if isinstance(config_dict, dict) and "quantization_config" not in config_dict:
            hq = _hf_quant_config(pretrained_model_name_or_path, kwargs)
            quant = hq.get("quantization") if isinstance(hq, dict) else None
            if isinstance(quant, dict) and quant.get("quant_algo"):
                producer = hq.get("producer") or {"name": MODELOPT}
                config_dict["quantization_config"] = {"quant_method": MODELOPT, **quant, "producer": producer}
        return config_dict, unused

    patched.nvfp4_fix_original = get_config_dict  # type: ignore[attr-defined]
    return classmethod(patched)


def register() -> bool:
    """Put the quantizers into transformers' registry; False if they already are."""
    if _auto.AUTO_QUANTIZER_MAPPING.get(COMPRESSED_TENSORS) is CompressedTensorsEntry:
        return False
    if MODELOPT not in _auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        _auto.register_quantization_config(MODELOPT)(ModelOptConfig)
    if MODELOPT not in _auto.AUTO_QUANTIZER_MAPPING:
        _auto.register_quantizer(MODELOPT)(NVFP4Quantizer)
    # register_quantizer refuses a taken name, so the entries are replaced in place
    CompressedTensorsEntry.original = _auto.AUTO_QUANTIZER_MAPPING[COMPRESSED_TENSORS]
    _auto.AUTO_QUANTIZER_MAPPING[COMPRESSED_TENSORS] = CompressedTensorsEntry
    CompressedTensorsConfigEntry.original = _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[COMPRESSED_TENSORS]
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[COMPRESSED_TENSORS] = CompressedTensorsConfigEntry
    from transformers import PretrainedConfig, modeling_utils

    PretrainedConfig.get_config_dict = _with_hf_quant_config(PretrainedConfig.__dict__["get_config_dict"])
    if _TRANSFORMERS_MAJOR < 5:  # 4.57 passes the quantizer no checkpoint files: see _RESOLVED_FILES
        modeling_utils._get_resolved_checkpoint_files = _record_files(
            modeling_utils._get_resolved_checkpoint_files
        )
    return True


def unregister() -> bool:
    """Undo :func:`register`; False if nothing was registered."""
    if _auto.AUTO_QUANTIZER_MAPPING.get(COMPRESSED_TENSORS) is not CompressedTensorsEntry:
        return False
    _auto.AUTO_QUANTIZER_MAPPING[COMPRESSED_TENSORS] = CompressedTensorsEntry.original
    _auto.AUTO_QUANTIZATION_CONFIG_MAPPING[COMPRESSED_TENSORS] = CompressedTensorsConfigEntry.original
    for mapping in (_auto.AUTO_QUANTIZER_MAPPING, _auto.AUTO_QUANTIZATION_CONFIG_MAPPING):
        if mapping.get(MODELOPT) in (NVFP4Quantizer, ModelOptConfig):
            del mapping[MODELOPT]
    from transformers import PretrainedConfig, modeling_utils

    patched = PretrainedConfig.__dict__["get_config_dict"].__func__
    config_original = getattr(patched, "nvfp4_fix_original", None)
    if config_original is not None:
        PretrainedConfig.get_config_dict = config_original
    original = getattr(modeling_utils._get_resolved_checkpoint_files, "nvfp4_fix_original", None)
    if original is not None:
        modeling_utils._get_resolved_checkpoint_files = original
    return True


def registered() -> bool:
    return _auto.AUTO_QUANTIZER_MAPPING.get(COMPRESSED_TENSORS) is CompressedTensorsEntry
