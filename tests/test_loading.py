"""Loading NVFP4 checkpoints packed: every shipped fixture, both entry points, both layouts.

Tolerances (relative L2 error of logits against the independent float64->float32 reference of
tests/reference.py): float32 compute 1e-4; bf16/fp16 compute 3e-2 (bf16 has an 8-bit mantissa and
the error grows through two layers). W4A4 with activation quantization on is compared with
compressed-tensors' own forward where that library can run the checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from reference import fixture_dirs, reference_model, rel_err
from safetensors import safe_open

import nvfp4_fix
from nvfp4_fix.checkpoint import inspect_checkpoint
from nvfp4_fix.errors import CheckpointError
from nvfp4_fix.layer import NVFP4Linear
from nvfp4_fix.loading import from_pretrained
from nvfp4_fix.moe import NVFP4Experts
from nvfp4_fix.writer import save_quantized

FIXTURES = Path(__file__).parent / "fixtures"
# mixed/ (NVFP4 + FP8, issue 15) has its own tests: these assert every quantized layer is NVFP4.
ALL = [p for p in fixture_dirs(FIXTURES) if p.parent.name not in ("demo", "mixed")]
ALL += fixture_dirs(FIXTURES / "demo")
ALL = [
    p
    for p in ALL
    if (p / "hf_quant_config.json").exists() or "quantization_config" in (p / "config.json").read_text()
]


def _written_for_a_newer_transformers(path: Path) -> bool:
    """transformers 4.57 cannot read LLaVA checkpoints that transformers 5 wrote (5 renamed the vision
    tower's keys: ``model.vision_tower.embeddings`` for 4.57's ``vision_tower.vision_model.embeddings``;
    plain 4.57 leaves the whole tower uninitialised). That is transformers' own limit, not ours."""
    import transformers

    cfg = json.loads((path / "config.json").read_text())
    made_by = int(str(cfg.get("transformers_version", "4")).split(".")[0])
    return "vision_config" in cfg and made_by >= 5 > int(transformers.__version__.split(".")[0])


ALL = [p for p in ALL if not _written_for_a_newer_transformers(p)]


def _ids(paths: list[Path]) -> list[str]:
    return [f"{p.parent.name}/{p.name}" for p in paths]


def model_class_for(path: Path):
    import transformers

    cfg = json.loads((path / "config.json").read_text())
    if "vision_config" in cfg:
        return (
            getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        )
    return transformers.AutoModelForCausalLM


def token_ids(path: Path, n: int = 11) -> torch.Tensor:
    cfg = json.loads((path / "config.json").read_text())
    vocab = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, min(vocab, 4000), (2, n), generator=g)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def assert_packed(model, info) -> None:
    packed = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    experts = [m for m in model.modules() if isinstance(m, NVFP4Experts)]
    assert len(packed) == len(info.quantized), (len(packed), len(info.quantized), len(experts))
    for m in packed:
        assert m.weight_packed.dtype == torch.uint8
        assert m.weight_scale.dtype == torch.float8_e4m3fn
        assert m.dense_weight is None
    assert not any(isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.uint8 for m in model.modules())


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_fixture_loads_packed_and_matches_reference(path: Path) -> None:
    info = inspect_checkpoint(path)
    cls = model_class_for(path)
    model = from_pretrained(path, cls, dtype=torch.float32, activations="bf16")
    assert_packed(model, info)
    ids = token_ids(path)
    ref = reference_model(path, cls)
    assert rel_err(logits(model, ids), logits(ref, ids)) < 1e-4


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_fixture_bf16_and_fp16(path: Path) -> None:
    cls = model_class_for(path)
    ref = reference_model(path, cls)
    ids = token_ids(path)
    expected = logits(ref, ids)
    for dtype in (torch.bfloat16, torch.float16):
        model = from_pretrained(path, cls, dtype=dtype, activations="bf16")
        for m in model.modules():
            if isinstance(m, NVFP4Linear):
                assert m._parameters[m._global_name].dtype == torch.float32
        assert rel_err(logits(model, ids), expected) < 3e-2, dtype


