"""Load NVFP4 checkpoints into transformers models whose quantized layers stay packed.

The model skeleton is built by transformers on the meta device, the checkpoint's NVFP4 linears are
swapped for :class:`~nvfp4_fix.layer.NVFP4Linear`, and every tensor is read from safetensors straight
to its target device in the checkpoint's own dtype: no full-precision copy of a quantized layer
exists at any point.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import layer
from .checkpoint import (
    COMPRESSED_TENSORS,
    MODELOPT,
    CheckpointInfo,
    detect_format,
    require_nvfp4,
)
from .codec import BLOCK
from .embedding import NVFP4Embedding
from .errors import CheckpointError, NVFP4Error
from .fsutil import atomic_directory, carry_over
from .layer import ACTIVATION_MODES, NVFP4Linear
from .moe import NVFP4Experts
from .swap import name_candidates as _renamer
from .swap import set_module as _set_module
from .swap import swap_quantized_modules as _swap_quantized_modules

logger = logging.getLogger("nvfp4_fix")

_AUTO_PLACEMENTS = ("auto", "balanced", "balanced_low_0", "sequential")


def looks_like_nvfp4(path: Any) -> bool:
    """Cheap test (two small JSON reads) used to route ``from_pretrained`` calls."""
    try:
        p = Path(os.fspath(path))
    except TypeError:
        return False
    if not p.is_dir():
        return False
    # read_json (inside detect_format) reads regular files only: a FIFO config.json cannot hang this
    with contextlib.suppress(Exception):
        return detect_format(p) is not None
    return False


def _resolve_dtype(dtype: Any, config: Any) -> torch.dtype:
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype must be bfloat16, float16 or float32 for NVFP4 models, got {dtype}")
    return dtype


def _embedding_to_quantize(model: nn.Module, requested: bool | None) -> str | None:
    """The name of the input embedding table to quantize to NVFP4, or None (saying why it is not).

    ``requested=None`` follows low-memory mode. A table shared with the lm_head stays dense: the output
    layer needs it whole."""
    if not (layer.LOW_MEMORY if requested is None else requested):
        return None
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    name = next((n for n, m in model.named_modules() if m is emb), "") + ".weight"
    if not isinstance(emb, nn.Embedding):
        why = f"{type(model).__name__} has no nn.Embedding input embedding"
    elif _tied_to_output(model, name):
        why = f"{name} is tied to the output layer (tie_word_embeddings), which needs it dense"
    elif type(emb) is not nn.Embedding or emb.max_norm is not None:
        why = f"{type(emb).__name__} is not a plain nn.Embedding"
    elif emb.embedding_dim % BLOCK:
        why = f"its width {emb.embedding_dim} is not a multiple of {BLOCK}"
    else:
        return name
    (logger.warning if requested else logger.info)("nvfp4-fix: input embedding not quantized: %s", why)
    return None


def _tied_to_output(model: nn.Module, name: str) -> bool:
    if model.get_output_embeddings() is None:
        return False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5
        tied = model.get_expanded_tied_weights_keys(all_submodels=True)
        return name in tied or name in tied.values()
    return bool(getattr(model.config.get_text_config(decoder=True), "tie_word_embeddings", True))


def _placement(model: nn.Module, device_map: Any, max_memory: Any, dtype: torch.dtype) -> dict[str, Any]:
    if device_map is None:
        return {"": torch.device("cpu")}
    if isinstance(device_map, int):
        return {"": torch.device("cuda", device_map)}
    if isinstance(device_map, torch.device) or (
        isinstance(device_map, str) and device_map not in _AUTO_PLACEMENTS
    ):
        return {"": torch.device(device_map)}
    if isinstance(device_map, dict):
        return dict(device_map)
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    if device_map != "sequential":
        max_memory = get_balanced_memory(
            model,
            max_memory=max_memory,
            no_split_module_classes=no_split,
            dtype=dtype,
            low_zero=device_map == "balanced_low_0",
        )
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def _device_of(placement: dict[str, Any], name: str) -> Any:
    best, dev = -1, placement.get("", "cpu")
    for prefix, d in placement.items():
        if prefix and (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, dev = len(prefix), d
    return dev


def _load_tensors(
    model: nn.Module,
    info: CheckpointInfo,
    prefix_map: dict[str, str],
    placement: dict[str, Any],
    dtype: torch.dtype,
    quantize_embedding: str | None = None,
) -> list[str]:
    from safetensors import safe_open

    candidates = _renamer(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    keep_fp32 = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    unexpected: list[str] = []
    by_file: dict[Path, list[str]] = {}
    for name, t in info.tensors.items():
        by_file.setdefault(t.file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in names:
                target = _map_key(key, prefix_map, candidates, params, buffers)
                if target is None:
                    unexpected.append(key)
                    continue
                old = params.get(target, buffers.get(target))
                module = model.get_submodule(target.rpartition(".")[0]) if "." in target else model
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != tuple(old.shape):
                    if old.numel() == tensor.numel() and old.dim() <= 1 and tensor.dim() <= 1:
                        tensor = tensor.reshape(old.shape)
                    else:
                        raise CheckpointError(
                            f"{file}: tensor {key!r} has shape {list(tensor.shape)}; the model "
                            f"({type(model).__name__}) expects {list(old.shape)} for {target}"
                        )
                dev = _device_of(placement, target)
                if dev == "disk":
                    raise ValueError(
                        "disk offload is not supported for NVFP4 models; offload to 'cpu' instead"
                    )
                dev = torch.device("cuda", dev) if isinstance(dev, int) else dev
                if target == quantize_embedding:  # quantized from the checkpoint tensor, chunk by chunk
                    try:
                        new = NVFP4Embedding.from_dense(tensor, module.padding_idx, dtype, dev)
                    except ValueError as e:
                        raise CheckpointError(f"{file}: tensor {key!r} ({tensor.dtype}): {e}") from None
                    _set_module(model, target.rpartition(".")[0], new)
                    continue
                try:
                    tensor = _cast(tensor, old, module, target, dtype, keep_fp32)
                except (RuntimeError, TypeError) as e:  # e.g. a float4 or complex tensor where weights belong
                    what = f"{file}: tensor {key!r} ({tensor.dtype})"
                    raise CheckpointError(f"{what} cannot fill {target}: {e}") from None
                tensor = tensor.to(dev)
                leaf = target.rpartition(".")[2]
                if target in params:
                    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
                else:
                    module._buffers[leaf] = tensor
    return unexpected


def _map_key(
    key: str,
    prefix_map: dict[str, str],
    candidates: Callable[[str], list[str]],
    params: dict[str, Any],
    buffers: dict[str, Any],
) -> str | None:
    prefix, _, leaf = key.rpartition(".")
    while prefix:
        if prefix in prefix_map:
            name = f"{prefix_map[prefix]}.{key[len(prefix) + 1 :]}"
            return name if name in params or name in buffers else None
        prefix = prefix.rpartition(".")[0]
    return next((c for c in candidates(key) if c in params or c in buffers), None)


def _cast(
    tensor: torch.Tensor,
    old: torch.Tensor,
    module: nn.Module,
    name: str,
    dtype: torch.dtype,
    keep_fp32: list[str],
) -> torch.Tensor:
    if isinstance(module, (NVFP4Linear, NVFP4Experts)):
        leaf = name.rpartition(".")[2]
        if leaf in ("bias", "pre_quant_scale"):
            return tensor.to(dtype)
        if tensor.dtype != old.dtype:
            if old.dtype in (torch.uint8, torch.float8_e4m3fn):
                raise CheckpointError(f"tensor {name!r} must be {old.dtype}, got {tensor.dtype}")
            return tensor.to(old.dtype)
        return tensor
    if not tensor.is_floating_point():
        if old.is_floating_point():  # e.g. a uint8 tensor where lm_head.weight belongs: no forward could run
            raise CheckpointError(f"tensor {name!r} must be floating point, got {tensor.dtype}")
        return tensor
    if any(k in name for k in keep_fp32):
        return tensor.to(torch.float32)
    return tensor.to(dtype if old.is_floating_point() else old.dtype)


def _brief(e: BaseException) -> str:
    """An exception from another library as one short line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


