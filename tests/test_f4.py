"""NVFP4 codes stored as safetensors ``F4`` (header shape [N, K], bytes [N, K/2]): read wherever U8 codes
are, written back as F4. The fixture holds the very bytes of current/llama-nvfp4a16 (its U8 twin)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from reference import reference_model, rel_err
from safetensors import safe_open

from nvfp4_fix.checkpoint import inspect_checkpoint, read_header
from nvfp4_fix.commands.inspect import build
from nvfp4_fix.commands.verify import verify
from nvfp4_fix.errors import CheckpointError
from nvfp4_fix.loading import from_pretrained
from nvfp4_fix.tools.rewrite import convert_checkpoint, dequantize_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
F4 = FIXTURES / "mixed" / "llama-nvfp4a16-f4"
U8 = FIXTURES / "current" / "llama-nvfp4a16"


def _raw(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_index_reads_f4_as_packed_codes() -> None:
    f4, u8 = inspect_checkpoint(F4), inspect_checkpoint(U8)
    assert {p: (q.out_features, q.in_features) for p, q in f4.quantized.items()} == {
        p: (q.out_features, q.in_features) for p, q in u8.quantized.items()
    }
    assert {q.packed_dtype for q in f4.quantized.values()} == {"F4"}
    rep, ref = build(str(F4), scan=True), build(str(U8), scan=True)
    assert not rep["problems"] and not rep["scan"]["problems"]
    assert (
        rep["memory"]["packed"] == ref["memory"]["packed"] and rep["memory"]["bf16"] == ref["memory"]["bf16"]
    )
    assert rep["tensors"]["dtypes"]["F4"] == 14


def test_loads_packed_and_equals_its_u8_twin() -> None:
    ids = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(0))
    f4 = from_pretrained(F4, dtype=torch.float32)
    layer = f4.model.layers[1].mlp.down_proj
    assert layer.weight_packed.dtype == torch.uint8 and tuple(layer.weight_packed.shape) == (256, 344)
    with torch.no_grad():
        got = f4(input_ids=ids).logits
        assert torch.equal(got, from_pretrained(U8, dtype=torch.float32)(input_ids=ids).logits)
        assert rel_err(got, reference_model(F4)(input_ids=ids).logits) < 1e-4


def test_save_pretrained_keeps_f4(tmp_path: Path) -> None:
    from_pretrained(F4).save_pretrained(tmp_path)
    header = read_header(tmp_path / "model.safetensors")
    original = read_header(F4 / "model.safetensors")
    assert {n: (t.dtype, t.shape) for n, t in header.items()} == {
        n: (t.dtype, t.shape) for n, t in original.items()
    }
    before, after = _raw(F4), _raw(tmp_path)
    for k, t in before.items():
        assert torch.equal(_bytes(after[k]), _bytes(t)), k


def test_verify_dequantize_and_convert(tmp_path: Path) -> None:
    assert verify(str(F4))["passed"]
    dequantize_checkpoint(F4, tmp_path / "a", "fp32")
    dequantize_checkpoint(U8, tmp_path / "b", "fp32")
    a, b = _raw(tmp_path / "a"), _raw(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    convert_checkpoint(F4, tmp_path / "mo", "modelopt")
    header = read_header(tmp_path / "mo" / "model.safetensors")
    assert header["model.layers.0.mlp.down_proj.weight"].dtype == "F4"  # the checkpoint's own convention
    assert header["model.layers.0.mlp.down_proj.weight"].shape == (256, 688)
    mo = inspect_checkpoint(tmp_path / "mo")
    assert mo.format == "modelopt" and {q.packed_dtype for q in mo.quantized.values()} == {"F4"}


def _write_raw(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_f4_with_an_odd_logical_width_is_refused(tmp_path: Path) -> None:
    cfg = json.loads((U8 / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    header = {
        "model.layers.0.mlp.down_proj.weight_packed": {
            "dtype": "F4",
            "shape": [2, 5],
            "data_offsets": [0, 5],
        },
        "model.layers.0.mlp.down_proj.weight_scale": {
            "dtype": "F8_E4M3",
            "shape": [2, 1],
            "data_offsets": [5, 7],
        },
        "model.layers.0.mlp.down_proj.weight_global_scale": {
            "dtype": "F32",
            "shape": [1],
            "data_offsets": [7, 11],
        },
    }
    _write_raw(tmp_path / "model.safetensors", header, bytes(11))
    with pytest.raises(CheckpointError, match="F4 tensor 'model.layers.0.mlp.down_proj.weight_packed'.*even"):
        inspect_checkpoint(tmp_path)
