"""NVFP4 input embeddings (``quantize_embeddings``, on in low-memory mode), checked against the
independent float64 reference of tests/reference.py on random tables (never zeros).

Tolerances:
* lookup vs reference dequantization of the module's own bytes: 1e-6 relative per element (each value
  is e2m1 * e4m3 * multiplier: one float32 rounding, 2^-24);
* quantization error vs the original table, per element: |err| <= h(|x|/s) * s, s the block's scale
  (e4m3 block scale x multiplier), h = 0.25 / 0.5 / 1 for |x|/s up to 2 / 4 / beyond (half the gap
  between neighbouring E2M1 values; beyond 6 the value is clamped to 6s, and with an e4m3 scale
  rounded to nearest (<= 2^-4 relative) 6s >= amax * 15/16, so the clamp costs <= amax/16 = 0.4s);
* whole fixtures: logits against the float32 reference model carrying the reference-dequantized
  table, 1e-4 (as tests/test_loading.py); against the dense-embedding load, 0.2 (random tiny models
  pass the table's ~10% NVFP4 error straight through to the logits; measured 0.11-0.14).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import dequantize_np, e4m3_to_float, reference_model, rel_err
from safetensors import safe_open
from test_accuracy import CASES, DEMO, agreement, heldout  # noqa: F401 - heldout is a fixture
from test_loading import logits, model_class_for, token_ids

import nvfp4_fix
from nvfp4_fix import embedding
from nvfp4_fix.codec import quantize
from nvfp4_fix.embedding import NVFP4Embedding
from nvfp4_fix.loading import from_pretrained

FIXTURES = Path(__file__).parent / "fixtures"
UNTIED = [
    FIXTURES / "current" / "llama-nvfp4a16",
    FIXTURES / "legacy" / "llama-nvfp4",
    FIXTURES / "modelopt" / "llama-w4a16_nvfp4",
    FIXTURES / "current" / "qwen3_moe-nvfp4a16",
    FIXTURES / "current" / "llava-nvfp4a16",
]
TIED = [FIXTURES / "current" / "gemma-nvfp4a16", FIXTURES / "legacy" / "gemma-nvfp4"]


def random_table(v: int = 300, d: int = 64, seed: int = 0) -> torch.Tensor:
    """Gaussian rows of varying size, a few outliers, no zero."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(v, d, generator=g) * torch.rand(v, 1, generator=g).add(0.1) * 0.05
    t[torch.randint(0, v, (5,), generator=g), torch.randint(0, d, (5,), generator=g)] *= 20
    return torch.where(t == 0, torch.full_like(t, 1e-3), t)


def reference_table(m: NVFP4Embedding) -> np.ndarray:
    return dequantize_np(
        m.weight_packed.numpy(),
        m.weight_scale.view(torch.uint8).numpy(),
        float(m.weight_scale_2),
        "multiplier",
    )


def test_lookup_equals_reference_dequantization() -> None:
    m = NVFP4Embedding.from_dense(random_table(), dtype=torch.float32)
    ref = reference_table(m)
    ids = torch.tensor([[0, 299, 7, 7], [150, 1, 2, 3]])
    got = m(ids).double().numpy()
    assert got.shape == (2, 4, 64)
    np.testing.assert_allclose(got, ref[ids.numpy()], rtol=1e-6, atol=0)
    np.testing.assert_allclose(m(torch.tensor(5)).double().numpy(), ref[5], rtol=1e-6, atol=0)
    np.testing.assert_allclose(m.dequantized_weight().double().numpy(), ref, rtol=1e-6, atol=0)
    assert m(ids.reshape(-1)).shape == (8, 64) and m(ids).dtype == torch.float32
    assert NVFP4Embedding.from_dense(random_table(), dtype=torch.bfloat16)(ids).dtype == torch.bfloat16