#: What a save replaces in an existing folder: weight files, their index, the ModelOpt config.
_REPLACED_ON_SAVE = re.compile(
    r"(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)|(model\.safetensors|pytorch_model\.bin)"
    r"\.index\.json|hf_quant_config\.json"
)


def _wrap_save(model: nn.Module, info: CheckpointInfo) -> None:
    """``save_pretrained`` made atomic: transformers writes into a dot-prefixed temporary folder beside
    the target, which then replaces the target in one rename (an interrupted save leaves the old folder
    or none, never a half-written checkpoint). Files of an existing target that the save does not
    write (tokenizer, README, sub-folders) are kept, as transformers keeps them. ModelOpt checkpoints
    carry hf_quant_config.json beside config.json: it is written too."""
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


def load_model(
    model_class: Any,
    path: str | os.PathLike[str],
    *,
    config: Any = None,
    dtype: Any = "auto",
    device_map: Any = None,
    max_memory: dict[Any, Any] | None = None,
    activations: str = "quantize",
    dense_on_cpu: bool = False,
    quantize_embeddings: bool | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    **config_kwargs: Any,
) -> Any:
    """Build ``model_class`` (a transformers model class or Auto class) from an NVFP4 checkpoint."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    if activations not in ACTIVATION_MODES:
        raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
    info = require_nvfp4(path)  # validates headers, and config.json's sizes against them
    if config is None:
        try:
            config = AutoConfig.from_pretrained(
                info.path, trust_remote_code=trust_remote_code, **config_kwargs
            )
        except Exception as e:  # config.json is untrusted data: an unknown model_type, sizes it refuses, ...
            what = f"{info.path}/config.json: transformers cannot read it"
            raise CheckpointError(f"{what} ({_brief(e)})") from None
    else:
        config = copy.deepcopy(config)
        for k, v in config_kwargs.items():
            setattr(config, k, v)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    _backport_renamed_config_keys(config, info)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    try:
        torch_dtype = _resolve_dtype(dtype, config)
    except ValueError as e:
        if dtype not in (None, "auto"):
            raise
        raise CheckpointError(f"{info.path / 'config.json'}: {e}") from None

    if hasattr(model_class, "_model_mapping"):  # an Auto class: pick the concrete one for this config
        try:
            model_class = model_class._model_mapping[type(config)]
        except KeyError:
            what = f"{model_class.__name__} has no class for {type(config).__name__}"
            raise CheckpointError(f"{info.path / 'config.json'}: {what}") from None
    dtype_kw = "dtype" if "dtype" in _from_config_params(model_class) else "torch_dtype"
    try:
        with init_empty_weights(include_buffers=False):
            model = model_class._from_config(config, **{dtype_kw: torch_dtype})
    except NVFP4Error:
        raise
    except Exception as e:  # sizes transformers accepts but cannot build (or allocate)
        raise CheckpointError(
            f"{info.path}/config.json: transformers cannot build {model_class.__name__} from it ({_brief(e)})"
        ) from None
    model.eval()

    prefix_map = _swap_quantized_modules(model, info, torch_dtype)
    placement = _placement(model, device_map, max_memory, torch_dtype)
    embedding = _embedding_to_quantize(model, quantize_embeddings)
    unexpected = _load_tensors(model, info, prefix_map, placement, torch_dtype, embedding)
    if unexpected:
        logger.warning(
            "nvfp4-fix: %d checkpoint tensors not used by %s, e.g. %s",
            len(unexpected),
            type(model).__name__,
            unexpected[:3],
        )
    with contextlib.suppress(Exception):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(
            f"{info.path}: the checkpoint has no tensor for {len(missing)} parameters of "
            f"{type(model).__name__}, e.g. {missing[:3]}"
        )
    for m in model.modules():
        if isinstance(m, (NVFP4Linear, NVFP4Experts)):
            m.activation_mode = activations
        if dense_on_cpu and isinstance(m, NVFP4Linear) and m.weight_packed.device.type == "cpu":
            m.keep_dense_copy(torch_dtype)

    if len(set(map(str, placement.values()))) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=placement)
    else:
        model.to(_device_of(placement, ""))
    from .fusion import fuse_siblings  # q/k/v and gate/up share one decode launch on CUDA

    fuse_siblings(model)
    model.config.quantization_config = (
        copy.deepcopy(info.quant_config)
        if info.format == COMPRESSED_TENSORS
        else (copy.deepcopy(info.config.get("quantization_config") or _modelopt_quant_config(info)))
    )
    model.nvfp4_checkpoint = info
    if device_map is not None:
        model.hf_device_map = {
            k: (str(v) if isinstance(v, torch.device) else v) for k, v in placement.items()
        }
    with contextlib.suppress(Exception):
        model.generation_config = GenerationConfig.from_pretrained(info.path)
    _wrap_save(model, info)
    return model


def _backport_renamed_config_keys(config: Any, info: CheckpointInfo) -> None:
    """transformers 5 writes MoE expert counts as ``num_local_experts``; 4.57's Qwen3-MoE reads
    ``num_experts`` and would silently build 128 experts. Copy the value across when only one is known."""
    saved = info.config.get("num_local_experts")
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and isinstance(saved, int) and "num_experts" not in info.config:
            if hasattr(cfg, "num_experts") and cfg.num_experts != saved:
                cfg.num_experts = saved


def _modelopt_quant_config(info: CheckpointInfo) -> dict[str, Any]:
    q = dict(info.quant_config.get("quantization") or {})
    return {"quant_method": MODELOPT, **q}


@functools.cache
def _from_config_params(model_class: type) -> tuple[str, ...]:
    import inspect

    src = inspect.getsource(model_class._from_config)
    return tuple(k for k in ("dtype", "torch_dtype") if f'"{k}"' in src)


def from_pretrained(path: str | os.PathLike[str], model_class: Any = None, **kwargs: Any) -> Any:
    """Load an NVFP4 checkpoint packed, without patching anything global.

    ``model_class`` defaults to ``AutoModelForCausalLM``; pass e.g. ``AutoModelForImageTextToText``.
    Keyword arguments: ``dtype``/``torch_dtype``, ``device_map``, ``max_memory``, ``activations``
    ("quantize" reproduces W4A4 activation quantization, "bf16" skips it), ``dense_on_cpu`` (CPU only:
    dequantize each layer once at load and compute densely: fast, at dense memory; refused in
    low-memory mode), ``quantize_embeddings``, ``trust_remote_code``, ``attn_implementation``, and
    config overrides.

    ``quantize_embeddings`` (default None: on in low-memory mode, see ``enable_low_memory_mode``)
    quantizes the input embedding table, which producers leave in 16 bits, to NVFP4 as it is loaded
    (:class:`~nvfp4_fix.embedding.NVFP4Embedding`). This is lossy: the table then differs from the
    checkpoint's by NVFP4 rounding, and ``save_pretrained`` writes the dequantized table, not the
    original. A table tied to the lm_head (``tie_word_embeddings``), one whose width is not a multiple
    of 16, or one that is not a plain ``nn.Embedding`` stays dense, with a log message saying so.
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    if "torch_dtype" in kwargs:
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    for ignored in (
        "low_cpu_mem_usage",
        "use_safetensors",
        "local_files_only",
        "revision",
        "_from_auto",
        "_commit_hash",
        "cache_dir",
        "force_download",
        "token",
        "offload_state_dict",
    ):
        kwargs.pop(ignored, None)
    return load_model(model_class, path, **kwargs)


