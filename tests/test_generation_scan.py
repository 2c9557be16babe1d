"""generation/scan.py: one walk over a model's module tree serves every generate call, and is redone
when the tree's tensors move or after clear_cache."""

from __future__ import annotations

import collections

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nvfp4_fix.generation import clear_cache, generate, scan  # noqa: E402
from nvfp4_fix.generation.fallback import model_device  # noqa: E402


def _moe(layers: int = 2):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
        num_experts_per_tok=4,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def test_scan_holds_every_module_config_and_device():
    model = _moe()
    found = scan.scan(model)
    want = collections.Counter(type(m).__name__ for m in model.modules())
    assert {k: len(v) for k, v in found.by_class.items()} == dict(want)
    assert found.devices == {torch.device("cpu")}
    assert any(c is model.config for c in found.configs)
    assert scan.scan(model) is found  # kept on the model
    holders = [m for m in model.modules() if m._parameters or m._buffers]
    assert found.sample[0] is holders[0] and found.sample[-1] is holders[-1]
    assert len(found.sample) <= scan.SAMPLES + 1


def test_one_walk_serves_every_generate_call(monkeypatch):
    model = _moe()
    walks = []
    walk = scan._walk
    monkeypatch.setattr(scan, "_walk", lambda m: walks.append(1) or walk(m))
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    stats: dict = {}
    first = generate(model, ids, max_new_tokens=3, use_cuda_graph=False, stats=stats)
    if stats["path"] == "model.generate":
        pytest.skip("this transformers' Qwen3-MoE has no static cache: model.generate runs it")
    for _ in range(2):
        assert torch.equal(generate(model, ids, max_new_tokens=3, use_cuda_graph=False), first)
    assert len(walks) == 1
    clear_cache(model)
    generate(model, ids, max_new_tokens=3, use_cuda_graph=False)
    assert len(walks) == 2


def test_moved_tensors_are_walked_again():
    model = _moe()
    first = scan.scan(model)
    first.sample[len(first.sample) // 2].to("meta")  # one sampled module moves: walked again
    second = scan.scan(model)
    assert second is not first and second.devices == {torch.device("cpu")}  # meta tensors left out
    model.to("meta")  # the whole model moves
    third = scan.scan(model)
    assert third is not second and third.devices == frozenset()
    with pytest.raises(Exception, match="spans several devices"):
        model_device(model)
