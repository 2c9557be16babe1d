"""Write NVFP4 (and mixed NVFP4 + FP8) checkpoints from dense models, in either layout (for benchmarks,
tests and tools).

Real checkpoints come from llmcompressor and ModelOpt; this writer exists so that large shapes
(e.g. a random Llama-3-8B) can be made without them. It quantizes with the reference quantizer in
:mod:`nvfp4_fix.codec` and writes the same names, dtypes and configs the producers write.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import COMPRESSED_TENSORS, MODELOPT
from .codec import BLOCK, FP8_MAX, quantize
from .fsutil import atomic_directory
from .schemes import FP8Spec


def ct_quantization_config(ignore: list[str], w4a4: bool) -> dict[str, Any]:
    weights = {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "strategy": "tensor_group",
        "group_size": 16,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
        "scale_dtype": "torch.float8_e4m3fn",
        "zp_dtype": None,
        "block_structure": None,
    }
    acts = dict(weights, dynamic="local") if w4a4 else None
    return {
        "quant_method": COMPRESSED_TENSORS,
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": acts,
                "output_activations": None,
                "format": "nvfp4-pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": "nvfp4-fix",
    }


def modelopt_quant_config(exclude: list[str], w4a4: bool) -> dict[str, Any]:
    return {
        "producer": {"name": "nvfp4-fix", "version": "0.1.0"},
        "quantization": {
            "quant_algo": "NVFP4" if w4a4 else "W4A16_NVFP4",
            "kv_cache_quant_algo": None,
            "group_size": BLOCK,
            "exclude_modules": exclude,
        },
    }


#: Projections that runtimes fuse into one GEMM (vLLM's QKV and gate/up) must share one per-tensor
#: scale, as llmcompressor and ModelOpt write them.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def global_scale_for(amax: float, layout: str) -> torch.Tensor:
    """The per-tensor scale of a layer whose largest |weight| is ``amax``, in the layout's convention."""
    amax = max(float(amax), 1e-12)
    return torch.tensor(448.0 * 6.0 / amax if layout == COMPRESSED_TENSORS else amax / (448.0 * 6.0))


