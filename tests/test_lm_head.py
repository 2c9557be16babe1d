"""The opt-in NVFP4 lm_head (``from_pretrained(..., quantize_lm_head=True)``), checked against the
independent float64 reference of tests/reference.py on random data and on the shipped fixtures.

Tolerances:
* output vs float64 x @ W.T with W the reference dequantization of the layer's own bytes: 1e-5
  relative L2 in float32 (one float32 rounding per product, sums of 64-256 terms), 1e-2 in bf16;
* output vs the original dense layer (the quantization error, not a bug bound): < 0.15 relative L2 on
  Gaussian weights (NVFP4 is ~9% RMS on Gaussian data, tests/test_embedding.py; measured 0.09 here);
* whole fixtures: logits vs the float32 reference model carrying the reference-dequantized lm_head,
  1e-4 (as tests/test_loading.py); vs the dense-lm_head load 0.15 (tiny random fixtures pass the
  lm_head's NVFP4 error straight to the logits: measured 0.096-0.100);
* the demo model (trained weights) on 512 held-out tokens: logits 0.04 relative L2 against its dense
  lm_head (measured 0.028) and top-1 agreement >= 0.88 with it (measured 0.93-0.94).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import dequantize_np, hf_greedy, reference_model, rel_err
from safetensors import safe_open
from test_loading import _quantized_tensors, logits, model_class_for, token_ids

from nvfp4_fix import embedding
from nvfp4_fix.codec import quantize
from nvfp4_fix.commands import main as cli
from nvfp4_fix.embedding import NVFP4Embedding
from nvfp4_fix.generation import generate
from nvfp4_fix.layer import NVFP4Linear
from nvfp4_fix.lm_head import NVFP4LMHead, quantize_output_layer
from nvfp4_fix.loading import from_pretrained

FIXTURES = Path(__file__).parent / "fixtures"
DEMO = FIXTURES / "demo" / "ct-nvfp4a16"
UNTIED = [
    FIXTURES / "current" / "llama-nvfp4a16",
    FIXTURES / "legacy" / "llama-nvfp4",
    FIXTURES / "modelopt" / "llama-w4a16_nvfp4",
    FIXTURES / "current" / "qwen3_moe-nvfp4a16",
]
TIED = [FIXTURES / "current" / "gemma-nvfp4a16", FIXTURES / "legacy" / "gemma-nvfp4"]


def _id(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


def random_linear(out: int = 300, k: int = 64, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    """Gaussian rows of varying size, a few outliers, no zero weight."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(k, out, bias=bias)
    w = torch.randn(out, k, generator=g) * torch.rand(out, 1, generator=g).add(0.1) * 0.05
    w[torch.randint(0, out, (5,), generator=g), torch.randint(0, k, (5,), generator=g)] *= 20
    with torch.no_grad():
        lin.weight.copy_(torch.where(w == 0, torch.full_like(w, 1e-3), w))
        if bias:
            lin.bias.copy_(torch.randn(out, generator=g) * 0.1)
    return lin


def reference_weight(head: NVFP4LMHead) -> np.ndarray:
    return dequantize_np(
        head.weight_packed.numpy(),
        head.weight_scale.view(torch.uint8).numpy(),
        float(head.weight_global_scale),
        "divisor",
    )


def test_output_equals_the_float64_reference_of_its_codes() -> None:
    lin = random_linear()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    bias = lin.bias.detach().double().numpy()
    with torch.no_grad():
        head = NVFP4LMHead.from_linear(lin)
        assert isinstance(head, NVFP4Linear) and head.weight_packed.dtype == torch.uint8
        got = head(x)
        assert got.dtype == torch.float32 and got.shape == (2, 5, 300)
        ref = x.double().numpy() @ reference_weight(head).T + bias
        assert rel_err(got, torch.from_numpy(ref)) < 1e-5
        # the quantization error against the original dense layer (stated, loose)
        assert 0.01 < rel_err(got, lin(x)) < 0.15, rel_err(got, lin(x))
        h16 = NVFP4LMHead.from_linear(copy.deepcopy(lin).to(torch.bfloat16))  # a bf16 checkpoint
        got16 = h16(x.to(torch.bfloat16))
        assert got16.dtype == torch.bfloat16
        ref16 = x.double().numpy() @ reference_weight(h16).T + lin.bias.detach().bfloat16().double().numpy()
        assert rel_err(got16, torch.from_numpy(ref16)) < 1e-2


def test_quantization_is_the_codec_chunk_by_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    w32 = random_linear(301, 48, bias=False, seed=2).weight.detach()
    monkeypatch.setattr(embedding, "CHUNK_ELEMENTS", 1000)  # 20 rows a chunk, a short last one
    for w in (w32, w32.to(torch.bfloat16)):
        packed, scale, divisor = quantize(w, "divisor")
        head = NVFP4LMHead(48, 301, dtype=w.dtype)
        head.quantize_(w)
        assert torch.equal(head.weight_packed, packed)
        assert torch.equal(head.weight_scale.view(torch.uint8), scale.view(torch.uint8))
        assert torch.equal(head.weight_global_scale, divisor)
    # the embedding's multiplier convention through the same chunked helper is unchanged
    emb_packed, emb_scale, mul = quantize(w32, "multiplier")
    emb = NVFP4Embedding.from_dense(w32)
    assert torch.equal(emb.weight_packed, emb_packed) and torch.equal(emb.weight_scale_2, mul)
    assert torch.equal(emb.weight_scale.view(torch.uint8), emb_scale.view(torch.uint8))


