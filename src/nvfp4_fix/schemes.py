"""What a checkpoint's quantization config says each layer is, from the config alone.

compressed-tensors: every ``config_groups`` entry has ``targets`` (module names, ``re:`` patterns,
class names such as ``Linear``) and the config an ``ignore`` list; a module takes the group of its
most specific target, as compressed-tensors' ``match_targets`` orders them (exact names, then
patterns, then class names, each alphabetically). ModelOpt: one ``quant_algo`` for the model minus
``exclude_modules`` (shell-style wildcards), or ``MIXED_PRECISION`` with a per-layer
``quantized_layers`` dict.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Literal

COMPRESSED_TENSORS = "compressed-tensors"
MODELOPT = "modelopt"
NVFP4_PACKED = "nvfp4-pack-quantized"

#: The layer kinds nvfp4-fix loads.
Scheme = Literal["nvfp4", "fp8"]
#: How an FP8 weight is scaled: one scale, one per output row, or one per (rows x cols) block.
WeightStrategy = Literal["tensor", "channel", "block"]
#: What an FP8 layer does to its input: nothing (W8A16), a static per-tensor ``input_scale``, or a
#: scale computed at run time per tensor, per token (row) or per group of ``group_size`` columns.
ActivationQuant = Literal["none", "static", "dynamic-tensor", "dynamic-token", "dynamic-group"]


@dataclass(frozen=True)
class FP8Spec:
    weights: WeightStrategy
    activations: ActivationQuant = "none"
    block: tuple[int, int] | None = None  # (rows, cols) for the "block" strategy
    group_size: int | None = None  # for "dynamic-group" activations

    def describe(self) -> str:
        w = {"tensor": "per-tensor", "channel": "per-channel", "block": "block"}[self.weights]
        if self.block:
            w += f" {self.block[0]}x{self.block[1]}"
        a = {
            "none": "16-bit activations",
            "static": "static FP8 activations",
            "dynamic-tensor": "dynamic per-tensor FP8 activations",
            "dynamic-token": "dynamic per-token FP8 activations",
            "dynamic-group": f"dynamic per-group-{self.group_size} FP8 activations",
        }[self.activations]
        return f"FP8 {w}, {a}"


@dataclass(frozen=True)
class LayerRule:
    """The config's verdict on one module. ``scheme`` None: a quantization nvfp4-fix does not load
    (int4, MXFP4, ...), named by ``detail``."""

    scheme: Scheme | None
    source: str  # where the config says so, for messages: "config_groups.group_1", "quantized_layers"
    detail: str  # the format or algorithm as the config names it
    w4a4: bool = False  # NVFP4 with NVFP4 activations
    fp8: FP8Spec | None = None


def _obj(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


# ----------------------------------------------------------------------------------- compressed-tensors


@dataclass(frozen=True)
class TargetGroup:
    name: str
    targets: tuple[str, ...]
    rule: LayerRule


def _ct_fp8(weights: dict[str, Any], acts: dict[str, Any] | None) -> FP8Spec | None:
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        return None
    block = None
    if strategy == "block":
        bs = weights.get("block_structure")
        if not (isinstance(bs, list) and len(bs) == 2 and all(type(v) is int and v > 0 for v in bs)):
            return None
        block = (bs[0], bs[1])
    if not acts:
        return FP8Spec(strategy, "none", block)
    if acts.get("type") != "float" or acts.get("num_bits") != 8 or not acts.get("symmetric", True):
        return None
    a_strategy, dynamic = acts.get("strategy"), acts.get("dynamic")
    if dynamic is False and a_strategy == "tensor":
        return FP8Spec(strategy, "static", block)
    if dynamic is True and a_strategy in ("tensor", "token"):
        return FP8Spec(strategy, "dynamic-tensor" if a_strategy == "tensor" else "dynamic-token", block)
    size = acts.get("group_size")
    if dynamic is True and a_strategy == "group" and type(size) is int and size > 0:
        return FP8Spec(strategy, "dynamic-group", block, size)
    return None


def _ct_rule(name: str, group: dict[str, Any], top_format: Any) -> LayerRule:
    weights = _obj(group.get("weights"))
    acts = group.get("input_activations")
    acts = acts if isinstance(acts, dict) else None
    fmt = group.get("format") or top_format
    source = f"config_groups.{name}"
    nvfp4_args = (
        weights.get("num_bits") == 4
        and weights.get("type") == "float"
        and weights.get("strategy") == "tensor_group"
        and weights.get("group_size") == 16
    )
    if fmt == NVFP4_PACKED or (fmt == "mixed-precision" and nvfp4_args):
        return LayerRule("nvfp4", source, NVFP4_PACKED, w4a4=acts is not None)
    fp8_args = (
        weights.get("num_bits") == 8 and weights.get("type") == "float" and weights.get("symmetric", True)
    )
    if fp8_args and fmt in ("float-quantized", "naive-quantized", "mixed-precision"):
        spec = _ct_fp8(weights, acts)
        if spec is not None:
            return LayerRule("fp8", source, "float-quantized", fp8=spec)
        return LayerRule(None, source, f"float-quantized with weights {weights} and activations {acts}")
    return LayerRule(None, source, str(fmt))


def ct_groups(qc: dict[str, Any]) -> list[TargetGroup]:
    out = []
    for name, group in _obj(qc.get("config_groups")).items():
        if not isinstance(group, dict):
            continue
        targets = group.get("targets") or []
        targets = tuple(str(t) for t in targets) if isinstance(targets, list) else ()
        out.append(TargetGroup(str(name), targets, _ct_rule(str(name), group, qc.get("format"))))
    return out


def _name_match(name: str, target: str) -> bool:
    if target.startswith("re:"):
        try:
            return re.match(target[3:], name) is not None
        except re.error:
            return False
    return target == name


#: Class names a checkpoint's quantized linear modules always carry (nn.Linear and its bases).
LINEAR_CLASSES = ("Linear", "LinearBase")


def ct_rule_for(name: str, groups: list[TargetGroup], ignore: list[str]) -> LayerRule | None:
    """The rule compressed-tensors applies to linear module ``name``, or None (ignored, or no target)."""
    if any(_name_match(name, t) or t in LINEAR_CLASSES for t in ignore):
        return None
    by_target: dict[str, LayerRule] = {}
    for g in groups:
        for t in g.targets:
            by_target[t] = g.rule  # a target in two groups: the later one wins, as in compressed-tensors
    ordered = sorted(by_target, key=lambda t: ("re:" in t, t))
    for t in ordered:
        if _name_match(name, t):
            return by_target[t]
    for t in ordered:
        if t in LINEAR_CLASSES:
            return by_target[t]
    return None


def ct_names_layer(name: str, groups: list[TargetGroup]) -> bool:
    """Whether some group targets ``name`` by its name or a pattern (not only by class)."""
    return any(_name_match(name, t) for g in groups for t in g.targets)


def ct_has_nvfp4(qc: dict[str, Any]) -> bool:
    return qc.get("format") == NVFP4_PACKED or any(g.rule.scheme == "nvfp4" for g in ct_groups(qc))


# -------------------------------------------------------------------------------------------- ModelOpt

_MODELOPT_ALGOS: dict[str, LayerRule] = {
    "NVFP4": LayerRule("nvfp4", "", "NVFP4", w4a4=True),
    "NVFP4_AWQ": LayerRule("nvfp4", "", "NVFP4_AWQ", w4a4=True),
    "W4A16_NVFP4": LayerRule("nvfp4", "", "W4A16_NVFP4"),
    "FP8": LayerRule("fp8", "", "FP8", fp8=FP8Spec("tensor", "static")),
    "FP8_PER_CHANNEL_PER_TOKEN": LayerRule(
        "fp8", "", "FP8_PER_CHANNEL_PER_TOKEN", fp8=FP8Spec("channel", "dynamic-token")
    ),
    "FP8_PB_WO": LayerRule("fp8", "", "FP8_PB_WO", fp8=FP8Spec("block", "none", (128, 128))),
}
MIXED_PRECISION = "MIXED_PRECISION"


def modelopt_section(qc: dict[str, Any]) -> dict[str, Any]:
    """The dict holding ``quant_algo``: hf_quant_config.json's ``quantization``, or config.json's
    ``quantization_config`` itself."""
    return _obj(qc.get("quantization")) or qc


def modelopt_algo_rule(algo: Any, source: str) -> LayerRule:
    rule = _MODELOPT_ALGOS.get(str(algo).upper())
    if rule is None:
        return LayerRule(None, source, str(algo))
    return LayerRule(rule.scheme, source, rule.detail, rule.w4a4, rule.fp8)


def _lm_aliases(name: str) -> tuple[str, ...]:
    """transformers 4.x and 5.x spell a VLM's text model differently; the config may use either."""
    out = [name]
    for a, b in (
        ("language_model.model.", "model.language_model."),
        ("model.language_model.", "language_model.model."),
    ):
        if name.startswith(a):
            out.append(b + name[len(a) :])
    return tuple(out)


