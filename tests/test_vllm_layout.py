"""What this package writes has the layout vLLM's NVFP4 loaders create parameters for.

vLLM cannot run here (no GPU build); its loaders are specified by the parameters their
``create_weights`` registers (vLLM's CompressedTensorsW4A4Fp4 / W4A16Fp4 and ModelOptNvFp4LinearMethod):

compressed-tensors: weight_packed uint8 [N, K/2], weight_scale e4m3 [N, K/16], weight_global_scale
float32 [1], input_global_scale float32 [1] (W4A4 only); config quant_method "compressed-tensors",
format "nvfp4-pack-quantized". ModelOpt: weight uint8 [N, K/2], weight_scale e4m3 [N, K/16],
weight_scale_2 float32 scalar, input_scale float32 scalar (W4A4 only); hf_quant_config.json with
quantization.quant_algo "NVFP4".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nvfp4_fix.checkpoint import inspect_checkpoint
from nvfp4_fix.loading import from_pretrained

FIXTURES = Path(__file__).parent / "fixtures"
CASES = [FIXTURES / "demo" / n for n in ("ct-nvfp4a16", "ct-nvfp4", "modelopt-nvfp4", "modelopt-w4a16_nvfp4")]
CASES = [p for p in CASES if p.exists()]

SPEC = {
    "compressed-tensors": {
        "weight_packed": (torch.uint8, "N,K/2"),
        "weight_scale": (torch.float8_e4m3fn, "N,K/16"),
        "weight_global_scale": (torch.float32, "1"),
        "input_global_scale": (torch.float32, "1"),
    },
    "modelopt": {
        "weight": (torch.uint8, "N,K/2"),
        "weight_scale": (torch.float8_e4m3fn, "N,K/16"),
        "weight_scale_2": (torch.float32, ""),
        "input_scale": (torch.float32, ""),
    },
}


def _shape(spec: str, n: int, k: int) -> tuple[int, ...]:
    env = {"N": n, "K/2": k // 2, "K/16": k // 16, "1": 1}
    return tuple(env[s] for s in spec.split(",")) if spec else ()


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.name)
def test_saved_checkpoint_has_vllm_loader_layout(path: Path, tmp_path: Path) -> None:
    out = tmp_path / "saved"
    from_pretrained(path).save_pretrained(out)
    info = inspect_checkpoint(out)
    spec = SPEC[info.format]
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
        for prefix, q in info.quantized.items():
            for leaf, (dtype, shape) in spec.items():
                name = f"{prefix}.{leaf}"
                if leaf.startswith("input") and info.weight_only:
                    assert name not in keys
                    continue
                t = fh.get_tensor(name)
                assert t.dtype == dtype and tuple(t.shape) == _shape(shape, q.out_features, q.in_features), (
                    name
                )
    config = json.loads((out / "config.json").read_text())
    if info.format == "compressed-tensors":
        qc = config["quantization_config"]
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "nvfp4-pack-quantized"
        assert (
            qc["config_groups"]
            == json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]
        )
    else:
        hq = json.loads((out / "hf_quant_config.json").read_text())
        assert "NVFP4" in hq["quantization"]["quant_algo"]
