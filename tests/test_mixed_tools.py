"""The command-line tools on mixed-precision checkpoints (NVFP4 + FP8): inspect names the format as the
config does and lists layers per kind, verify compares FP8 layers too and fails on a model whose FP8
layer holds raw codes, dequantize writes both kinds dense, convert maps what both layouts express."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mixed_helpers import write_mixed
from reference import dense_state_dict, reference_model, rel_err
from safetensors.torch import load_file

from nvfp4_fix.checkpoint import inspect_checkpoint
from nvfp4_fix.commands.inspect import build, render
from nvfp4_fix.commands.verify import verify, verify_model
from nvfp4_fix.errors import NVFP4Error
from nvfp4_fix.fp8 import FP8Linear
from nvfp4_fix.loading import from_pretrained

MIXED = Path(__file__).parent / "fixtures" / "mixed"
CT_MIXED = MIXED / "llama-nvfp4-fp8dynamic-fp8static"
MO_MIXED = MIXED / "modelopt-mixed_precision"


def test_inspect_names_the_format_and_lists_layers_per_kind() -> None:
    rep = build(str(CT_MIXED))
    assert rep["format_name"] == "compressed-tensors mixed-precision" and not rep["problems"]
    assert rep["kinds"] == {
        "NVFP4 W4A4": 6,
        "FP8 per-channel, dynamic per-token FP8 activations": 6,
        "FP8 per-tensor, static FP8 activations": 2,
    }
    text = render(rep)
    assert "self_attn.o_proj  x2    FP8 per-tensor, static FP8 activations" in text
    # the FP8 layers are quantized layers, not "unquantized 2-D weights"
    assert [u["pattern"] for u in rep["unquantized"]] == ["lm_head", "model.embed_tokens"]
    mo = build(str(MO_MIXED))
    assert mo["quant_algo"] == "MIXED_PRECISION"
    assert mo["kinds"]["FP8 per-tensor, static FP8 activations"] == 8


def test_inspect_scan_reads_fp8_scales(tmp_path: Path) -> None:
    write_mixed(tmp_path, "ct", "channel", "none")
    f = tmp_path / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.1.self_attn.v_proj.weight_scale"][3] = float("nan")
    from safetensors.torch import save_file

    save_file(t, str(f))
    rep = build(str(tmp_path), scan=True)
    assert rep["scan"]["totals"]["fp8_modules"] == 8
    assert any("model.layers.1.self_attn.v_proj.weight_scale = nan" in p for p in rep["scan"]["problems"])


@pytest.mark.parametrize("path", [CT_MIXED, MO_MIXED], ids=lambda p: p.name)
def test_verify_compares_fp8_layers(path: Path) -> None:
    r = verify(str(path), everything=True)
    assert r["passed"], r["failures"]
    assert r["fp8"] == 8 and r["packed"] == r["quantized"] == 14
    fp8_kinds = [k for k in r["layer_types"] if " FP8" in k]
    assert "q_proj FP8" in fp8_kinds and "q_proj FP8 (activations quantized)" in fp8_kinds


def test_verify_fails_on_raw_fp8_codes() -> None:
    """The silent failure of issue 15: an FP8 layer as a plain Linear holding the e4m3 codes cast to
    bf16, no scale. verify must fail, naming the layer."""
    model = from_pretrained(CT_MIXED)
    info = inspect_checkpoint(CT_MIXED)
    attn = model.model.layers[1].self_attn
    raw = torch.nn.Linear(attn.k_proj.in_features, attn.k_proj.out_features, bias=False)
    raw.weight = torch.nn.Parameter(attn.k_proj.weight.detach().to(torch.bfloat16), requires_grad=False)
    attn.k_proj = raw
    r = verify_model(model, info, 0.0, "cpu", everything=True)
    assert not r["passed"]
    assert any("model.layers.1.self_attn.k_proj" in f for f in r["failures"]), r["failures"]


def test_verify_fails_on_a_wrong_fp8_scale() -> None:
    model = from_pretrained(CT_MIXED)
    info = inspect_checkpoint(CT_MIXED)
    layer = model.model.layers[0].self_attn.o_proj
    assert isinstance(layer, FP8Linear)
    layer.weight_scale.data = layer.weight_scale.data * 1.5
    r = verify_model(model, info, 0.0, "cpu", everything=True)
    assert not r["passed"]
    assert any("model.layers.0.self_attn.o_proj: weights output differs" in f for f in r["failures"])


def test_dequantize_writes_both_kinds_dense(tmp_path: Path) -> None:
    from nvfp4_fix.tools.rewrite import dequantize_checkpoint

    r = dequantize_checkpoint(CT_MIXED, tmp_path / "dense", "fp32")
    assert r["layers"] == 14 and r["dropped_activation_quantization"]
    dense = load_file(str(tmp_path / "dense" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in dense.values())
    ref = dense_state_dict(CT_MIXED)  # float64 decode of both kinds, rounded to float32
    assert sorted(dense) == sorted(ref)
    for k, t in ref.items():
        assert torch.allclose(dense[k], t, rtol=2**-22, atol=0), k
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in cfg


def test_convert_mixed_modelopt_to_compressed_tensors_and_back(tmp_path: Path) -> None:
    from nvfp4_fix.tools.rewrite import convert_checkpoint

    ct = tmp_path / "ct"
    convert_checkpoint(MO_MIXED, ct, "compressed-tensors")
    info = inspect_checkpoint(ct)
    assert info.format_name == "mixed-precision"
    assert len(info.nvfp4) == 6 and len(info.fp8) == 8
    ids = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference_model(MO_MIXED)(input_ids=ids).logits
        got = reference_model(ct)(input_ids=ids).logits
    assert rel_err(got, want) < 1e-6  # the same weights: only the scales' reciprocal rounding differs
    back = tmp_path / "mo"
    convert_checkpoint(ct, back, "modelopt")
    again = inspect_checkpoint(back)
    assert again.format_name == "MIXED_PRECISION"
    assert {p: q.describe() for p, q in again.quantized.items()} == {
        p: q.describe() for p, q in inspect_checkpoint(MO_MIXED).quantized.items()
    }
    a, b = load_file(str(MO_MIXED / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].dtype in (torch.uint8, torch.float8_e4m3fn):
            assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def test_convert_refuses_what_modelopt_cannot_express(tmp_path: Path) -> None:
    from nvfp4_fix.tools.rewrite import convert_checkpoint

    with pytest.raises(NVFP4Error, match="dynamic per-token FP8 activations.*no ModelOpt equivalent"):
        convert_checkpoint(CT_MIXED, tmp_path / "out", "modelopt")
    assert not (tmp_path / "out").exists()


def test_converted_mixed_checkpoint_runs_in_compressed_tensors(tmp_path: Path) -> None:
    """compressed-tensors (>= 0.14) reads the config convert writes: its own FP8 layers, fed the same
    input, give our layers' outputs. It holds ModelOpt's float32 scales in bf16 (each layer's output
    then moves by up to 2^-9), so ours are compared with the same rounding applied: 1e-3, summation
    order aside; with the exact float32 scales they differ by that rounding alone (< 1e-2)."""
    import compressed_tensors
    from transformers import AutoModelForCausalLM

    from nvfp4_fix.tools.rewrite import convert_checkpoint

    if compressed_tensors.__version__.startswith("0.13"):
        pytest.skip("compressed-tensors 0.13 cannot run mixed-precision checkpoints itself")
    ct = tmp_path / "ct"
    convert_checkpoint(MO_MIXED, ct, "compressed-tensors")
    theirs = AutoModelForCausalLM.from_pretrained(ct, dtype=torch.bfloat16)
    with torch.no_grad():  # compressed-tensors decompresses its layers on the model's first forward
        theirs(input_ids=torch.tensor([[5, 6, 7]]))
    ours = from_pretrained(ct, dtype=torch.bfloat16)
    x = torch.randn(1, 5, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    for name in inspect_checkpoint(ct).fp8:
        layer, expected = ours.get_submodule(name), theirs.get_submodule(name)(x)
        with torch.no_grad():
            assert rel_err(layer(x), expected) < 1e-2, name
            for s in (layer.weight_scale, layer.input_scale):
                s.data = s.data.bfloat16().float()
            assert rel_err(layer(x), expected) < 1e-3, name