def test_state_dict_holds_the_dequantized_weight_and_loads_back(caplog: pytest.LogCaptureFixture) -> None:
    head = NVFP4LMHead.from_linear(random_linear().to(torch.bfloat16))
    with caplog.at_level(logging.WARNING, logger="nvfp4_fix"):
        sd = head.state_dict()
    assert any("quantized to NVFP4 at load" in r.getMessage() for r in caplog.records)
    assert sorted(sd) == ["bias", "weight"] and sd["weight"].dtype == torch.bfloat16
    ref = torch.from_numpy(reference_weight(head))
    assert rel_err(sd["weight"], ref) < 4e-3  # bf16 rounding of the dequantized values
    other = NVFP4LMHead(64, 300, bias=True)
    other.load_state_dict(sd)
    assert torch.equal(other.bias, head.bias)
    assert rel_err(torch.from_numpy(reference_weight(other)), ref) < 0.02  # values already on the grid
    tied = NVFP4LMHead.from_linear(random_linear(bias=False), tied=True)
    assert tied.state_dict() == {}
    tied.load_state_dict({})  # strict: a tied head expects nothing


@pytest.mark.parametrize("path", UNTIED + TIED, ids=_id)
def test_fixture_with_quantized_lm_head(path: Path) -> None:
    cls = model_class_for(path)
    dense = from_pretrained(path, cls, dtype=torch.float32, activations="bf16")
    model = from_pretrained(path, cls, dtype=torch.float32, activations="bf16", quantize_lm_head=True)
    head = model.get_output_embeddings()
    assert isinstance(head, NVFP4LMHead) and head.tied == (path in TIED)
    assert "lm_head.weight" not in dict(model.named_parameters())  # the packed tensors only
    ref = reference_model(path, cls)
    # an untied Parameter of its own: the reference's embedding keeps the dense table
    ref.lm_head.weight = torch.nn.Parameter(torch.from_numpy(reference_weight(head)).float())
    ids = token_ids(path)
    got = logits(model, ids)
    assert rel_err(got, logits(ref, ids)) < 1e-4
    assert rel_err(got, logits(dense, ids)) < 0.15
    emb = model.get_input_embeddings()
    assert not isinstance(emb, NVFP4Embedding)
    assert torch.equal(emb.weight, dense.get_input_embeddings().weight)


@pytest.mark.parametrize("path", TIED, ids=_id)
def test_tied_table_stays_dense_with_quantized_embeddings_too(path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="nvfp4_fix"):
        model = from_pretrained(path, dtype=torch.float32, quantize_embeddings=True, quantize_lm_head=True)
    assert not isinstance(model.get_input_embeddings(), NVFP4Embedding)
    assert isinstance(model.get_output_embeddings(), NVFP4LMHead) and model.lm_head.tied
    assert any("tied to the output layer" in r.getMessage() for r in caplog.records)


def test_untied_embedding_and_lm_head_both_quantized() -> None:
    model = from_pretrained(UNTIED[0], dtype=torch.float32, quantize_embeddings=True, quantize_lm_head=True)
    assert isinstance(model.get_input_embeddings(), NVFP4Embedding)
    assert isinstance(model.get_output_embeddings(), NVFP4LMHead) and not model.lm_head.tied


def test_demo_model_accuracy_against_its_dense_lm_head() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO)
    text = (FIXTURES / "demo" / "heldout.txt").read_text()
    ids = tok(text, return_tensors="pt")["input_ids"][:, :512]
    dense = from_pretrained(DEMO, dtype=torch.float32)
    quant = from_pretrained(DEMO, dtype=torch.float32, quantize_lm_head=True)
    d = torch.cat([logits(dense, c)[0] for c in ids.split(256, dim=1)])
    q = torch.cat([logits(quant, c)[0] for c in ids.split(256, dim=1)])
    agree = (q.argmax(-1) == d.argmax(-1)).double().mean().item()
    assert rel_err(q, d) < 0.04 and agree >= 0.88, (rel_err(q, d), agree)


