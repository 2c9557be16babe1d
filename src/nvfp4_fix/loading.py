"""``nvfp4_fix.from_pretrained``: transformers' own ``from_pretrained`` with the NVFP4 quantizers
registered for the call and this package's per-load options.

Everything else (ids, revisions, subfolders, the cache, placement, dtype, new heads, loading info,
saving) is transformers' own; the quantizers are in :mod:`nvfp4_fix.quantizer`.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import quantizer, registry
from .checkpoint import require_nvfp4
from .errors import CheckpointError, NVFP4Error
from .quant_configs import is_nvfp4_config, method_of
from .quantizer import LoadOptions

#: from_pretrained keyword arguments that select the files, passed to AutoConfig as well.
_FILE_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "force_download")


@contextlib.contextmanager
def quantizers_registered() -> Iterator[None]:
    """The NVFP4 quantizers are in transformers' registry inside this block (and stay if they were)."""
    added = registry.register()
    try:
        yield
    finally:
        if added:
            registry.unregister()


def class_of(config: Any) -> Any:
    """The transformers class named by ``config.architectures`` (AutoModelForCausalLM if none)."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def from_pretrained(
    path_or_id: str | os.PathLike[str],
    model_class: Any = None,
    *,
    activations: quantizer.ActivationMode = "quantize",
    dense_on_cpu: bool = False,
    quantize_embeddings: bool | None = None,
    quantize_lm_head: bool = False,
    **kwargs: Any,
) -> Any:
    """Load an NVFP4 checkpoint (a local folder or a hub id) with its layers packed, without leaving
    anything registered in transformers afterwards.

    ``model_class`` defaults to the class of ``config.architectures``. Other keyword arguments are
    transformers' own (``revision``, ``subfolder``, ``dtype``, ``device_map``, ``max_memory``,
    ``output_loading_info``, config overrides, ...). Per-load options:

    * ``activations``: "quantize" reproduces a W4A4 checkpoint's activation quantization, "bf16" skips it.
    * ``dense_on_cpu``: CPU only, dequantize each layer once and compute densely (fast, dense memory;
      refused in low-memory mode).
    * ``quantize_embeddings`` (default None: on in low-memory mode) quantizes the input embedding table,
      which producers leave in 16 bits, to NVFP4 after loading. Lossy: the table then differs from the
      checkpoint's by NVFP4 rounding, and ``save_pretrained`` writes the dequantized table. A table tied
      to the lm_head, one whose width is not a multiple of 16, or one that is not a plain
      ``nn.Embedding`` stays dense, with a log message saying so.
    * ``quantize_lm_head`` (default False) quantizes the dense lm_head to NVFP4 after loading (the same
      packed ``NVFP4Linear`` as the other layers; a decoded token reads 3.6x fewer of its bytes). Lossy: the
      logits differ from the checkpoint's by the NVFP4 rounding of the lm_head (the demo model on its
      held-out text: logits 2.8% relative L2 error, teacher-forced top-1 agreement 0.93 with the dense
      lm_head, perplexity +0.2%; benchmarks/lmhead_accuracy.py).
      ``save_pretrained`` writes the dequantized lm_head under its original name, with a warning that
      it is not the original. An lm_head tied to the input embedding gets a packed copy of its own and
      the embedding stays dense (so the saved checkpoint keeps the original table, and no lm_head).
      An lm_head that is not a plain ``nn.Linear``, or whose width is not a multiple of 16, stays
      dense, with a warning saying so.
    """
    if "torch_dtype" in kwargs:
        kwargs.setdefault("dtype", kwargs.pop("torch_dtype"))
    options = LoadOptions(activations, dense_on_cpu, quantize_embeddings, quantize_lm_head)
    local = Path(os.fspath(path_or_id), kwargs.get("subfolder") or "")
    if local.is_dir():  # headers and configs checked before transformers opens anything
        require_nvfp4(local)
    with quantizers_registered(), quantizer.load_options(options):
        config = _config(path_or_id, kwargs)
        if not is_nvfp4_config(getattr(config, "quantization_config", None)):
            qc = getattr(config, "quantization_config", None)
            what = f"quantization {method_of(qc)!r}" if qc else "no quantization_config"
            raise CheckpointError(
                f"{path_or_id}: not an NVFP4 checkpoint ({what}); expected compressed-tensors "
                "'nvfp4-pack-quantized' or ModelOpt quant_algo NVFP4 (plain transformers loads it as is)"
            )
        _check_quantization_config(path_or_id, config)
        _backport_expert_count(config, kwargs)
        model_class = model_class or class_of(config)
        if not local.is_dir():
            return model_class.from_pretrained(path_or_id, **kwargs)
        try:
            return model_class.from_pretrained(path_or_id, **kwargs)
        except (NVFP4Error, MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:  # a folder whose headers passed but whose config transformers cannot build
            text = " ".join(str(e).split())[:300]
            what = f"transformers cannot build {getattr(model_class, '__name__', model_class)} from it"
            raise CheckpointError(f"{local}: {what} ({type(e).__name__}: {text})") from None


def _check_quantization_config(path_or_id: str | os.PathLike[str], config: Any) -> None:
    """transformers parses the quantization_config inside from_pretrained, where a malformed one raises
    whatever its parser raises (pydantic, KeyError, ...): parse it here first, for a one-line error."""
    from transformers.quantizers.auto import AutoQuantizationConfig

    qc = getattr(config, "quantization_config", None)
    if not isinstance(qc, dict):
        return
    try:
        AutoQuantizationConfig.from_dict(copy.deepcopy(qc))
    except Exception as e:  # untrusted data: any parser error becomes one line naming the file
        text = " ".join(str(e).split())[:300]
        where = f"{path_or_id}/config.json: quantization_config"
        raise CheckpointError(f"{where}: transformers cannot read it ({type(e).__name__}: {text})") from None


def _backport_expert_count(config: Any, kwargs: dict[str, Any]) -> None:
    """transformers 5 writes MoE expert counts as ``num_local_experts``; 4.57's Qwen3-MoE reads
    ``num_experts`` and would build 128 experts (a size mismatch on load). Pass the count across."""
    saved = getattr(config, "num_local_experts", None)
    if isinstance(saved, int) and getattr(config, "num_experts", saved) != saved:
        kwargs.setdefault("num_experts", saved)


def _config(path_or_id: str | os.PathLike[str], kwargs: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    file_kwargs = {k: kwargs[k] for k in _FILE_KWARGS if k in kwargs}
    try:
        return AutoConfig.from_pretrained(
            path_or_id, trust_remote_code=kwargs.get("trust_remote_code", False), **file_kwargs
        )
    except OSError as e:  # not a folder, not in the cache offline, no such repository: one line
        raise CheckpointError(" ".join(str(e).split())[:500]) from None
