"""LoRA adapters on packed NVFP4 layers (and the FP8 layers of mixed checkpoints) through peft.

``NVFP4LoraLinear`` follows peft's convention for custom LoRA layers (the classes that
``LoraConfig._register_custom_module`` takes): the packed base layer stays frozen and packed, the
adapters ``lora_A`` / ``lora_B`` train as on any ``nn.Linear``, and their state-dict keys are peft's
own, so ``save_pretrained`` / ``PeftModel.from_pretrained`` work unchanged.

peft picks a LoRA layer class in ``LoraModel._create_new_module`` from a fixed list of dispatchers
(bitsandbytes, GPTQ, HQQ, ... each matching its own layer class, then ``nn.Linear``), plus the
mapping a user registered on the config. ``install()`` puts :func:`dispatch_nvfp4` in front of that
list for NVFP4 layers only (and adds the packed layers to what ``target_modules="all-linear"``
selects: peft picks those by type, ``nn.Linear``), so a plain ``get_peft_model(model, LoraConfig(...))`` (and
``PeftModel.from_pretrained``, ``model.add_adapter``) works with no extra call, whenever and
wherever the ``LoraConfig`` was made. A mapping the user registered for ``NVFP4Linear`` still wins.
:mod:`nvfp4_fix.lora_hook` calls ``install()`` when peft is imported next to a loaded NVFP4 layer.

Merging (``merge_adapter``, ``merge_and_unload``) re-quantizes W + scaling * B @ A (divided by the AWQ
pre-scale where there is one) to NVFP4 with fresh block and global scales, so the merged model is a
packed NVFP4 model again (``save_pretrained`` writes an NVFP4 checkpoint in the base's layout), and
``unmerge`` restores the original bytes exactly. It is lossy: updates smaller than NVFP4's rounding step
vanish. Measured on the demo model (scripts/train_lora_demo.py --steps 30 --batch 6 --eval-windows 24
--merge, held-out perplexity, base 142.0): lr 5e-3, adapter 50.79, merged 51.02; lr 5e-4 (a smaller
update), adapter 108.84, merged 129.96.
(W4A4: the merged update also goes through the activation fake-quantization.)

Mixed checkpoints: the FP8 layers get :class:`FP8LoraLinear` the same way (base frozen in float8_e4m3fn,
the checkpoint's FP8 activation quantization straight-through); merging into them is refused.

Refused with a clear error: DoRA and the other LoRA variants, and initialisations that read or
rewrite the base weight (PiSSA, OLoRA, LoftQ, ...). Packed MoE experts are one NVFP4Linear per expert
and projection: they are adapted per expert through ``target_modules`` (``gate_proj``, ``up_proj``,
``down_proj``); ``target_parameters`` (peft's route for transformers 5's fused 3-D expert weights)
matches nothing in a packed block, which peft reports ("no parameter was matched").
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .checkpoint import COMPRESSED_TENSORS
from .codec import quantize
from .fp8 import FP8Linear
from .layer import NVFP4Linear
from .moe import NVFP4Experts

logger = logging.getLogger("nvfp4_fix")

__all__ = [
    "NVFP4LoraLinear",
    "FP8LoraLinear",
    "dispatch_nvfp4",
    "custom_modules",
    "install",
    "uninstall",
    "installed",
]

_PLAIN_INITS = (True, False, "gaussian")


def _refuse_unsupported(config: Any, base: nn.Module) -> None:
    """Variants and initialisations that need the dense base weight, checked before anything is built."""
    variants = [
        f.name
        for f in dataclasses.fields(config)
        if f.metadata.get("is_lora_variant") and getattr(config, f.name)
    ]
    if getattr(config, "use_dora", False) and "use_dora" not in variants:
        variants.append("use_dora")
    if variants:
        raise ValueError(
            f"nvfp4-fix: LoRA variant(s) {variants} are not supported on a quantized layer ({base}):"
            " DoRA and the other variants need the dense base weight at every step. Plain LoRA is supported;"
            " for DoRA, load the base dense (nvfp4-fix dequantize) and train on that."
        )
    init = config.init_lora_weights
    if not any(init is p or (isinstance(init, str) and init == p) for p in _PLAIN_INITS):
        raise ValueError(
            f"nvfp4-fix: init_lora_weights={init!r} reads or rewrites the base weight, which is quantized"
            f" here ({base}); use True (default), False or 'gaussian'"
        )


_ORIGINAL = "nvfp4_fix_original_packed"


def _packed_tensors(base: NVFP4Linear) -> list[torch.Tensor | None]:
    """What a merge rewrites: codes, block scales, global scale, bias."""
    return [base.weight_packed, base.weight_scale, base._parameters[base._global_name], base.bias]


def _refresh(base: NVFP4Linear) -> None:
    """Drop what was derived from the old tensors: the cached multipliers, a dense copy."""
    base._mul, base._mul_key = None, None
    fused = base._fused
    if fused is not None:  # codes and scales are views of its buffers; its bias is a copy
        fused._mul_key = None
        if fused.bias is not None and base.bias is not None:
            lo, hi = fused.offsets[base._fused_index], fused.offsets[base._fused_index + 1]
            with torch.no_grad():
                fused.bias[lo:hi].copy_(base.bias.detach().to(fused.bias.dtype))
    if base.dense_weight is not None:
        base.keep_dense_copy(base.dense_weight.dtype)


def _requantize(base: NVFP4Linear, w: torch.Tensor) -> None:
    """Write dense w [N, K] into ``base`` as NVFP4 in place (views of a fused buffer stay views)."""
    convention = "divisor" if base.layout == COMPRESSED_TENSORS else "multiplier"
    packed, scale, glob = quantize(w, convention)
    g = base._parameters[base._global_name]
    with torch.no_grad():
        base.weight_packed.copy_(packed)
        base.weight_scale.copy_(scale)
        g.copy_(glob.reshape(g.shape))
    _refresh(base)


class NVFP4LoraLinear(nn.Module, LoraLayer):
    """LoRA on a packed :class:`NVFP4Linear`: y = base(x) + scaling * B(A(dropout(x)))."""

    base_type: type[nn.Module] = NVFP4Linear

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: Any,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not isinstance(base, self.base_type):
            raise TypeError(
                f"{type(self).__name__} wraps an {self.base_type.__name__}, got {type(base).__name__}"
            )
        _refuse_unsupported(config, base)
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
        _refuse_unsupported(config, self.get_base_layer())  # also for adapters added later
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        base = self.get_base_layer()  # peft's generic lookup works too, but warns "unsupported layer type"
        return base.in_features, base.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, None]:
        # The codes are uint8 / float8: take the device of the (NVFP4 or FP8) scales beside them, and
        # leave the adapters' float dtype alone.
        return self.get_base_layer().weight_scale.device, None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Re-quantize W + scaling * B @ A to NVFP4 in place (new block and global scales from the
        merged weight); the layer stays packed. Lossy: see the module docstring for what it costs.
        The original packed tensors are kept until ``unmerge`` (which restores them exactly) or
        until the adapter layer is dropped (``merge_and_unload``)."""
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.lora_A:
                continue
            warnings.warn(
                "nvfp4-fix: merging LoRA into a packed NVFP4 layer re-quantizes W + BA to NVFP4 (lossy:"
                " updates smaller than NVFP4's rounding step are lost; see nvfp4_fix.lora)",
                stacklevel=2,
            )
            if self.lora_bias[name] and base.bias is None:
                raise ValueError(
                    f"nvfp4-fix: adapter {name!r} has a bias but {base} has none to merge it into"
                )
            if not self.merged_adapters:
                self._cache_store(
                    _ORIGINAL, [None if t is None else t.detach().clone() for t in _packed_tensors(base)]
                )
            w = base.dequantized_weight(torch.float32) + self._delta_on_base_input(name)
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {name} seems to be broken"
                )
            _requantize(base, w)
            if self.lora_bias[name]:
                with torch.no_grad():
                    base.bias += self.lora_B[name].bias.detach().to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        with torch.no_grad():
            for t, old in zip(_packed_tensors(base), self._cache_pop(_ORIGINAL), strict=True):
                if t is not None:
                    t.copy_(old)
        _refresh(base)
        self.merged_adapters.clear()

    def _delta_on_base_input(self, name: str) -> torch.Tensor:
        """The update in the packed weight's own input space: AWQ checkpoints multiply x by
        pre_quant_scale before W, while the adapter sees x itself, so W' = W + delta / s."""
        base = self.get_base_layer()
        delta = self.get_delta_weight(name).detach().to(torch.float32)
        if base.pre_quant_scale is not None:
            delta = delta / base.pre_quant_scale.detach().to(torch.float32).reshape(1, -1)
        return delta

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            xa = x if torch.is_autocast_enabled() else self._cast_input_dtype(x, lora_a.weight.dtype)
            delta = lora_b(lora_a(self.lora_dropout[name](xa))) * self.scaling[name]
            result = result + delta.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class FP8LoraLinear(NVFP4LoraLinear):
    """LoRA on an FP8 layer of a mixed checkpoint (:class:`FP8Linear`): the base stays float8_e4m3fn and
    frozen; the gradient reaches x through its differentiable path (fp8_cuda.layer_forward), with the
    checkpoint's FP8 activation quantization straight-through. Merging is refused: it would need an FP8
    re-quantization in the producer's scale scheme (per tensor, channel or block) that is not written."""

    base_type = FP8Linear

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            f"nvfp4-fix: merging LoRA into an FP8 layer ({self.get_base_layer()}) is not supported; keep the"
            " adapter separate (save_pretrained writes it), or merge into a dequantized model"
            " (nvfp4-fix dequantize, then load it with peft)"
        )


