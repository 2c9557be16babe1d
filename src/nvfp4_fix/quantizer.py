"""The NVFP4 quantizer transformers runs for NVFP4 checkpoints (registered by :mod:`nvfp4_fix.registry`).

transformers resolves ids, revisions, subfolders, tokens and the cache, places tensors
(``device_map``/``max_memory``), casts, initialises new heads and reports loading info; the
quantizer only swaps the packed layers into the meta model before the weights are read and finishes
them afterwards.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import f4, layer
from .checkpoint import COMPRESSED_TENSORS, CheckpointInfo, inspect_checkpoint
from .errors import CheckpointError
from .fp8 import FP8Linear
from .quant_configs import NVFP4CompressedTensorsConfig
from .saving import wrap_save
from .swap import swap_quantized_modules

logger = logging.getLogger("nvfp4_fix")

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

ActivationMode = Literal["quantize", "bf16"]

#: transformers 4.57 passes no checkpoint files to the quantizer; registry.py records them here.
_RESOLVED_FILES: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "nvfp4_fix_resolved_files", default=None
)


@dataclass(frozen=True)
class LoadOptions:
    """Per-load choices that transformers' ``from_pretrained`` has no argument for."""

    activations: ActivationMode = "quantize"
    dense_on_cpu: bool = False
    quantize_embeddings: bool | None = None  # None: follow low-memory mode
    quantize_lm_head: bool = False


_OPTIONS: contextvars.ContextVar[LoadOptions] = contextvars.ContextVar("nvfp4_fix_load_options")


@contextlib.contextmanager
def load_options(options: LoadOptions) -> Iterator[None]:
    """Loads started inside this block use ``options``."""
    if options.activations not in layer.ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {layer.ACTIVATION_MODES}, got {options.activations!r}")
    if options.dense_on_cpu and layer.LOW_MEMORY:
        raise RuntimeError("low-memory mode is on: layers keep no dequantized copy (dense_on_cpu)")
    token = _OPTIONS.set(options)
    try:
        yield
    finally:
        _OPTIONS.reset(token)


class NVFP4Quantizer(HfQuantizer):
    """Pre-quantized NVFP4 (and the FP8 layers of mixed checkpoints): packed layers, no dequantization."""

    requires_calibration = True

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.options = _OPTIONS.get(LoadOptions())
        self.dtype = torch.bfloat16
        self.info: CheckpointInfo | None = None
        self.prefix_map: dict[str, str] = {}

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("disk offload is not supported for NVFP4 models; offload to 'cpu' instead")

    def update_dtype(self, dtype: torch.dtype | str | None) -> torch.dtype | str:
        if dtype == "auto":  # transformers 4.57 asks before resolving "auto" from config.json
            return dtype
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if dtype is None:
            dtype = torch.bfloat16
        if dtype not in _MODEL_DTYPES:
            raise ValueError(f"dtype must be bfloat16, float16 or float32 for NVFP4 models, got {dtype}")
        self.dtype = dtype
        return dtype

    update_torch_dtype = update_dtype  # the name transformers 4.57 calls

    def _checkpoint_folder(self, checkpoint_files: list[str] | None) -> Path:
        files = checkpoint_files or _RESOLVED_FILES.get()
        if not files:
            raise CheckpointError(
                "nvfp4-fix: transformers gave no checkpoint files to read (a state_dict load?)"
            )
        return Path(files[0]).parent

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: list[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        info = inspect_checkpoint(self._checkpoint_folder(checkpoint_files))
        if info.format is None:
            raise CheckpointError(
                f"{info.path}: config.json says {self.quantization_config.quant_method}, but "
                "no NVFP4 layer was found"
            )
        model_dtype = getattr(model, "dtype", None)  # the meta model is built in the resolved dtype
        if model_dtype in _MODEL_DTYPES:
            self.dtype = model_dtype
        self.prefix_map = swap_quantized_modules(model, info, self.dtype)
        f4.ignore_unexpected(model, info, self.prefix_map)
        self.info = info
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from .embedding import quantize_input_embedding
        from .fusion import fuse_siblings
        from .lm_head import quantize_output_layer
        from .moe import NVFP4Experts

        assert self.info is not None
        f4.fill_codes(model, self.info, self.prefix_map)  # codes stored as safetensors F4
        _restore_exact_scales(model, self.info, self.prefix_map)
        quantize_input_embedding(model, self.options.quantize_embeddings)  # first: it checks the tie
        quantize_output_layer(model, self.options.quantize_lm_head)
        for m in model.modules():
            if isinstance(m, (layer.NVFP4Linear, NVFP4Experts, FP8Linear)):
                m.activation_mode = self.options.activations
            if (
                self.options.dense_on_cpu
                and isinstance(m, (layer.NVFP4Linear, FP8Linear))
                and m.weight_scale.device.type == "cpu"
            ):
                m.keep_dense_copy(self.dtype)
        fuse_siblings(model)  # q/k/v and gate/up share one decode launch on CUDA
        _train_inputs_require_grad(model)
        model.nvfp4_checkpoint = self.info
        if self.info.format == COMPRESSED_TENSORS:  # saved as read, not as transformers re-serialises it
            model.config.quantization_config = NVFP4CompressedTensorsConfig.from_dict(self.info.quant_config)
        wrap_save(model, self.info)
        packed = sum(1 for m in model.modules() if isinstance(m, layer.NVFP4Linear))
        logger.info("nvfp4-fix: %s loaded with %d NVFP4 layers packed", self.info.path, packed)
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (peft LoRA) on a frozen packed base

    @property
    def is_qat_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _inputs_require_grad(module: nn.Module, args: Any, output: Any) -> None:
    if module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor):
        output.requires_grad_(True)


