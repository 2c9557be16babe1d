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

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

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
