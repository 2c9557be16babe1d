"""Loading on CUDA: device maps, CPU offload, dtypes, peak memory. Skipped without a GPU.

Logits are compared with the same model run on the CPU through the reference kernel path
(relative L2 tolerance 2e-2 in bf16/fp16: different kernels accumulate in different orders).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference import rel_err

from nvfp4_fix.layer import NVFP4Linear
from nvfp4_fix.loading import from_pretrained

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FIXTURES = Path(__file__).parent / "fixtures"
CASES = [
    FIXTURES / "current" / "llama-nvfp4a16",
    FIXTURES / "modelopt" / "llama-nvfp4",
    FIXTURES / "current" / "qwen3_moe-nvfp4a16",
]
CASES = [p for p in CASES if p.exists()]


def _ids() -> torch.Tensor:
    return torch.randint(3, 500, (2, 13), generator=torch.Generator().manual_seed(0))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


@pytest.mark.parametrize("path", CASES, ids=lambda p: f"{p.parent.name}/{p.name}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(path: Path, dtype: torch.dtype) -> None:
    cpu = _logits(from_pretrained(path, dtype=torch.float32, activations="bf16"), _ids())
    model = from_pretrained(path, dtype=dtype, device_map="cuda", activations="bf16")
    for m in model.modules():
        if isinstance(m, NVFP4Linear):
            assert m.weight_packed.is_cuda and m.weight_packed.dtype == torch.uint8
    assert rel_err(_logits(model, _ids()), cpu) < 2e-2


@pytest.mark.parametrize("path", CASES[:2], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_split_between_gpu_and_cpu_offload(path: Path) -> None:
    whole = _logits(from_pretrained(path, device_map="cuda"), _ids())
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    split = from_pretrained(
        path, device_map="sequential", max_memory={0: int(total * 0.6), "cpu": 10 * 2**30}
    )
    devices = set(map(str, split.hf_device_map.values()))
    assert "cpu" in devices and any(d not in ("cpu", "disk") for d in devices), split.hf_device_map
    assert rel_err(_logits(split, _ids()), whole) < 1e-3
    out = split.generate(_ids()[:1].to("cuda"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == _ids().shape[1] + 4


def test_peak_memory_is_near_packed_size() -> None:
    path = CASES[0]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = from_pretrained(path, device_map="cuda")
    resident = torch.cuda.memory_allocated() - base
    peak = torch.cuda.max_memory_allocated() - base
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert resident <= params * 1.2 + 2**20
    assert peak <= resident * 1.15 + 2**20, (peak, resident)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("path", CASES[:2], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_split_across_two_gpus(path: Path) -> None:
    whole = _logits(from_pretrained(path, device_map="cuda:0"), _ids())
    total = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    split = from_pretrained(path, device_map="sequential", max_memory={0: int(total * 0.6), 1: 10 * 2**30})
    devices = set(map(str, split.hf_device_map.values()))
    assert {"0", "1"} <= devices or {"cuda:0", "cuda:1"} <= devices, split.hf_device_map
    assert rel_err(_logits(split, _ids()), whole) < 1e-3
    out = split.generate(_ids()[:1].to("cuda:0"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == _ids().shape[1] + 4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("m", [1, 26, 300])
def test_kernels_follow_their_tensors_to_the_second_gpu(m: int) -> None:
    """With cuda:0 current, every kernel given cuda:1 tensors must run on cuda:1 (Triton launches on
    the current device unless told otherwise): linear at each dispatch size, W4A4 activation
    quantization, the KV append, decode attention."""
    from nvfp4_fix.codec import quantize
    from nvfp4_fix.kernels import act_quant, kv_cache, nvfp4_linear
    from nvfp4_fix.kernels.decode_attention import decode_attention
    from nvfp4_fix.kernels.reference import linear_reference
    from nvfp4_fix.layer import fake_quantize_activations

    g = torch.Generator().manual_seed(m)
    dev = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    wp, ws, gs = quantize(torch.randn(384, 512, generator=g), "multiplier")
    wp, ws, mul = wp.to(dev), ws.to(dev), gs.to(dev)
    x = torch.randn(m, 512, generator=g).to(torch.bfloat16).to(dev)
    y = nvfp4_linear(x, wp, ws, mul)
    assert y.device == dev
    assert rel_err(y, linear_reference(x, wp, ws, mul, None)) < 1e-2
    div = (2688.0 / x.float().abs().amax()).reshape(1)
    assert torch.equal(act_quant.fake_quantize(x, div), fake_quantize_activations(x, div))
    keys, values = (torch.randn(1, 2, 8, 64, generator=g).to(torch.bfloat16).to(dev) for _ in range(2))
    k, v = (torch.randn(1, 2, 1, 64, generator=g).to(torch.bfloat16).to(dev) for _ in range(2))
    length = torch.tensor(3, device=dev)
    want_k = keys.clone().index_copy_(2, torch.tensor([3], device=dev), k)
    kv_cache.append_kv(keys, values, k, v, length)
    assert torch.equal(keys, want_k) and int(length) == 4
    q = torch.randn(1, 4, 1, 64, generator=g).to(torch.bfloat16).to(dev)
    mask = torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16, device=dev)
    mask[..., 4:] = float("-inf")  # the first four positions are filled
    out = decode_attention(q, keys, values, mask, 0.125)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), keys.float().repeat_interleave(2, 1), values.float().repeat_interleave(2, 1),
        attn_mask=mask.float(), scale=0.125,
    ).transpose(1, 2)  # fmt: skip
    assert rel_err(out, ref) < 1e-2