def _train_inputs_require_grad(model: nn.Module) -> None:
    """The base is frozen, so in training nothing before the first adapter needs a gradient, and
    reentrant gradient checkpointing (4.57's default) then drops the adapters' gradients. peft and
    ``prepare_model_for_kbit_training`` do this for the quantizers they know (bitsandbytes, GPTQ, ...);
    for this one, as transformers' ``enable_input_require_grads`` does, in training mode only."""
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return
    if isinstance(emb, nn.Module):
        emb.register_forward_hook(_inputs_require_grad)


def _restore_exact_scales(model: nn.Module, info: CheckpointInfo, prefix_map: dict[str, str]) -> None:
    """transformers 4.57 casts every floating checkpoint tensor except float8 to the model dtype, so a
    float32 global scale arrives rounded (or as inf in float16). Re-read those few scalars exactly."""
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[nn.Module, str, str]]] = {}
    for ckpt_prefix, target in prefix_map.items():
        for sub, module in model.get_submodule(target).named_modules():
            fp8 = isinstance(module, FP8Linear)  # its scales keep the checkpoint's own dtype
            if not (fp8 or isinstance(module, layer.NVFP4Linear)):
                continue
            for leaf, p in module._parameters.items():
                if p is None or leaf in ("bias", "pre_quant_scale") or (not fp8 and p.dtype in _EXACT):
                    continue
                key = ".".join(x for x in (ckpt_prefix, sub, leaf) if x)
                if key not in info.tensors:
                    raise CheckpointError(f"{info.path}: no tensor {key!r} for {target}.{leaf}")
                if fp8 and p.dtype == _SAFETENSORS_DTYPES.get(info.tensors[key].dtype):
                    continue
                by_file.setdefault(info.tensors[key].file, []).append((module, leaf, key))
    for file, items in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for module, leaf, key in items:
                old = module._parameters[leaf]
                value = f.get_tensor(key)
                if not isinstance(module, FP8Linear):
                    value = value.to(torch.float32)
                value = value.reshape(old.shape).to(old.device)
                module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
                module._mul, module._mul_key = None, None


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn,
}

_MODEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

#: Dtypes in which transformers hands a packed layer's tensors over unchanged.
_EXACT = (torch.float32, torch.float8_e4m3fn, torch.uint8)


__all__ = ["LoadOptions", "load_options", "NVFP4Quantizer", "ActivationMode"]
