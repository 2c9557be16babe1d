"""The ``quantization_config`` classes of NVFP4 checkpoints, as transformers' registry takes them."""

from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import COMPRESSED_TENSORS, MODELOPT


class _AsWritten(QuantizationConfigMixin):
    """A ``quantization_config`` kept exactly as the checkpoint wrote it (saved back unchanged)."""

    method: str

    def __init__(self, **kwargs: Any) -> None:
        self._raw = {"quant_method": self.method, **kwargs}
        self.quant_method = self.method

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        config = cls(**{k: v for k, v in config_dict.items() if k != "quant_method"})
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._raw)

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class ModelOptConfig(_AsWritten):
    """ModelOpt's ``quantization_config`` (``quant_method: modelopt``)."""

    method = MODELOPT

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.quant_algo = kwargs.get("quant_algo")


class NVFP4CompressedTensorsConfig(_AsWritten):
    """A compressed-tensors NVFP4 ``quantization_config``, for when the compressed-tensors package (which
    transformers' own config class needs) is missing: the packed layers need none of it."""

    method = COMPRESSED_TENSORS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_compressed, self.dequantize = True, False


class CompressedTensorsConfigEntry:
    """transformers' ``"compressed-tensors"`` config entry: its own class where compressed-tensors is
    installed (it also carries ``run_compressed=False`` / ``dequantize=True`` requests), else, for an NVFP4
    config, :class:`NVFP4CompressedTensorsConfig`."""

    original: Any = None

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        if not _has_compressed_tensors() and _nvfp4_compressed_tensors(config_dict):
            return NVFP4CompressedTensorsConfig.from_dict(config_dict, return_unused_kwargs, **kwargs)
        return cls.original.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)


def _has_compressed_tensors() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("compressed_tensors") is not None
    except (ImportError, ValueError):  # a None placeholder in sys.modules: import disabled
        return False


def _nvfp4_compressed_tensors(config: Any) -> bool:
    """Whether a compressed-tensors config (transformers' object or a dict) holds an NVFP4 group and
    does not ask for compressed-tensors' own decompressed path."""
    if isinstance(config, dict):
        raw, dequantize = config, bool(config.get("dequantize")) or config.get("run_compressed") is False
    elif isinstance(config, NVFP4CompressedTensorsConfig):
        raw, dequantize = config.to_dict(), False
    else:
        if getattr(config, "dequantize", False) or getattr(config, "run_compressed", True) is False:
            return False
        inner = getattr(config, "quantization_config", None)
        raw = inner.model_dump() if hasattr(inner, "model_dump") else {}
        dequantize = False
    if dequantize:
        return False
    groups = raw.get("config_groups") or {}
    formats = [raw.get("format")] + [g.get("format") for g in groups.values() if isinstance(g, dict)]
    return "nvfp4-pack-quantized" in formats


def method_of(config: Any) -> str | None:
    return config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)


def is_nvfp4_config(config: Any) -> bool:
    """Whether a model config's quantization_config is one the NVFP4 quantizer takes."""
    method = str(getattr(method_of(config), "value", method_of(config)))
    if method == MODELOPT:
        return True
    return method == COMPRESSED_TENSORS and _nvfp4_compressed_tensors(config)