def modelopt_rule_for(name: str, qc: dict[str, Any]) -> LayerRule | None:
    q = modelopt_section(qc)
    excluded = q.get("exclude_modules") or qc.get("modules_to_not_convert") or []
    if isinstance(excluded, list) and any(
        fnmatch.fnmatchcase(n, str(p)) for p in excluded for n in _lm_aliases(name)
    ):
        return None
    algo = q.get("quant_algo")
    if str(algo).upper() != MIXED_PRECISION:
        return modelopt_algo_rule(algo, "quant_algo")
    layers = _obj(q.get("quantized_layers"))
    for n in _lm_aliases(name):
        entry = layers.get(n)
        if isinstance(entry, dict):
            return modelopt_algo_rule(entry.get("quant_algo"), f"quantized_layers[{n!r}]")
    return None


def modelopt_quantized_layers(qc: dict[str, Any]) -> dict[str, Any]:
    q = modelopt_section(qc)
    if str(q.get("quant_algo")).upper() != MIXED_PRECISION:
        return {}
    return _obj(q.get("quantized_layers"))


def modelopt_has_nvfp4(qc: dict[str, Any]) -> bool:
    q = modelopt_section(qc)
    if modelopt_algo_rule(q.get("quant_algo"), "").scheme == "nvfp4":
        return True
    layers = _obj(q.get("quantized_layers"))
    return any(
        isinstance(v, dict) and modelopt_algo_rule(v.get("quant_algo"), "").scheme == "nvfp4"
        for v in layers.values()
    )


def rule_for(
    fmt: str, name: str, qc: dict[str, Any], groups: list[TargetGroup] | None = None
) -> LayerRule | None:
    if fmt == COMPRESSED_TENSORS:
        ignore = qc.get("ignore") or []
        ignore = [str(x) for x in ignore] if isinstance(ignore, list) else []
        return ct_rule_for(name, ct_groups(qc) if groups is None else groups, ignore)
    return modelopt_rule_for(name, qc)


def config_format_name(fmt: str | None, qc: dict[str, Any]) -> str | None:
    """The format as the config names it: compressed-tensors' ``format`` (``nvfp4-pack-quantized``,
    ``mixed-precision``), ModelOpt's ``quant_algo`` (``NVFP4``, ``MIXED_PRECISION``)."""
    if fmt == COMPRESSED_TENSORS:
        f = qc.get("format")
        return str(f) if f else None
    if fmt == MODELOPT:
        algo = modelopt_section(qc).get("quant_algo")
        return str(algo) if algo else None
    return None
