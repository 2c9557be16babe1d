"""A random-weight Qwen3-30B-A3B-shaped model and its NVFP4 checkpoint, made on the GPU.

Shared by bench_moe.py. Shape (Qwen/Qwen3-30B-A3B's config.json): 48 layers, hidden 2048, 32 query /
4 KV heads of 128, 128 experts of intermediate 768, 8 routed per token, vocabulary 151936. Weights are
N(0, 0.02), norms 1, drawn on the device with a fixed seed. The NVFP4 checkpoint is the layout
llmcompressor writes for Qwen3-MoE (compressed-tensors ``nvfp4-pack-quantized``, W4A16): every
attention projection and every expert's gate, up and down projection quantized with its own global
scale (``nvfp4_fix.writer.quantized_tensors``, on the GPU), the routers (``mlp.gate``), embeddings,
norms and lm_head in bf16. Shards of ~2 GB go to disk as they fill.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from llama8b import write_shards

__all__ = ["qwen3_moe_config", "write_moe_checkpoint"]


def qwen3_moe_config(layers: int = 48, tiny: bool = False) -> Any:
    from transformers import Qwen3MoeConfig

    if tiny:  # a CPU smoke test of the scripts
        shape = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     num_experts=8, num_experts_per_tok=2, max_position_embeddings=4096)  # fmt: skip
    else:
        shape = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)  # fmt: skip
    cfg = Qwen3MoeConfig(**shape, norm_topk_prob=True, tie_word_embeddings=False)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.dtype = torch.bfloat16
    return cfg


def _nvfp4_tensors(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The checkpoint tensors for one state_dict entry: fused experts split per expert and projection."""
    from nvfp4_fix.writer import quantized_tensors

    prefix, _, leaf = name.rpartition(".")
    ct = "compressed-tensors"
    if prefix.endswith(".mlp.experts") and leaf in ("gate_up_proj", "down_proj"):
        out: dict[str, torch.Tensor] = {}
        for e in range(t.shape[0]):
            base = f"{prefix}.{e}"
            if leaf == "gate_up_proj":
                rows = t.shape[1] // 2
                out.update(quantized_tensors(f"{base}.gate_proj", t[e, :rows], ct))
                out.update(quantized_tensors(f"{base}.up_proj", t[e, rows:], ct))
            else:
                out.update(quantized_tensors(f"{base}.down_proj", t[e], ct))
        return {k: v.cpu() for k, v in out.items()}
    if ".self_attn." in prefix and leaf == "weight" and prefix.endswith("_proj"):
        return {k: v.cpu() for k, v in quantized_tensors(prefix, t, ct).items()}
    return {name: t.detach().to("cpu", copy=True).contiguous()}


def write_moe_checkpoint(model: torch.nn.Module, out: Path) -> dict[str, Any]:
    """Write ``model`` as an NVFP4 (compressed-tensors, W4A16) checkpoint, shard by shard; made once."""
    from nvfp4_fix.writer import ct_quantization_config

    out = Path(out)
    if (out / "DONE").is_file():
        return {"path": str(out), "bytes": 0, "seconds": 0.0, "reused": True}
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pairs = ((k, v) for name, t in model.state_dict().items() for k, v in _nvfp4_tensors(name, t).items())
    total = write_shards(tmp, pairs)
    model.config.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    ignore = ["lm_head", *[f"model.layers.{i}.mlp.gate" for i in range(model.config.num_hidden_layers)]]
    cfg["quantization_config"] = ct_quantization_config(ignore, False)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return {"path": str(out), "bytes": total, "seconds": time.perf_counter() - t0, "reused": False}