W4A4 = [p for p in ALL if inspect_checkpoint(p).scheme.startswith("W4A4")]


@pytest.mark.parametrize("path", W4A4, ids=_ids(W4A4))
def test_w4a4_activation_quantization_is_applied(path: Path) -> None:
    cls = model_class_for(path)
    ids = token_ids(path)
    quant = from_pretrained(path, cls, dtype=torch.float32, activations="quantize")
    plain = from_pretrained(path, cls, dtype=torch.float32, activations="bf16")
    ref = logits(reference_model(path, cls), ids)
    a, b = logits(quant, ids), logits(plain, ids)
    assert 1e-4 < rel_err(a, b) < 0.5  # it changes the result, as much as 4-bit activations do
    assert rel_err(a, ref) < 0.5


@pytest.mark.parametrize("path", ALL[:1] + [p for p in ALL if p.parent.name == "modelopt"][:1], ids=str)
def test_apply_patch_routes_plain_from_pretrained(path: Path) -> None:
    from transformers import AutoModelForCausalLM

    nvfp4_fix.apply_patch()
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        q = model.model.layers[0].self_attn.q_proj
        assert isinstance(q, NVFP4Linear) and q.weight_packed.dtype == torch.uint8
    finally:
        nvfp4_fix.remove_patch()
    from transformers import PreTrainedModel

    assert "routed" not in PreTrainedModel.from_pretrained.__func__.__code__.co_name


def _quantized_tensors(path: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k)
                if t.dtype in (torch.uint8, torch.float8_e4m3fn) or "scale" in k:
                    out[k] = (
                        t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                        + str((t.dtype, t.shape)).encode()
                    )
    return out


@pytest.mark.parametrize("path", ALL, ids=_ids(ALL))
def test_save_pretrained_roundtrip_is_byte_identical(path: Path, tmp_path: Path) -> None:
    cls = model_class_for(path)
    model = from_pretrained(path, cls)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    saved, original = _quantized_tensors(out), _quantized_tensors(path)
    assert sorted(saved.values()) == sorted(original.values())
    import transformers

    made_by = json.loads((path / "config.json").read_text()).get("transformers_version", "")
    if made_by.split(".")[0] == transformers.__version__.split(".")[0]:
        assert saved == original  # same names too (another major version writes its own key names)
    again = inspect_checkpoint(out)
    assert again.format == inspect_checkpoint(path).format
    reloaded = from_pretrained(out, cls)
    ids = token_ids(path)
    assert torch.equal(logits(model, ids), logits(reloaded, ids))


def _tiny_llama(hidden: int, inter: int, vocab: int = 300):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        vocab_size=vocab,
        architectures=["LlamaForCausalLM"],
    )
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt"])
@pytest.mark.parametrize("hidden,inter", [(272, 688), (208, 400)])
def test_odd_shapes_synthetic(layout: str, hidden: int, inter: int, tmp_path: Path) -> None:
    path = save_quantized(_tiny_llama(hidden, inter), tmp_path / "ckpt", layout)
    model = from_pretrained(path, dtype=torch.float32)
    ids = token_ids(path)
    assert rel_err(logits(model, ids), logits(reference_model(path), ids)) < 1e-4


def test_missing_scale_is_a_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = save_quantized(_tiny_llama(256, 512), tmp_path / "ckpt", "compressed-tensors")
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.*weight_scale"):
        from_pretrained(path)


def test_shape_not_matching_config_is_a_clear_error(tmp_path: Path) -> None:
    path = save_quantized(_tiny_llama(256, 512), tmp_path / "ckpt", "modelopt")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 528
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj.*config"):
        from_pretrained(path)


def test_not_nvfp4_is_a_clear_error(tmp_path: Path) -> None:
    model = _tiny_llama(256, 512)
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(CheckpointError, match="not an NVFP4 checkpoint"):
        from_pretrained(tmp_path / "dense")
    shutil.rmtree(tmp_path / "dense")


CT_W4A4 = [p for p in W4A4 if inspect_checkpoint(p).format == "compressed-tensors"]


