"""Fused q/k/v and gate/up (nvfp4_fix.fusion): same outputs, same state_dict, no extra memory.

CPU: the members become row views of one buffer and still compute alone (the fused kernel is CUDA
only); logits and the saved tensors must not change. GPU: the fused kernel serves every member;
outputs equal each member run alone within bf16 rounding (relative L2 1e-2; the float64 reference
of the fused product is checked too).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference import rel_err
from test_kernels import make_weight, ref_linear_f64

from nvfp4_fix import fusion
from nvfp4_fix.layer import NVFP4Linear
from nvfp4_fix.loading import from_pretrained

FIXTURE = Path(__file__).parent / "fixtures" / "current" / "qwen3-nvfp4a16"


def _packed_linear(n: int, k: int, device: str, bias: bool) -> NVFP4Linear:
    lin = NVFP4Linear(k, n, bias=bias, device=device, dtype=torch.bfloat16)
    wp, ws, mul = make_weight(n, k, device)
    ws = (ws.view(torch.uint8) & 0x7F).view(torch.float8_e4m3fn)
    with torch.no_grad():
        lin.weight_packed.copy_(wp)
        lin.weight_scale.copy_(ws)
        lin.weight_global_scale.copy_(1.0 / mul.reshape(1))
        if bias:
            lin.bias.copy_(torch.randn(n).to(lin.bias))
    return lin


class Attn(torch.nn.Module):
    def __init__(self, k: int, device: str, bias: bool) -> None:
        super().__init__()
        self.q_proj = _packed_linear(512, k, device, bias)
        self.k_proj = _packed_linear(128, k, device, bias)
        self.v_proj = _packed_linear(128, k, device, bias)


def test_fixture_views_state_dict_and_save(tmp_path):
    model = from_pretrained(FIXTURE, dtype=torch.float32)
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fusion.fuse_siblings(model) == 0  # the loader fuses CUDA layers only
    groups = fusion.fuse_siblings(model, device_types=("cpu",))  # storage sharing, hooks, save
    layers = model.config.num_hidden_layers
    assert groups == 2 * layers
    attn = model.model.layers[0].self_attn
    assert (
        attn.q_proj.weight_packed.untyped_storage().data_ptr()
        == attn.v_proj.weight_packed.untyped_storage().data_ptr()
    )
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    sd = model.state_dict()
    assert sd.keys() == sd_before.keys()
    for k, v in sd.items():
        assert torch.equal(v, sd_before[k]), k
    ptrs = [v.untyped_storage().data_ptr() for k, v in sd.items() if "proj.weight" in k]
    assert len(ptrs) == len(set(ptrs)), "state_dict tensors must not share storage"
    model.save_pretrained(tmp_path / "out")
    again = from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 64, 300])
def test_fused_matches_members_gpu(m, bias):
    torch.manual_seed(m)
    k = 384
    attn = Attn(k, "cuda", bias)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    alone = [lin(x) for lin in (attn.q_proj, attn.k_proj, attn.v_proj)]
    refs = [
        ref_linear_f64(x, lin.weight_packed, lin.weight_scale, lin.weight_mul, lin.bias)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj)
    ]
    assert fusion.fuse_siblings(attn) == 1
    calls = []
    real = fusion.nvfp4_linear
    monkey = pytest.MonkeyPatch()
    monkey.setattr(fusion, "nvfp4_linear", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    try:
        fused = [lin(x) for lin in (attn.q_proj, attn.k_proj, attn.v_proj)]
    finally:
        monkey.undo()
    assert len(calls) == 1  # any M: cuda_mma, Triton or dequantize + cuBLAS, per-row multipliers
    for a, f, r in zip(alone, fused, refs, strict=True):
        assert f.shape == a.shape
        assert rel_err(f.float().cpu(), a.float().cpu()) < 1e-2
        assert rel_err(f.double().cpu(), r.cpu()) < 1e-2
    # a different input for one member: computed alone, still right
    x2 = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = attn.k_proj(x2)
    r = ref_linear_f64(
        x2, attn.k_proj.weight_packed, attn.k_proj.weight_scale, attn.k_proj.weight_mul, attn.k_proj.bias
    )
    assert rel_err(y.double().cpu(), r.cpu()) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_group_makes_one_launch_gpu(monkeypatch):
    from nvfp4_fix.kernels import cuda_mma

    torch.manual_seed(0)
    k = 384
    attn = Attn(k, "cuda", False)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    members = (attn.q_proj, attn.k_proj, attn.v_proj)
    assert fusion.fuse_siblings(attn) == 1

    def step(x: torch.Tensor) -> torch.Tensor:
        h = torch.sin(x)  # one traced input for every member, as in an attention block
        return torch.cat([m(h) for m in members], dim=-1)

    compiled = torch.compile(step, dynamic=False, fullgraph=True)
    compiled(x)
    calls = []
    real = cuda_mma.linear
    monkeypatch.setattr(cuda_mma, "linear", lambda *a, **kw: calls.append(a[1].shape[0]) or real(*a, **kw))
    y = compiled(x)
    assert calls == [512 + 128 + 128]
    refs = [
        ref_linear_f64(torch.sin(x), m.weight_packed, m.weight_scale, m.weight_mul, m.bias) for m in members
    ]
    assert rel_err(y.double().cpu(), torch.cat(refs, dim=-1).cpu()) < 1e-2