def dispatch_nvfp4(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> nn.Module | None:
    """peft's dispatcher protocol: the LoRA layer for ``target`` if it is a packed NVFP4 or an FP8 layer,
    else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if kwargs.get("parameter_name") is not None and isinstance(base, (NVFP4Linear, NVFP4Experts)):
        raise ValueError(
            f"nvfp4-fix: target_parameters ({kwargs['parameter_name']!r}) cannot adapt packed NVFP4 weights;"
            " packed experts are one NVFP4Linear per expert: target them with target_modules"
            " (e.g. ['gate_proj', 'up_proj', 'down_proj'])"
        )
    for layer in custom_modules().values():
        if isinstance(base, layer.base_type):
            return layer(target, adapter_name, config=config, **kwargs)
    return None


def custom_modules() -> dict[type[nn.Module], type[nn.Module]]:
    """The mapping for peft's explicit route: ``config._register_custom_module(custom_modules())``."""
    return {layer.base_type: layer for layer in (NVFP4LoraLinear, FP8LoraLinear)}


def _user_mapped(config: Any, base: nn.Module) -> bool:
    mapping = getattr(config, "_custom_modules", None) or {}
    return any(isinstance(base, key) for key in mapping)


def _wrap_create(create: Any) -> Any:
    def _create_new_module(
        lora_config: Any, adapter_name: str, target: nn.Module, **kwargs: Any
    ) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not _user_mapped(lora_config, base):
            new = dispatch_nvfp4(target, adapter_name, lora_config, **kwargs)
            if new is not None:
                return new
        return create(lora_config, adapter_name, target, **kwargs)

    return _create_new_module


def _wrap_all_linear(include: Any) -> Any:
    """``target_modules="all-linear"`` selects nn.Linear (and adapted "*Linear" layers) by type; add
    the packed layers, except those already inside an adapter layer."""

    def _maybe_include_all_linear_layers(peft_config: Any, model: nn.Module) -> Any:
        targets = getattr(peft_config, "target_modules", None)
        asked = isinstance(targets, str) and targets.lower() == "all-linear"
        peft_config = include(peft_config, model)
        if asked:
            inside = {
                f"{prefix}.{sub}"
                for prefix, m in model.named_modules()
                if isinstance(m, BaseTunerLayer)
                for sub, _ in m.named_modules()
                if sub
            }
            quantized = tuple(custom_modules())
            packed = {n for n, m in model.named_modules() if isinstance(m, quantized) and n not in inside}
            peft_config.target_modules = set(peft_config.target_modules) | packed
        return peft_config

    return _maybe_include_all_linear_layers


def _patches() -> list[tuple[Any, str, Any, bool]]:
    """(owner, attribute, wrapper factory, is a staticmethod) for each peft function wrapped."""
    from peft.tuners import tuners_utils
    from peft.tuners.lora.model import LoraModel

    return [
        (LoraModel, "_create_new_module", _wrap_create, True),
        (tuners_utils, "_maybe_include_all_linear_layers", _wrap_all_linear, False),
    ]


def _current(owner: Any, name: str, static: bool) -> Any:
    value = vars(owner).get(name)
    return value.__func__ if static and isinstance(value, staticmethod) else (None if static else value)


def installed() -> bool:
    return all(getattr(_current(o, n, st), "_nvfp4_fix", False) for o, n, _, st in _patches())


def install() -> bool:
    """Put :func:`dispatch_nvfp4` in front of peft's LoRA dispatchers and teach ``"all-linear"`` the
    packed layers (idempotent). False, with a warning naming the explicit route, where this peft lacks
    one of the two functions."""
    patches = _patches()
    if any(not callable(_current(o, n, st)) for o, n, _, st in patches):
        logger.warning(
            "nvfp4-fix: this peft has no LoraModel._create_new_module / _maybe_include_all_linear_layers;"
            " register the NVFP4 LoRA layer yourself:"
            " config._register_custom_module(nvfp4_fix.lora.custom_modules())"
        )
        return False
    for owner, name, wrap, static in patches:
        original = _current(owner, name, static)
        if getattr(original, "_nvfp4_fix", False):
            continue
        wrapper = wrap(original)
        wrapper._nvfp4_fix = True
        wrapper.__wrapped__ = original
        setattr(owner, name, staticmethod(wrapper) if static else wrapper)
    return True


def uninstall() -> bool:
    """Restore peft's own functions; True if there was something to undo."""
    undone = False
    for owner, name, _, static in _patches():
        current = _current(owner, name, static)
        if getattr(current, "_nvfp4_fix", False):
            original = current.__wrapped__
            setattr(owner, name, staticmethod(original) if static else original)
            undone = True
    return undone


install()  # importing this module is enough (nvfp4_fix.lora_hook imports it when peft is imported)