@pytest.mark.parametrize("path", CT_W4A4, ids=_ids(CT_W4A4))
def test_w4a4_matches_compressed_tensors_own_forward(path: Path) -> None:
    """compressed-tensors (>= 0.14, or 0.13 with the fixes) runs the checkpoint itself: dense bf16
    weights plus its activation fake-quantization. Every layer of ours, fed the very input that
    compressed-tensors' layer saw, must agree with its output (1e-2: its weights are rounded to bf16),
    and far better than the unquantized-activation mode does. Whole-model logits are no test here:
    with 4-bit activations a random tiny model amplifies bf16 rounding alone to ~0.1."""
    pytest.importorskip("compressed_tensors")
    import compressed_tensors

    legacy = compressed_tensors.__version__.startswith("0.13")
    if legacy:
        nvfp4_fix.apply_patch(packed_layers=False)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        kw = {"torch_dtype" if legacy else "dtype": torch.bfloat16}
        try:
            theirs = model_class_for(path).from_pretrained(path, **kw)
        except AttributeError as e:  # e.g. a transformers-5 LLaVA export in transformers 4.57
            pytest.skip(f"compressed-tensors {compressed_tensors.__version__} cannot load it itself: {e}")
        if legacy:  # transformers 4.57 cast the float32 global scales to bf16: put the real ones back
            with safe_open(str(path / "model.safetensors"), "pt") as fh:
                for k in fh.keys():
                    if k.endswith("global_scale"):
                        theirs.get_parameter(k).data = fh.get_tensor(k)
        hooks = [
            m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out)))
            for n, m in theirs.named_modules()
            if hasattr(m, "input_global_scale")
        ]
        logits(theirs, token_ids(path))
        for h in hooks:
            h.remove()
    finally:
        if legacy:
            nvfp4_fix.remove_patch()
    assert (
        seen
    )  # every linear compressed-tensors itself quantizes (transformers 5 fuses MoE experts: not those)
    ours = from_pretrained(path, model_class_for(path), dtype=torch.bfloat16, activations="quantize")
    for name, (x, expected) in seen.items():
        layer = ours.get_submodule(name)
        with torch.no_grad():
            err = rel_err(layer(x), expected)
            layer.activation_mode = "bf16"
            err_plain = rel_err(layer(x), expected)
        assert err < 1e-2 and err < err_plain / 3, (name, err, err_plain)


def test_dense_on_cpu_and_low_memory_mode() -> None:
    path = FIXTURES / "demo" / "ct-nvfp4a16"
    ids = token_ids(path)
    packed = from_pretrained(path, dtype=torch.float32)
    dense = from_pretrained(path, dtype=torch.float32, dense_on_cpu=True)
    layers = [m for m in dense.modules() if isinstance(m, NVFP4Linear)]
    assert all(m.dense_weight is not None and m.weight_packed.dtype == torch.uint8 for m in layers)
    assert rel_err(logits(dense, ids), logits(packed, ids)) < 1e-5
    try:
        assert nvfp4_fix.enable_low_memory_mode(model=dense) >= len(layers)
        assert all(m.dense_weight is None for m in layers)
        with pytest.raises(RuntimeError, match="low-memory"):
            from_pretrained(path, dense_on_cpu=True)
    finally:
        nvfp4_fix.enable_low_memory_mode(False)


def test_dtype_cast_keeps_the_format():
    """model.half() / .to(dtype) cast activations and biases only: e4m3 scales and float32 global
    scales keep their format (float8 counts as floating point for nn.Module casts)."""
    path = FIXTURES / "current" / "llama-nvfp4a16"
    model = from_pretrained(path, dtype=torch.float32)
    ids = token_ids(path)
    ref = logits(model, ids)
    model.to(torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight_scale.dtype == torch.float8_e4m3fn
    assert layer.weight_global_scale.dtype == torch.float32
    assert layer.weight_packed.dtype == torch.uint8
    assert rel_err(logits(model, ids), ref) < 3e-2  # bf16 rounding (rotary buffers are cast too)
