"""Mixed-precision checkpoints load with NVFP4 layers packed (uint8) and FP8 layers in float8_e4m3fn,
through ``nvfp4_fix.from_pretrained``: logits against tests/reference.py's float64 dequantization of
both kinds, and each FP8 layer against compressed-tensors' own forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mixed_helpers import write_mixed
from reference import reference_model, rel_err

from nvfp4_fix.checkpoint import inspect_checkpoint
from nvfp4_fix.fp8 import FP8Linear
from nvfp4_fix.layer import NVFP4Linear
from nvfp4_fix.loading import from_pretrained
from nvfp4_fix.schemes import FP8Spec

FIXTURES = Path(__file__).parent / "fixtures"
REAL = sorted(p.parent for p in (FIXTURES / "mixed").glob("*/config.json"))


def _synthetic(root: Path) -> list[Path]:
    made = []
    for layout, strategy, acts, block in (
        ("ct", "block", "dynamic-group", (32, 48)),  # partial blocks: 64 rows of 32, 64 columns of 48
        ("ct", "tensor", "static", (128, 128)),
        ("mo", "tensor", "static", (128, 128)),
    ):
        path = root / f"{layout}-{strategy}-{acts}"
        if not path.exists():
            write_mixed(path, layout, strategy, acts, block=block)
        made.append(path)
    return made


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _synthetic(tmp_path_factory.mktemp("mixed"))


def _logits(model, n: int = 9) -> torch.Tensor:  # noqa: ANN001
    ids = torch.randint(3, 90, (2, n), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def _assert_kinds(model, info) -> None:  # noqa: ANN001
    """NVFP4 layers packed (uint8 codes), FP8 layers in float8_e4m3fn, one module per checkpoint layer."""
    nv = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    f8 = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(nv) == len(info.nvfp4) and len(f8) == len(info.fp8), (len(nv), len(f8))
    assert all(m.weight_packed.dtype == torch.uint8 for m in nv)
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in f8)
    for m in model.modules():  # no raw codes cast into a plain Linear
        if type(m) is torch.nn.Linear:
            assert m.weight.abs().max() < 50, "a plain Linear holds what look like raw FP8 codes"


def _check_against_reference(path: Path) -> None:
    info = inspect_checkpoint(path)
    model = from_pretrained(path, dtype=torch.float32, activations="bf16")
    _assert_kinds(model, info)
    # float32 compute, FP8 and NVFP4 weights dequantized exactly: only summation order differs
    assert rel_err(_logits(model), _logits(reference_model(path))) < 1e-4
    bf16 = from_pretrained(path, dtype=torch.bfloat16, activations="quantize")
    _assert_kinds(bf16, info)
    assert torch.isfinite(_logits(bf16)).all()


@pytest.mark.parametrize("path", REAL, ids=[p.name for p in REAL])
def test_real_mixed_fixture_loads_and_matches_reference(path: Path) -> None:
    import transformers

    if "moe" in path.name and transformers.__version__.startswith("4."):
        pytest.skip(
            "transformers 4.57 builds Qwen3-MoE from config.num_experts (default 128) and this "
            "transformers-5 export says num_local_experts: the quantizer does not backport the key yet"
        )
    _check_against_reference(path)


def test_synthetic_mixed_checkpoints_load_and_match_reference(synthetic: list[Path]) -> None:
    for path in synthetic:
        _check_against_reference(path)


CT_FP8 = [
    p for p in REAL if inspect_checkpoint(p).fp8 and inspect_checkpoint(p).format == "compressed-tensors"
]


@pytest.mark.parametrize("path", CT_FP8, ids=[p.name for p in CT_FP8])
def test_fp8_layers_match_compressed_tensors_own_forward(path: Path) -> None:
    """compressed-tensors >= 0.14 runs a mixed checkpoint itself (dense bf16 weights plus its activation
    quantization). Each of our FP8 layers, fed the input its layer saw, must give its output (1e-3:
    both round the same bf16 weights; only summation order may differ), and far closer than with the
    activation quantization skipped."""
    import compressed_tensors

    if compressed_tensors.__version__.startswith("0.13"):
        pytest.skip("compressed-tensors 0.13 cannot run mixed-precision checkpoints itself")
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    info = inspect_checkpoint(path)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        theirs.get_submodule(name).register_forward_hook(
            lambda mod, args, out, n=name: seen.__setitem__(n, (args[0], out))
        )
        for name in info.fp8
    ]
    _logits(theirs)
    for h in hooks:
        h.remove()
    assert sorted(seen) == sorted(info.fp8)
    ours = from_pretrained(path, dtype=torch.bfloat16, activations="quantize")
    for name, (x, expected) in seen.items():
        layer = ours.get_submodule(name)
        assert isinstance(layer, FP8Linear)
        with torch.no_grad():
            err = rel_err(layer(x), expected)
            layer.activation_mode = "bf16"
            err_plain = rel_err(layer(x), expected)
        assert err < 1e-3 and err < err_plain / 3, (name, err, err_plain)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.mark.parametrize("path", [p for p in REAL if inspect_checkpoint(p).fp8], ids=lambda p: p.name)
def test_save_pretrained_writes_back_what_it_read(path: Path, tmp_path: Path) -> None:
    """Same tensor names, dtypes, shapes and bytes: FP8 codes and their scales are never cast."""
    from_pretrained(path).save_pretrained(tmp_path / "out")
    before, after = _tensors(path), _tensors(tmp_path / "out")
    assert sorted(before) == sorted(after)
    for k, t in before.items():
        u = after[k]
        assert (u.dtype, u.shape) == (t.dtype, t.shape), k
        assert torch.equal(u.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
    assert inspect_checkpoint(tmp_path / "out").format_name == inspect_checkpoint(path).format_name


def test_moe_experts_keep_their_own_gate_and_up_scales() -> None:
    """Real MoE checkpoints carry different global scales for the gate and up halves of one expert;
    the loaded model keeps each (a shared scale would fail the reference comparison above too)."""
    path = FIXTURES / "mixed" / "qwen3_moe-nvfp4a16-gateup"
    ckpt = _tensors(path)
    gate = {k: v for k, v in ckpt.items() if k.endswith("gate_proj.weight_global_scale") and ".experts." in k}
    differ = [k for k in gate if not torch.equal(gate[k], ckpt[k.replace("gate_proj", "up_proj")])]
    assert len(differ) == len(gate) > 0  # the fixture is what this test is about
    import transformers

    if transformers.__version__.startswith("4."):
        pytest.skip("transformers 4.57 cannot build this transformers-5 Qwen3-MoE export's expert count")
    state = from_pretrained(path, dtype=torch.float32).state_dict()
    for k in differ:
        for key in (k, k.replace("gate_proj", "up_proj")):
            assert torch.equal(state[key], ckpt[key]), key


@pytest.mark.parametrize(
    ("layout", "spec"),
    [
        ("compressed-tensors", FP8Spec("block", "dynamic-group", (64, 128), 16)),  # 208 rows: a partial block
        ("compressed-tensors", FP8Spec("channel", "dynamic-token")),
        ("modelopt", FP8Spec("tensor", "static")),
    ],
    ids=["ct-block", "ct-channel", "modelopt-fp8"],
)
def test_writer_makes_mixed_checkpoints(layout: str, spec: FP8Spec, tmp_path: Path) -> None:
    """save_quantized(fp8=...) writes a mixed checkpoint (for shapes the fixtures lack, e.g. a 27B-like
    model): the classifier reads it back per layer and it loads within the reference's tolerance."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nvfp4_fix.writer import save_quantized

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=208,
        intermediate_size=400,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=52,
        vocab_size=300,
        architectures=["LlamaForCausalLM"],
    )
    dense = LlamaForCausalLM(cfg).to(torch.bfloat16)
    path = save_quantized(dense, tmp_path / "ckpt", layout, fp8=[r"re:.*self_attn\."], fp8_spec=spec)
    info = inspect_checkpoint(path)
    assert len(info.fp8) == 8 and len(info.nvfp4) == 6
    assert {q.fp8 for q in info.fp8.values()} == {spec}
    assert info.format_name == ("mixed-precision" if layout == "compressed-tensors" else "MIXED_PRECISION")
    model = from_pretrained(path, dtype=torch.float32, activations="bf16")
    _assert_kinds(model, info)
    assert rel_err(_logits(model), _logits(reference_model(path))) < 1e-4