_original_from_pretrained: Any = None


def _wants_compressed_tensors_path(kwargs: dict[str, Any]) -> bool:
    qc = kwargs.get("quantization_config")
    if qc is None:
        return False
    return bool(getattr(qc, "dequantize", False) or getattr(qc, "run_compressed", True) is False)


def install_routing() -> bool:
    """Route ``PreTrainedModel.from_pretrained`` of local NVFP4 folders to :func:`load_model`."""
    global _original_from_pretrained
    from transformers import PreTrainedModel

    if _original_from_pretrained is not None:
        return False
    original = PreTrainedModel.__dict__["from_pretrained"]

    def routed(cls: Any, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        if (
            not model_args
            and looks_like_nvfp4(pretrained_model_name_or_path)
            and not _wants_compressed_tensors_path(kwargs)
        ):
            kwargs.pop("quantization_config", None)
            return from_pretrained(pretrained_model_name_or_path, cls, **kwargs)
        return original.__func__(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    PreTrainedModel.from_pretrained = classmethod(functools.wraps(original.__func__)(routed))  # type: ignore[method-assign]
    _original_from_pretrained = original
    return True


def remove_routing() -> bool:
    global _original_from_pretrained
    if _original_from_pretrained is None:
        return False
    from transformers import PreTrainedModel

    PreTrainedModel.from_pretrained = _original_from_pretrained  # type: ignore[method-assign]
    _original_from_pretrained = None
    return True


def routing_installed() -> bool:
    return _original_from_pretrained is not None