def test_quantization_error_within_the_nvfp4_bound() -> None:
    w = random_table()
    m = NVFP4Embedding.from_dense(w, dtype=torch.float32)
    x = w.double().numpy()
    mul = float(m.weight_scale_2)
    assert mul == pytest.approx(np.abs(x).max() / (6 * 448), rel=1e-6)  # standard per-tensor scale
    block_scale = e4m3_to_float(m.weight_scale.view(torch.uint8).numpy())
    assert block_scale.min() >= 2**-6  # every block scale is an e4m3 normal: the bound's premise
    blocks = np.abs(x).reshape(300, 4, 16).max(-1)
    assert np.all(np.abs(block_scale - blocks / 6 / mul) <= blocks / 6 / mul / 16)  # nearest e4m3
    s = np.repeat(block_scale, 16, axis=1) * mul
    y = np.abs(x) / s
    half_gap = np.where(y <= 2, 0.25, np.where(y <= 4, 0.5, 1.0))
    err = np.abs(reference_table(m) - x)
    assert np.all(err <= half_gap * s * (1 + 1e-6))
    rel_rms = np.sqrt((err**2).mean() / (x**2).mean())
    assert 0.01 < rel_rms < 0.12, rel_rms  # 4-bit: measured ~0.09 on Gaussian data


def test_chunked_quantization_is_byte_identical_to_the_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    w = random_table(v=301, d=48)
    monkeypatch.setattr(embedding, "CHUNK_ELEMENTS", 1000)  # 20 rows a chunk, a short last one
    for table in (w, w.to(torch.bfloat16)):  # checkpoints hold 16-bit tables
        packed, scale, mul = quantize(table, "multiplier")
        m = NVFP4Embedding.from_dense(table)
        assert torch.equal(m.weight_packed, packed)
        assert torch.equal(m.weight_scale.view(torch.uint8), scale.view(torch.uint8))
        assert torch.equal(m.weight_scale_2, mul)


def test_state_dict_holds_the_dense_table_and_loads_back() -> None:
    m = NVFP4Embedding.from_dense(random_table(), padding_idx=3, dtype=torch.bfloat16)
    sd = m.state_dict()
    assert list(sd) == ["weight"] and sd["weight"].dtype == torch.bfloat16
    assert torch.equal(sd["weight"], m.dequantized_weight())
    other = NVFP4Embedding(300, 64, dtype=torch.bfloat16)
    other.load_state_dict(sd)
    # re-quantizing a dequantized table: its values are on the grid, so the lookup barely moves
    assert rel_err(other.dequantized_weight(torch.float32), sd["weight"].float()) < 0.02
    with pytest.raises(RuntimeError, match="expected"):
        other.load_state_dict({"weight": torch.ones(3, 64)})


def test_dtype_casts_keep_the_format_and_change_the_output() -> None:
    m = NVFP4Embedding.from_dense(random_table(), dtype=torch.bfloat16)
    ids = torch.tensor([[4, 8, 15]])
    expected = m(ids).float()
    for cast, dtype in ((lambda x: x.half(), torch.float16), (lambda x: x.to(torch.float32), torch.float32)):
        cast(m)
        assert m.weight_scale.dtype == torch.float8_e4m3fn and m.weight_scale_2.dtype == torch.float32
        assert m(ids).dtype == dtype
        assert rel_err(m(ids).float(), expected) < 1e-2  # bf16 rounding of the expected rows


def test_bad_tables_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of the block size"):
        NVFP4Embedding(10, 40)
    with pytest.raises(ValueError, match="inf or NaN"):
        NVFP4Embedding.from_dense(torch.full((4, 16), float("inf")))
    with pytest.raises(ValueError, match="2-D float"):
        NVFP4Embedding.from_dense(torch.ones(4, 16, dtype=torch.int64))


def _with_reference_table(path: Path, model) -> torch.nn.Module:
    """The float32 reference model of ``path`` with its embedding table replaced by the float64
    reference dequantization of ``model``'s NVFP4 table."""
    ref = reference_model(path, model_class_for(path))
    table = reference_table(model.get_input_embeddings())
    ref.get_input_embeddings().weight.data = torch.from_numpy(table).float()
    return ref