def test_writer_streams_batches_from_a_meta_model(tmp_path: Path) -> None:
    """save_quantized(state=batches) with a meta-device model (how benchmarks/bench_mixed_27b.py writes
    a 27B-like checkpoint without building it): the same tensors, bit for bit, and config as from the
    materialized model, in shards with an index when they overflow max_shard_bytes."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from nvfp4_fix.writer import save_quantized

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=300,
        architectures=["LlamaForCausalLM"],
    )
    dense = LlamaForCausalLM(cfg).to(torch.bfloat16)
    kw = {"fp8": [r"re:.*self_attn\.(q|k|v|o)_proj$"], "fp8_spec": FP8Spec("channel", "dynamic-token")}
    whole = save_quantized(dense, tmp_path / "whole", **kw)
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg).to(torch.bfloat16)
    state = dense.state_dict()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in state.items():  # one batch per decoder layer, the rest in one
        key = ".".join(name.split(".")[:3]) if ".layers." in name else "rest"
        groups.setdefault(key, {})[name] = t
    batches = iter(groups.values())
    streamed = save_quantized(meta, tmp_path / "streamed", **kw, state=batches, max_shard_bytes=40_000)
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    got: dict[str, torch.Tensor] = {}
    for f in shards:
        got.update(load_file(streamed / f))
    want = load_file(whole / "model.safetensors")
    assert sorted(got) == sorted(want) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name
    config = json.loads((streamed / "config.json").read_text())
    assert config == json.loads((whole / "config.json").read_text())


def test_dense_on_cpu_covers_fp8_layers_and_low_memory_drops_them() -> None:
    import nvfp4_fix

    path = FIXTURES / "mixed" / "llama-nvfp4a16-fp8block-partial"
    packed = from_pretrained(path, dtype=torch.float32)
    dense = from_pretrained(path, dtype=torch.float32, dense_on_cpu=True)
    f8 = [m for m in dense.modules() if isinstance(m, FP8Linear)]
    assert f8 and all(m.dense_weight is not None and m.weight.dtype == torch.float8_e4m3fn for m in f8)
    assert rel_err(_logits(dense), _logits(packed)) < 1e-6  # the same float32 weights, computed once
    try:
        assert nvfp4_fix.enable_low_memory_mode(True, dense) >= len(f8)
        assert all(m.dense_weight is None for m in f8)
        with pytest.raises(RuntimeError, match="low-memory"):
            f8[0].keep_dense_copy(torch.float32)
    finally:
        nvfp4_fix.enable_low_memory_mode(False)


def test_fp8_moe_experts(tmp_path: Path) -> None:
    """Experts stored as FP8 (per-channel) beside NVFP4 attention: the real MoE fixture with its experts
    re-quantized to FP8 from their float64 decoding; each expert projection becomes an FP8Linear."""
    import json
    import shutil

    import transformers
    from mixed_helpers import fp8_quantize
    from reference import dense_state_dict
    from safetensors.torch import load_file, save_file

    if transformers.__version__.startswith("4."):
        pytest.skip("transformers 4.57 cannot build this transformers-5 Qwen3-MoE export's expert count")
    src = FIXTURES / "mixed" / "qwen3_moe-nvfp4a16-gateup"
    path = tmp_path / "fp8-experts"
    shutil.copytree(src, path, ignore=shutil.ignore_patterns("reference"))
    dense = dense_state_dict(src)
    tensors = load_file(str(src / "model.safetensors"))
    experts = sorted({k.rpartition(".")[0] for k in tensors if ".experts." in k})
    for p in experts:
        for leaf in ("weight_packed", "weight_scale", "weight_global_scale"):
            del tensors[f"{p}.{leaf}"]
        tensors[f"{p}.weight"], tensors[f"{p}.weight_scale"] = fp8_quantize(dense[f"{p}.weight"], "channel")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    qc["format"] = "mixed-precision"
    qc["config_groups"]["group_1"] = {
        "format": "float-quantized",
        "targets": [r"re:.*mlp\.experts\..*"],
        "weights": {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "channel",
            "dynamic": False,
        },
        "input_activations": None,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    info = inspect_checkpoint(path)
    assert len(info.fp8) == len(experts) > 0 and len(info.nvfp4) == len(inspect_checkpoint(src).nvfp4) - len(
        experts
    )
    model = from_pretrained(path, dtype=torch.float32)
    _assert_kinds(model, info)
    assert rel_err(_logits(model), _logits(reference_model(path))) < 1e-4
