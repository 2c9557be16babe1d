"""Helpers for the tools tests: tiny real checkpoints, and huge sparse ones (headers with correct offsets,
data regions that are holes in the file: a 70B-shaped checkpoint costs a few MB of disk)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

CT, MO = "compressed-tensors", "modelopt"

LLAMA_70B = {"layers": 80, "hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "vocab": 128256}
DTYPE_BYTES = {"U8": 1, "F8_E4M3": 1, "F32": 4, "BF16": 2}


def llama_config(
    layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int
) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def nvfp4_tensors(
    layout: str,
    w4a4: bool,
    layers: int,
    hidden: int,
    intermediate: int,
    heads: int,
    kv_heads: int,
    vocab: int,
) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, shape) of every tensor of a Llama-shaped NVFP4 checkpoint, in file order."""
    head_dim = hidden // heads
    out: list[tuple[str, str, list[int]]] = [("model.embed_tokens.weight", "BF16", [vocab, hidden])]
    projs = {
        "self_attn.q_proj": (heads * head_dim, hidden),
        "self_attn.k_proj": (kv_heads * head_dim, hidden),
        "self_attn.v_proj": (kv_heads * head_dim, hidden),
        "self_attn.o_proj": (hidden, heads * head_dim),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
    ct = layout == CT
    scalar = [1] if ct else []
    for i in range(layers):
        for proj, (n, k) in projs.items():
            p = f"model.layers.{i}.{proj}"
            out.append((f"{p}.weight_packed" if ct else f"{p}.weight", "U8", [n, k // 2]))
            out.append((f"{p}.weight_scale", "F8_E4M3", [n, k // 16]))
            out.append((f"{p}.weight_global_scale" if ct else f"{p}.weight_scale_2", "F32", scalar))
            if w4a4:
                out.append((f"{p}.input_global_scale" if ct else f"{p}.input_scale", "F32", scalar))
        out.append((f"model.layers.{i}.input_layernorm.weight", "BF16", [hidden]))
        out.append((f"model.layers.{i}.post_attention_layernorm.weight", "BF16", [hidden]))
    out.append(("model.norm.weight", "BF16", [hidden]))
    out.append(("lm_head.weight", "BF16", [vocab, hidden]))
    return out


def write_sparse_shard(path: Path, tensors: list[tuple[str, str, list[int]]]) -> int:
    """A valid safetensors file whose data region is never written (a hole): returns its apparent size."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def write_sparse_checkpoint(
    folder: Path, layout: str = CT, w4a4: bool = False, shard_bytes: int = 5 * 10**9, **shape: int
) -> Path:
    """A Llama-shaped NVFP4 checkpoint (default Llama-3-70B) with sparse shards and a real index."""
    from nvfp4_fix.writer import ct_quantization_config, modelopt_quant_config

    dims = {**LLAMA_70B, **shape}
    folder.mkdir(parents=True, exist_ok=True)
    tensors = nvfp4_tensors(layout, w4a4, **dims)
    shards: list[list[tuple[str, str, list[int]]]] = [[]]
    size = 0
    for t in tensors:
        n = DTYPE_BYTES[t[1]]
        for d in t[2]:
            n *= d
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_sparse_shard(folder / fname, shard)
        weight_map.update({name: fname for name, _, _ in shard})
    for _, dtype, shp in tensors:
        n = DTYPE_BYTES[dtype]
        for d in shp:
            n *= d
        total += n
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config = llama_config(**dims)
    if layout == CT:
        config["quantization_config"] = ct_quantization_config(["lm_head"], w4a4)
    else:
        (folder / "hf_quant_config.json").write_text(json.dumps(modelopt_quant_config(["lm_head"], w4a4)))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def tiny_model(
    seed: int = 0, hidden: int = 64, intermediate: int = 128, layers: int = 2, vocab: int = 256
) -> Any:
    """A random bf16 LlamaForCausalLM small enough for the tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():  # a larger spread than the default init, so layers are not near zero
            if p.dim() == 2:
                p.normal_(0.0, 0.05)
    return model


def write_tokenizer(folder: Path, vocab: int = 256) -> None:
    """A word-level tokenizer (built locally with the tokenizers library) plus a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
    fast.save_pretrained(str(folder))