@pytest.mark.parametrize("path", [DEMO, TIED[0]], ids=_id)
def test_greedy_generation_with_quantized_lm_head(path: Path) -> None:
    model = from_pretrained(path, dtype=torch.float32, quantize_lm_head=True)
    ids = token_ids(path, 8)[:1]
    ref = hf_greedy(model, ids, 12)
    got = generate(model, ids, 12, use_cuda_graph=False, stop_token_ids=())
    assert got.shape == (1, 20) and got.tolist() == ref.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_pretrained_writes_the_dequantized_lm_head_with_a_warning(
    dtype: torch.dtype, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = UNTIED[0]
    model = from_pretrained(path, dtype=dtype, quantize_lm_head=True)
    with caplog.at_level(logging.WARNING, logger="nvfp4_fix"):
        model.save_pretrained(tmp_path / "saved")
    assert any("lm_head.weight was quantized to NVFP4" in r.getMessage() for r in caplog.records)
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        saved = f.get_tensor("lm_head.weight")
    assert not any(k.startswith("lm_head.weight_") for k in keys)
    assert saved.dtype == dtype and torch.equal(saved, model.lm_head.dequantized_weight(dtype))
    assert _quantized_tensors(tmp_path / "saved") == _quantized_tensors(path)  # the rest as loaded
    again = from_pretrained(tmp_path / "saved", dtype=dtype)
    assert type(again.lm_head) is torch.nn.Linear  # a dense lm_head, as the config says
    ids = token_ids(path)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(logits(again, ids), logits(model, ids)) < tol


def test_save_pretrained_of_a_tied_model_keeps_the_original_table(tmp_path: Path, caplog) -> None:
    path = TIED[0]
    model = from_pretrained(path, dtype=torch.bfloat16, quantize_lm_head=True)
    with caplog.at_level(logging.WARNING, logger="nvfp4_fix"):
        model.save_pretrained(tmp_path / "saved")
    assert not any("quantized to NVFP4 at load" in r.getMessage() for r in caplog.records)
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        table = f.get_tensor("model.embed_tokens.weight")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        original = f.get_tensor("model.embed_tokens.weight")
    assert not any(k.startswith("lm_head") for k in keys)
    assert torch.equal(table, original.to(torch.bfloat16))
    ids = token_ids(path)
    again = from_pretrained(tmp_path / "saved", dtype=torch.bfloat16)
    assert torch.equal(logits(again, ids), logits(from_pretrained(path, dtype=torch.bfloat16), ids))


def test_option_off_is_todays_load(tmp_path: Path) -> None:
    path = UNTIED[0]
    default, off = from_pretrained(path), from_pretrained(path, quantize_lm_head=False)
    assert type(default.lm_head) is torch.nn.Linear and type(off.lm_head) is torch.nn.Linear
    a, b = default.state_dict(), off.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    default.save_pretrained(tmp_path / "a")
    off.save_pretrained(tmp_path / "b")
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_layers_that_cannot_be_quantized_stay_dense(caplog: pytest.LogCaptureFixture) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    cfg = LlamaConfig(vocab_size=64, hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="nvfp4_fix"):
        assert not quantize_output_layer(LlamaForCausalLM(cfg), True)
        assert not quantize_output_layer(LlamaModel(cfg), True)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "width 40 is not a multiple of 16" in text and "no output layer" in text
    assert not quantize_output_layer(LlamaForCausalLM(cfg), False)


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_cli_quantize_lm_head(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--max-new-tokens", "3", "--temperature", "0"] if command == "generate" else ["--new-tokens", "2"]
    prompt = ["def"] if command == "generate" else ["--prompt-tokens", "4"]
    code = cli([command, str(DEMO), *prompt, *args, "--quantize-lm-head"])
    out, err = capsys.readouterr()
    assert code == 0, err
    expected = "--- 3 tokens in" if command == "generate" else "lm_head NVFP4, quantized at load"
    assert expected in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lm_head_matches_the_reference_and_generates_in_a_graph() -> None:
    cpu = from_pretrained(DEMO, dtype=torch.float32, quantize_lm_head=True)
    model = from_pretrained(DEMO, dtype=torch.bfloat16, device_map="cuda", quantize_lm_head=True)
    head = model.lm_head
    assert isinstance(head, NVFP4LMHead) and head.weight_packed.is_cuda
    assert torch.equal(head.weight_packed.cpu(), cpu.lm_head.weight_packed)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3))
    ref = x.double() @ torch.from_numpy(reference_weight(cpu.lm_head)).T
    with torch.no_grad():
        for m in (1, 3):  # the decode GEMV and a small GEMM
            got = head(x[:m].to("cuda", torch.bfloat16))
            assert rel_err(got.float().cpu(), ref[:m]) < 1e-2
    ids = token_ids(DEMO, 8)[:1].cuda()
    # float32: the graph gives model.generate's tokens exactly (as tests/test_generation.py)
    model32 = from_pretrained(DEMO, dtype=torch.float32, device_map="cuda", quantize_lm_head=True)
    stats: dict = {}
    got = generate(model32, ids, 24, stop_token_ids=(), stats=stats).cpu()
    assert stats["path"] == "cuda-graph", stats
    assert got.tolist() == hf_greedy(model32, ids, 24).tolist()
    # bf16: the replayed graph runs the kernels of the eager static loop -> identical tokens
    stats = {}
    graph = generate(model, ids, 24, stop_token_ids=(), stats=stats).cpu()
    assert stats["path"] == "cuda-graph", stats
    assert graph.tolist() == generate(model, ids, 24, stop_token_ids=(), use_cuda_graph=False).cpu().tolist()