def fused_amax(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """amax per layer prefix, shared by the members of each fused group under one parent module."""
    amax = {p: float(w.abs().max()) for p, w in weights.items()}
    shared = dict(amax)
    for p in amax:
        parent, _, leaf = p.rpartition(".")
        for group in FUSED_GROUPS:
            if leaf in group:
                members = [f"{parent}.{g}" if parent else g for g in group]
                shared[p] = max(amax.get(m, 0.0) for m in members)
    return shared


def quantized_tensors(
    prefix: str,
    weight: torch.Tensor,
    layout: str,
    input_amax: float | None = None,
    weight_amax: float | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one NVFP4 linear, from its dense weight (``weight_amax``: the amax
    its per-tensor scale is computed from, e.g. shared with its fused partners)."""
    convention = "divisor" if layout == COMPRESSED_TENSORS else "multiplier"
    glob = None if weight_amax is None else global_scale_for(weight_amax, layout)
    packed, scale, glob = quantize(weight, convention, glob)
    if layout == COMPRESSED_TENSORS:
        out = {
            f"{prefix}.weight_packed": packed,
            f"{prefix}.weight_scale": scale,
            f"{prefix}.weight_global_scale": glob.reshape(1),
        }
        if input_amax is not None:
            out[f"{prefix}.input_global_scale"] = torch.tensor([448.0 * 6.0 / input_amax])
        return out
    out = {
        f"{prefix}.weight": packed,
        f"{prefix}.weight_scale": scale,
        f"{prefix}.weight_scale_2": glob.reshape(()),
    }
    if input_amax is not None:
        out[f"{prefix}.input_scale"] = torch.tensor(input_amax / (448.0 * 6.0))
    return out


#: ModelOpt's FP8 (and the default FP8 kind written): per-tensor weights, static per-tensor input scale.
MODELOPT_FP8 = FP8Spec("tensor", "static")


def fp8_tensors(
    prefix: str, weight: torch.Tensor, spec: FP8Spec, layout: str, input_amax: float
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one FP8 linear: e4m3 weight, scale = amax / 448 per tensor, row or
    block, and a static input scale = input_amax / 448 where the spec asks for one."""
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    if spec.weights == "block":
        bn, bk = spec.block or (128, 128)
        rows, cols = math.ceil(n / bn), math.ceil(k / bk)
        padded = torch.zeros(rows * bn, cols * bk, device=w.device)
        padded[:n, :k] = w
        scale = padded.reshape(rows, bn, cols, bk).abs().amax(dim=(1, 3)) / FP8_MAX
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    elif spec.weights == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
        full = scale
    else:
        scale = (w.abs().max() / FP8_MAX).reshape(1)
        full = scale
    scale = scale.clamp(min=1e-12)
    full = full.clamp(min=1e-12)
    out = {
        f"{prefix}.weight": (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn),
        f"{prefix}.weight_scale": scale if layout == COMPRESSED_TENSORS else scale.reshape(()),
    }
    if spec.activations == "static":
        value = torch.tensor([input_amax / FP8_MAX])
        out[f"{prefix}.input_scale"] = value if layout == COMPRESSED_TENSORS else value.reshape(())
    return out


def _named(name: str, patterns: list[str]) -> bool:
    """Module ``name`` is one of ``patterns``: the name, a dotted suffix of it, or a ``re:`` regex."""
    return any(
        re.match(p[3:], name) is not None if p.startswith("re:") else name == p or name.endswith("." + p)
        for p in patterns
    )


def _fp8_group(names: list[str], spec: FP8Spec) -> dict[str, Any]:
    def args(strategy: str, dynamic: bool, **extra: Any) -> dict[str, Any]:
        return {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": strategy,
            "dynamic": dynamic,
            **extra,
        }

    weights = args(spec.weights, False, block_structure=list(spec.block) if spec.block else None)
    acts = {
        "none": None,
        "static": args("tensor", False),
        "dynamic-tensor": args("tensor", True),
        "dynamic-token": args("token", True),
        "dynamic-group": args("group", True, group_size=spec.group_size),
    }[spec.activations]
    return {
        "targets": sorted(names),
        "weights": weights,
        "input_activations": acts,
        "format": "float-quantized",
    }


def save_quantized(
    model: nn.Module,
    out: str | os.PathLike[str],
    layout: str = COMPRESSED_TENSORS,
    ignore: Iterable[str] = ("lm_head",),
    input_amax: float | None = None,
    max_shard_bytes: int = 4 * 1024**3,
    fp8: Iterable[str] = (),
    fp8_spec: FP8Spec = MODELOPT_FP8,
    fp8_input_amax: float = 4.0,
    state: Iterable[Mapping[str, torch.Tensor]] | None = None,
) -> Path:
    """Quantize every nn.Linear of ``model`` (except ``ignore``) to NVFP4 and write a checkpoint.

    ``fp8`` (module names, dotted suffixes or ``re:`` patterns) writes those linears as FP8 of kind
    ``fp8_spec`` instead: a compressed-tensors ``mixed-precision`` or ModelOpt ``MIXED_PRECISION``
    checkpoint (ModelOpt's FP8 is per-tensor weights with a static input scale only).

    ``state``: the weights as batches of ``{name: tensor}`` (each holding whole fused groups, e.g. one
    decoder layer) instead of ``model.state_dict()``; the model then gives only module names and the
    config (it may live on the meta device). Each batch is quantized on its tensors' device and moved
    to shards on the CPU before the next is drawn, so a model larger than memory can be written."""
    if layout not in (COMPRESSED_TENSORS, MODELOPT):
        raise ValueError(f"layout must be {COMPRESSED_TENSORS!r} or {MODELOPT!r}")
    fp8 = list(fp8)
    if fp8 and layout == MODELOPT and fp8_spec != MODELOPT_FP8:
        raise ValueError(f"ModelOpt FP8 is per-tensor with a static input scale, not {fp8_spec.describe()}")
    from safetensors.torch import save_file

    ignore = list(ignore)
    linears = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and m.in_features % BLOCK == 0
        and not any(n == i or n.endswith("." + i) for i in ignore)
    }
    fp8_linears = {n for n in linears if _named(n, fp8)}
    linears -= fp8_linears
    out = Path(out)
    with atomic_directory(out) as tmp:
        shards = _Shards(tmp, max_shard_bytes, save_file)
        for batch in [model.state_dict()] if state is None else state:
            for name, t in _batch_tensors(
                batch, linears, fp8_linears, layout, input_amax, fp8_spec, fp8_input_amax
            ):
                shards.add(name, t)
        shards.close()
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        w4a4 = input_amax is not None
        if layout == COMPRESSED_TENSORS:
            cfg["quantization_config"] = qc = ct_quantization_config(ignore, w4a4)
            if fp8_linears:  # exact names outrank the NVFP4 group's "Linear" target
                qc["config_groups"]["group_1"] = _fp8_group(sorted(fp8_linears), fp8_spec)
                qc["format"] = "mixed-precision"
        else:
            hq = modelopt_quant_config(ignore, w4a4)
            if fp8_linears:
                nv = {"quant_algo": "NVFP4" if w4a4 else "W4A16_NVFP4", "group_size": BLOCK}
                layers = {n: dict(nv) for n in sorted(linears)} | {
                    n: {"quant_algo": "FP8"} for n in sorted(fp8_linears)
                }
                hq["quantization"].update(quant_algo="MIXED_PRECISION", quantized_layers=layers)
            (tmp / "hf_quant_config.json").write_text(json.dumps(hq, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _batch_tensors(
    batch: Mapping[str, torch.Tensor],
    linears: set[str],
    fp8_linears: set[str],
    layout: str,
    input_amax: float | None,
    fp8_spec: FP8Spec,
    fp8_input_amax: float,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensors of one batch of weights, in order."""
    seen: set[tuple[Any, int, tuple[int, ...]]] = set()
    amax = fused_amax({p: batch[f"{p}.weight"] for p in linears if f"{p}.weight" in batch})
    for name, t in batch.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in fp8_linears and leaf == "weight":
            yield from fp8_tensors(prefix, t, fp8_spec, layout, fp8_input_amax).items()
            continue
        if prefix in linears and leaf == "weight":
            yield from quantized_tensors(prefix, t, layout, input_amax, amax[prefix]).items()
            continue
        # Tied weights (e.g. lm_head = embed_tokens) are written once, as save_pretrained does:
        # safetensors refuses tensors that share memory, and loaders re-tie them.
        ident = (t.device, t.data_ptr(), tuple(t.shape))
        if t.numel() and ident in seen:
            continue
        seen.add(ident)
        yield name, t.contiguous()


class _Shards:
    """Safetensors shards of at most ``max_bytes`` (a tensor never split), written as they fill; one
    shard is ``model.safetensors``, more are ``model-0000i-of-0000n.safetensors`` with an index."""

    def __init__(self, folder: Path, max_bytes: int, save_file: Any) -> None:
        self.folder, self.max_bytes, self.save_file = folder, max_bytes, save_file
        self.shard: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.names: list[list[str]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.shard and self.size + nbytes > self.max_bytes:
            self._flush()
        self.shard[name] = t.detach().to("cpu")
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self.names) + 1:05d}.safetensors"
        self.save_file(self.shard, str(path), metadata={"format": "pt"})
        self.names.append(list(self.shard))
        self.shard, self.size = {}, 0

    def close(self) -> None:
        if self.shard or not self.names:
            self._flush()
        count = len(self.names)
        if count == 1:
            os.replace(self.folder / "shard-00001.safetensors", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.names, 1):
            fname = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / f"shard-{i:05d}.safetensors", self.folder / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
