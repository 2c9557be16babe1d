"""LoRA adapters on packed NVFP4 layers through peft (QLoRA for NVFP4).

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

Refused with a clear error: merging into the packed base (it would re-quantize W + BA to NVFP4 and
lose most of a small update), DoRA and the other LoRA variants, and initialisations that read or
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
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .layer import NVFP4Linear
from .moe import NVFP4Experts

logger = logging.getLogger("nvfp4_fix")

__all__ = ["NVFP4LoraLinear", "dispatch_nvfp4", "custom_modules", "install", "uninstall", "installed"]

_PLAIN_INITS = (True, False, "gaussian")


def _refuse_unsupported(config: Any, base: NVFP4Linear) -> None:
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
            f"nvfp4-fix: LoRA variant(s) {variants} are not supported on a packed NVFP4 layer ({base}):"
            " DoRA and the other variants need the dense base weight at every step. Plain LoRA is supported;"
            " for DoRA, load the base dense (nvfp4-fix dequantize) and train on that."
        )
    init = config.init_lora_weights
    if not any(init is p or (isinstance(init, str) and init == p) for p in _PLAIN_INITS):
        raise ValueError(
            f"nvfp4-fix: init_lora_weights={init!r} reads or rewrites the base weight, which is packed NVFP4"
            f" here ({base}); use True (default), False or 'gaussian'"
        )


class NVFP4LoraLinear(nn.Module, LoraLayer):
    """LoRA on a packed :class:`NVFP4Linear`: y = base(x) + scaling * B(A(dropout(x)))."""

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
        if not isinstance(base, NVFP4Linear):
            raise TypeError(f"NVFP4LoraLinear wraps an NVFP4Linear, got {type(base).__name__}")
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
        # The packed codes are uint8: take their device, and leave the adapters' float dtype alone.
        return self.get_base_layer().weight_packed.device, None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "nvfp4-fix: merging LoRA into a packed NVFP4 base is refused: W + BA would have to be"
            " re-quantized to NVFP4, whose rounding step (a third to a half of most values) is far larger"
            " than a typical LoRA update, so most of the adapter would be lost. Keep the adapter separate"
            " (save_pretrained writes it), or merge into a dense copy of the base: nvfp4-fix dequantize"
            " PATH OUT, then PeftModel.from_pretrained(dense_model, adapter).merge_and_unload()."
        )

    def unmerge(self) -> None:
        if self.merged:  # merge() never succeeds, so nothing can be merged
            raise RuntimeError("nvfp4-fix: a packed NVFP4 layer cannot hold a merged adapter")
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
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


def dispatch_nvfp4(target: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> nn.Module | None:
    """peft's dispatcher protocol: the LoRA layer for ``target`` if it is a packed NVFP4 layer, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if kwargs.get("parameter_name") is not None and isinstance(base, (NVFP4Linear, NVFP4Experts)):
        raise ValueError(
            f"nvfp4-fix: target_parameters ({kwargs['parameter_name']!r}) cannot adapt packed NVFP4 weights;"
            " packed experts are one NVFP4Linear per expert: target them with target_modules"
            " (e.g. ['gate_proj', 'up_proj', 'down_proj'])"
        )
    if isinstance(base, NVFP4Linear):
        return NVFP4LoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def custom_modules() -> dict[type[nn.Module], type[nn.Module]]:
    """The mapping for peft's explicit route: ``config._register_custom_module(custom_modules())``."""
    return {NVFP4Linear: NVFP4LoraLinear}


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
            packed = {n for n, m in model.named_modules() if isinstance(m, NVFP4Linear) and n not in inside}
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
