"""Mixed-precision checkpoints (NVFP4 + FP8 layers): every layer classified by the config's own rules,
every tensor consumed or refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mixed_helpers import ATTN, LAYERS, MLP, write_mixed
from safetensors.torch import load_file, save_file

from nvfp4_fix.checkpoint import detect_format, inspect_checkpoint
from nvfp4_fix.errors import CheckpointError
from nvfp4_fix.schemes import FP8Spec, TargetGroup, ct_groups, ct_rule_for


@pytest.mark.parametrize(
    ("strategy", "acts", "spec"),
    [
        ("channel", "dynamic-token", FP8Spec("channel", "dynamic-token")),
        ("tensor", "static", FP8Spec("tensor", "static")),
        ("block", "none", FP8Spec("block", "none", (32, 32))),
        ("channel", "dynamic-group", FP8Spec("channel", "dynamic-group", None, 16)),
    ],
)
def test_ct_mixed_layers_classified(tmp_path: Path, strategy: str, acts: str, spec: FP8Spec) -> None:
    write_mixed(tmp_path, "ct", strategy, acts, block=(32, 32))
    info = inspect_checkpoint(tmp_path)
    assert info.format == "compressed-tensors" and info.format_name == "mixed-precision"
    assert sorted(info.nvfp4) == sorted(f"model.layers.{i}.mlp.{p}" for i in range(LAYERS) for p in MLP)
    assert sorted(info.fp8) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(LAYERS) for p in ATTN)
    assert {q.fp8 for q in info.fp8.values()} == {spec}
    assert all(q.has_input_scale == (acts == "static") for q in info.fp8.values())
    assert info.scheme == "W4A16"


def test_modelopt_mixed_precision_classified(tmp_path: Path) -> None:
    write_mixed(tmp_path, "mo", "tensor", "static")
    info = inspect_checkpoint(tmp_path)
    assert info.format == "modelopt" and info.format_name == "MIXED_PRECISION"
    assert len(info.nvfp4) == LAYERS * 3 and len(info.fp8) == LAYERS * 4
    assert {q.fp8 for q in info.fp8.values()} == {FP8Spec("tensor", "static")}


def test_fp8_only_checkpoint_is_left_to_transformers(tmp_path: Path) -> None:
    def only_fp8(qc: dict) -> None:
        del qc["config_groups"]["group_0"]
        qc["format"] = "float-quantized"

    write_mixed(tmp_path, "ct", "channel", "dynamic-token", config_edit=only_fp8)
    assert detect_format(tmp_path) is None
    mo = tmp_path / "mo"

    def mo_only_fp8(hq: dict) -> None:
        hq["quantization"] = {"quant_algo": "FP8", "exclude_modules": ["lm_head"]}

    write_mixed(mo, "mo", "tensor", "static", config_edit=mo_only_fp8)
    assert detect_format(mo) is None


def test_target_precedence_follows_compressed_tensors() -> None:
    """Exact names beat patterns, patterns beat class names; ``ignore`` wins over all."""
    qc = {
        "config_groups": {
            "a": {"format": "nvfp4-pack-quantized", "targets": ["Linear"], "weights": {}},
            "b": {
                "format": "float-quantized",
                "targets": ["re:.*self_attn.*"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
            },
            "c": {
                "format": "float-quantized",
                "targets": ["model.layers.0.self_attn.q_proj"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
            },
        }
    }
    groups: list[TargetGroup] = ct_groups(qc)
    ignore = ["re:.*k_proj"]
    rule = ct_rule_for("model.layers.0.self_attn.q_proj", groups, ignore)
    assert rule is not None and rule.fp8 == FP8Spec("tensor") and rule.source == "config_groups.c"
    rule = ct_rule_for("model.layers.1.self_attn.q_proj", groups, ignore)
    assert rule is not None and rule.fp8 == FP8Spec("channel") and rule.source == "config_groups.b"
    rule = ct_rule_for("model.layers.1.mlp.up_proj", groups, ignore)
    assert rule is not None and rule.scheme == "nvfp4"
    assert ct_rule_for("model.layers.1.self_attn.k_proj", groups, ignore) is None


def _retensor(path: Path, edit) -> None:  # noqa: ANN001
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as e:
        inspect_checkpoint(path)
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    return msg


def test_fp8_weight_in_an_ignored_layer_is_refused(tmp_path: Path) -> None:
    write_mixed(
        tmp_path,
        "ct",
        "channel",
        "none",
        config_edit=lambda qc: qc["ignore"].append("model.layers.1.self_attn.v_proj"),
    )
    _refused(tmp_path, "model.safetensors", "'model.layers.1.self_attn.v_proj.weight'", "unquantized")


def test_fp8_weight_where_the_config_says_nvfp4_is_refused(tmp_path: Path) -> None:
    def swap(qc: dict) -> None:
        qc["config_groups"]["group_0"]["targets"] = ["Linear"]
        qc["config_groups"]["group_1"]["targets"] = ["model.layers.0.self_attn.q_proj"]

    write_mixed(tmp_path, "ct", "channel", "none", config_edit=swap)
    _refused(
        tmp_path, "'model.layers.0.self_attn.k_proj.weight'", "nvfp4-pack-quantized (config_groups.group_0)"
    )


def test_unused_weight_scale_is_refused(tmp_path: Path) -> None:
    extra = {"model.embed_tokens.weight_scale": torch.ones(1)}
    write_mixed(tmp_path, "ct", "channel", "none", extra=extra)
    _refused(tmp_path, "'model.embed_tokens.weight_scale'", "belongs to no layer")


def test_input_scale_without_a_place_is_refused(tmp_path: Path) -> None:
    write_mixed(tmp_path, "ct", "channel", "dynamic-token")
    _retensor(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.input_scale", torch.ones(1)))
    _refused(tmp_path, "'model.layers.0.self_attn.q_proj.input_scale'", "has no place", "dynamic per-token")


def test_static_fp8_without_input_scale_is_refused(tmp_path: Path) -> None:
    write_mixed(tmp_path, "ct", "tensor", "static")
    _retensor(tmp_path, lambda t: t.pop("model.layers.1.self_attn.o_proj.input_scale"))
    _refused(tmp_path, "'model.layers.1.self_attn.o_proj'", "input_scale")


def test_fp8_scale_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    write_mixed(tmp_path, "ct", "block", "none", block=(32, 32))
    _retensor(
        tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight_scale", torch.ones(2, 1))
    )
    _refused(tmp_path, "'model.layers.0.self_attn.k_proj.weight_scale'", "[2, 1]", "[1, 2]")


def test_bf16_weight_where_the_config_names_a_quantized_layer_is_refused(tmp_path: Path) -> None:
    def dense_q(t: dict) -> None:
        p = "model.layers.0.self_attn.q_proj"
        t[p + ".weight"] = torch.zeros(64, 64, dtype=torch.bfloat16)
        del t[p + ".weight_scale"]

    write_mixed(tmp_path, "ct", "channel", "none")
    _retensor(tmp_path, dense_q)
    _refused(tmp_path, "'model.layers.0.self_attn.q_proj.weight'", "BF16", "float-quantized")


def test_modelopt_fp8_layer_missing_from_quantized_layers_is_refused(tmp_path: Path) -> None:
    def drop(hq: dict) -> None:
        del hq["quantization"]["quantized_layers"]["model.layers.1.self_attn.o_proj"]

    write_mixed(tmp_path, "mo", "tensor", "static", config_edit=drop)
    _refused(tmp_path, "'model.layers.1.self_attn.o_proj.weight'", "F8_E4M3", "unquantized")


def test_unsupported_group_is_named(tmp_path: Path) -> None:
    def int4(qc: dict) -> None:
        qc["config_groups"]["group_1"]["format"] = "pack-quantized"
        qc["config_groups"]["group_1"]["weights"]["type"] = "int"

    write_mixed(tmp_path, "ct", "channel", "none", config_edit=int4)
    _refused(tmp_path, "pack-quantized (config_groups.group_1)", "does not load")
