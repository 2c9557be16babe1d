"""The committed mixed-precision fixtures (tests/fixtures/mixed/, issue 15) hold what their README
says: each layer's tensors match its config group or ModelOpt `quantized_layers` entry, FP8 scale
shapes follow the weight strategy (a partial 128-block included), the MoE gate/up global scales
differ, and the F4 fixture is its U8 source relabelled byte for byte. Headers and raw bytes only:
no nvfp4_fix code, so these hold whatever the loader does."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from safetensors import safe_open

FIXTURES = Path(__file__).parent / "fixtures"
MIXED = sorted(p.parent for p in (FIXTURES / "mixed").glob("*/config.json"))
CT = [p for p in MIXED if not (p / "hf_quant_config.json").exists()]


def header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def layers(path: Path) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """module name -> {tensor suffix: (dtype, header shape)} for every 2-D weight's module."""
    h, _ = header(path / "model.safetensors")
    out: dict = {}
    for k, v in h.items():
        if k != "__metadata__":
            mod, _, suffix = k.rpartition(".")
            out.setdefault(mod, {})[suffix] = (v["dtype"], v["shape"])
    return {m: t for m, t in out.items() if any(len(s) == 2 for _, s in t.values())}


def matches(name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target or (target == "Linear" and not name.endswith("embed_tokens"))


def test_every_mixed_fixture_has_manifest_entry_and_reference() -> None:
    manifest = json.loads((FIXTURES / "MANIFEST.json").read_text())["checkpoints"]
    assert len(MIXED) >= 6
    for d in MIXED:
        entry = manifest[f"mixed/{d.name}"]
        assert entry["command"].endswith(f"--only {d.name}") and entry["versions"]["torch"]
        with safe_open(str(d / "reference" / "outputs.safetensors"), "pt") as f:
            assert f.get_slice("input_ids").get_shape() == [1, 16]
            assert f.get_slice("logits_dense").get_shape() == f.get_slice("logits_producer").get_shape()


@pytest.mark.parametrize("path", CT, ids=[p.name for p in CT])
def test_ct_layers_hold_their_groups_tensors(path: Path) -> None:
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    groups = list(qc["config_groups"].values())
    assert qc["format"] == ("mixed-precision" if len(groups) > 1 else groups[0]["format"])
    for name, t in layers(path).items():
        ignored = any(matches(name, i) for i in qc["ignore"]) or not name.startswith("model.layers.")
        group = [g for g in groups if any(matches(name, x) for x in g["targets"])]
        if ignored or not group:
            assert set(t) == {"weight"} and t["weight"][0] == "BF16", (name, t)
            continue
        (g,) = group
        if g["format"] == "nvfp4-pack-quantized":
            dtype, shape = t["weight_packed"]
            k = shape[1] if dtype == "F4" else 2 * shape[1]
            assert dtype in ("U8", "F4") and t["weight_scale"] == ("F8_E4M3", [shape[0], k // 16]), name
            assert t["weight_global_scale"] == ("F32", [1]), name
            continue
        assert g["format"] == "float-quantized", g["format"]
        (dtype, (n, k)), (sdtype, sshape) = t["weight"], t["weight_scale"]
        expected = {
            "tensor": [1],
            "channel": [n, 1],
            "block": [-(-n // 128), -(-k // 128)],
        }[g["weights"]["strategy"]]
        assert dtype == "F8_E4M3" and sshape == expected and sdtype == "BF16", (name, t)
        static = not g["input_activations"]["dynamic"]
        assert ("input_scale" in t) == static, (name, t)


def test_partial_fp8_block_is_present() -> None:
    t = layers(FIXTURES / "mixed" / "llama-nvfp4a16-fp8block-partial")["model.layers.0.mlp.gate_proj"]
    assert t["weight"] == ("F8_E4M3", [688, 256]) and t["weight_scale"] == ("BF16", [6, 2])


def test_moe_gate_and_up_global_scales_differ() -> None:
    path = FIXTURES / "mixed" / "qwen3_moe-nvfp4a16-gateup" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = [k for k in f.keys() if ".experts." in k]
        gates = sorted(k for k in keys if k.endswith("gate_proj.weight_global_scale"))
        ratios = [
            f.get_tensor(k).item() / f.get_tensor(k.replace("gate_proj", "up_proj")).item() for k in gates
        ]
    assert len(ratios) == 8
    assert all(r < 0.3 or r > 3.3 for r in ratios), ratios  # one half scaled x4 before quantizing


def test_modelopt_quantized_layers_match_tensors() -> None:
    path = FIXTURES / "mixed" / "modelopt-mixed_precision"
    q = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION"
    found = layers(path)
    assert {n for n in found if n.startswith("model.layers.")} == set(q["quantized_layers"])
    for name, cfg in q["quantized_layers"].items():
        t = found[name]
        if cfg["quant_algo"] == "FP8":
            assert t["weight"][0] == "F8_E4M3" and t["weight_scale"] == ("F32", []), (name, t)
            assert t["input_scale"] == ("F32", []), (name, t)
        else:
            assert cfg == {"quant_algo": "NVFP4", "group_size": 16}, cfg
            assert t["weight"][0] == "U8" and t["weight_scale_2"] == ("F32", []), (name, t)


def test_f4_fixture_is_the_u8_fixture_relabelled() -> None:
    src, src_data = header(FIXTURES / "current" / "llama-nvfp4a16" / "model.safetensors")
    f4, f4_data = header(FIXTURES / "mixed" / "llama-nvfp4a16-f4" / "model.safetensors")
    assert f4_data == src_data and f4.keys() == src.keys()
    relabelled = 0
    for k, v in src.items():
        w = f4[k]
        if k.endswith(".weight_packed"):
            assert v["dtype"] == "U8" and w["dtype"] == "F4", k
            assert w["shape"] == [v["shape"][0], 2 * v["shape"][1]], k
            assert w["data_offsets"] == v["data_offsets"], k
            relabelled += 1
        else:
            assert w == v, k
    assert relabelled == 14
