"""Tiny mixed-precision Llama checkpoints built here from random weights (NVFP4 MLP, FP8 attention),
in the compressed-tensors and ModelOpt layouts, for tests that need shapes or configs the producers'
fixtures do not cover. The FP8 and NVFP4 quantization below is written from the format description
(amax / 448 scales, e4m3 casts); the package's codec is only used for the NVFP4 codes."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nvfp4_fix import codec

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 96
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def llama_config() -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def fp8_weight_args(strategy: str, block: tuple[int, int] = (128, 128)) -> dict[str, Any]:
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "strategy": strategy,
        "dynamic": False,
        "group_size": None,
        "block_structure": list(block) if strategy == "block" else None,
    }


def fp8_act_args(kind: str, group_size: int = 16) -> dict[str, Any] | None:
    if kind == "none":
        return None
    strategy = {
        "static": "tensor",
        "dynamic-token": "token",
        "dynamic-group": "group",
        "dynamic-tensor": "tensor",
    }
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "strategy": strategy[kind],
        "dynamic": kind != "static",
        "group_size": group_size if kind == "dynamic-group" else None,
    }


NVFP4_GROUP = {
    "format": "nvfp4-pack-quantized",
    "targets": ["re:.*mlp\\..*_proj$"],
    "weights": {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "strategy": "tensor_group",
        "group_size": 16,
        "dynamic": False,
        "scale_dtype": "torch.float8_e4m3fn",
    },
    "input_activations": None,
}


def ct_mixed_config(strategy: str, acts: str, block: tuple[int, int] = (128, 128)) -> dict[str, Any]:
    return {
        "quant_method": "compressed-tensors",
        "format": "mixed-precision",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": copy.deepcopy(NVFP4_GROUP),
            "group_1": {
                "format": "float-quantized",
                "targets": ["re:.*self_attn\\..*_proj$"],
                "weights": fp8_weight_args(strategy, block),
                "input_activations": fp8_act_args(acts),
            },
        },
    }


def fp8_quantize(
    w: torch.Tensor, strategy: str, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale) with scale = amax / 448 per tensor, row or block."""
    w = w.float()
    n, k = w.shape
    if strategy == "tensor":
        scale = (w.abs().max() / 448).reshape(1)
        full = scale.expand(n, k)
    elif strategy == "channel":
        scale = w.abs().amax(dim=1, keepdim=True) / 448
        full = scale.expand(n, k)
    else:
        bn, bk = block
        rows, cols = math.ceil(n / bn), math.ceil(k / bk)
        padded = torch.zeros(rows * bn, cols * bk)
        padded[:n, :k] = w
        scale = padded.reshape(rows, bn, cols, bk).abs().amax(dim=(1, 3)) / 448
        full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    scale = scale.clamp(min=1e-12)
    q = (w / full.clamp(min=1e-12)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale.float()


def write_mixed(
    out: Path,
    layout: str = "ct",
    strategy: str = "channel",
    acts: str = "none",
    block: tuple[int, int] = (128, 128),
    seed: int = 0,
    extra: dict[str, torch.Tensor] | None = None,
    config_edit: Any = None,
) -> dict[str, torch.Tensor]:
    """Write a tiny mixed checkpoint; return the dense float32 weights it was made from."""
    g = torch.Generator().manual_seed(seed)
    cfg = llama_config()
    head_dim = HIDDEN // HEADS
    shapes = {
        "q_proj": (HEADS * head_dim, HIDDEN),
        "k_proj": (KV_HEADS * head_dim, HIDDEN),
        "v_proj": (KV_HEADS * head_dim, HIDDEN),
        "o_proj": (HIDDEN, HEADS * head_dim),
        "gate_proj": (INTER, HIDDEN),
        "up_proj": (INTER, HIDDEN),
        "down_proj": (HIDDEN, INTER),
    }
    tensors: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    tensors["model.embed_tokens.weight"] = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.5).bfloat16()
    tensors["lm_head.weight"] = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.1).bfloat16()
    tensors["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    ct = layout == "ct"
    quantized_layers: dict[str, Any] = {}
    for i in range(LAYERS):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        for proj, shape in shapes.items():
            kind = "self_attn" if proj in ATTN else "mlp"
            p = f"model.layers.{i}.{kind}.{proj}"
            w = torch.randn(*shape, generator=g) * 0.1
            dense[p] = w
            if kind == "mlp":
                packed, bscale, gscale = codec.quantize(w, "divisor" if ct else "multiplier")
                tensors[p + (".weight_packed" if ct else ".weight")] = packed
                tensors[p + ".weight_scale"] = bscale
                tensors[p + (".weight_global_scale" if ct else ".weight_scale_2")] = gscale
                quantized_layers[p] = {"quant_algo": "W4A16_NVFP4", "group_size": 16}
            else:
                q, scale = fp8_quantize(w, strategy, block)
                tensors[p + ".weight"] = q
                tensors[p + ".weight_scale"] = scale if ct else scale.reshape(())
                if acts == "static":
                    tensors[p + ".input_scale"] = torch.tensor([0.02]) if ct else torch.tensor(0.02)
                quantized_layers[p] = {"quant_algo": "FP8"}
    tensors.update(extra or {})
    out.mkdir(parents=True, exist_ok=True)
    if ct:
        cfg["quantization_config"] = ct_mixed_config(strategy, acts, block)
    else:
        hq = {
            "producer": {"name": "modelopt", "version": "0.47.0"},
            "quantization": {
                "quant_algo": "MIXED_PRECISION",
                "kv_cache_quant_algo": None,
                "exclude_modules": ["lm_head"],
                "quantized_layers": quantized_layers,
            },
        }
        if config_edit is not None:
            config_edit(hq)
        (out / "hf_quant_config.json").write_text(json.dumps(hq, indent=1))
    if config_edit is not None and ct:
        config_edit(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return dense