@pytest.mark.parametrize("path", UNTIED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fixture_with_quantized_embedding(path: Path) -> None:
    cls = model_class_for(path)
    dense = from_pretrained(path, cls, dtype=torch.float32, activations="bf16")
    model = from_pretrained(path, cls, dtype=torch.float32, activations="bf16", quantize_embeddings=True)
    emb = model.get_input_embeddings()
    assert isinstance(emb, NVFP4Embedding) and emb.weight_packed.dtype == torch.uint8
    assert not any("embed_tokens" in n for n, _ in model.named_parameters())
    ids = token_ids(path)
    got = logits(model, ids)
    assert rel_err(got, logits(_with_reference_table(path, model), ids)) < 1e-4
    assert rel_err(got, logits(dense, ids)) < 0.2


@pytest.mark.parametrize("path", TIED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_tied_embedding_stays_dense_with_a_message(path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="nvfp4_fix"):
        model = from_pretrained(path, dtype=torch.float32, quantize_embeddings=True)
    assert not isinstance(model.get_input_embeddings(), NVFP4Embedding)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert any("tied to the output layer" in r.getMessage() for r in caplog.records)


def test_low_memory_mode_quantizes_and_the_option_overrides_it() -> None:
    path = UNTIED[0]
    assert isinstance(from_pretrained(path).get_input_embeddings(), torch.nn.Embedding)
    try:
        nvfp4_fix.enable_low_memory_mode()
        assert isinstance(from_pretrained(path).get_input_embeddings(), NVFP4Embedding)
        off = from_pretrained(path, quantize_embeddings=False)
        assert isinstance(off.get_input_embeddings(), torch.nn.Embedding)
    finally:
        nvfp4_fix.enable_low_memory_mode(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_pretrained_writes_the_dequantized_table(dtype: torch.dtype, tmp_path: Path) -> None:
    path = UNTIED[0]
    model = from_pretrained(path, dtype=dtype, quantize_embeddings=True)
    model.save_pretrained(tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        table = f.get_tensor("model.embed_tokens.weight")
    assert not any("embed_tokens.weight_" in k for k in keys)
    assert table.dtype == dtype and torch.equal(table, model.model.embed_tokens.dequantized_weight())
    assert "quantization_config" in json.loads((tmp_path / "saved" / "config.json").read_text())
    ids = token_ids(path)
    again = from_pretrained(tmp_path / "saved", dtype=dtype)
    assert isinstance(again.get_input_embeddings(), torch.nn.Embedding)
    assert torch.equal(logits(again, ids), logits(model, ids))
    requantized = from_pretrained(tmp_path / "saved", dtype=dtype, quantize_embeddings=True)
    assert rel_err(logits(requantized, ids), logits(model, ids)) < 0.05


@pytest.mark.parametrize("name", list(CASES))
def test_demo_accuracy_with_quantized_embedding(name: str, heldout) -> None:  # noqa: F811
    """The demo model keeps the accuracy bounds of tests/test_accuracy.py with its embedding in NVFP4
    (first 1024 held-out tokens; measured agreement 0.939 / 0.947 / 0.906 / 0.911 for ct-nvfp4a16,
    modelopt-w4a16_nvfp4, ct-nvfp4, modelopt-nvfp4, perplexity ratio 0.998-1.004)."""
    ids, ref = heldout
    model = from_pretrained(DEMO / name, dtype=torch.float32, quantize_embeddings=True)
    assert isinstance(model.get_input_embeddings(), NVFP4Embedding)
    agree, ratio = agreement(model, ids, ref)
    min_agree, max_ratio = CASES[name]
    assert agree >= min_agree and ratio <= max_ratio, (agree, ratio)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_lookup_is_captured_in_a_cuda_graph() -> None:
    m = NVFP4Embedding.from_dense(random_table(), dtype=torch.bfloat16, device="cuda")
    ids = torch.tensor([[1, 2, 299]], device="cuda")
    expected = m(ids)  # eager warm-up (caches the E2M1 table on the device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = m(ids)
    ids.copy_(torch.tensor([[299, 2, 1]]))
    graph.replay()
    assert torch.equal(out, expected.flip(1))
