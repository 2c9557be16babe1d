"""A random-weight Llama-3-8B-shaped model and its checkpoints (bf16 and NVFP4), made on the GPU.

Shared by bench_generation.py and bench_memory.py. Weights are N(0, 0.02) (norms 1), drawn on the
device with a fixed seed, so every run and both scripts get the same model. The NVFP4 checkpoint is
written layer by layer: each linear is quantized on the GPU with ``nvfp4_fix.writer.quantized_tensors``
(``codec.quantize``), only the packed result is copied to the CPU, and shards of ~2 GB go to disk as
they fill, so the bf16 model never exists on the CPU. Layout: compressed-tensors ``nvfp4-pack-quantized``
(W4A16), lm_head kept in bf16 as llmcompressor does.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

SHARD_BYTES = 2 << 30


def llama8b_config(layers: int = 32, tiny: bool = False) -> Any:
    from transformers import LlamaConfig

    if tiny:  # for a CPU smoke test of the scripts
        cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                          max_position_embeddings=8192, tie_word_embeddings=False)  # fmt: skip
    else:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                          num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                          head_dim=128,
                          max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                          tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM"]
    if "dtype" in cfg.to_dict():
        cfg.dtype = torch.bfloat16
    else:
        cfg.torch_dtype = torch.bfloat16
    return cfg


def random_model(cfg: Any, device: str, seed: int = 0) -> torch.nn.Module:
    """The causal LM of ``cfg`` (Llama, Qwen3-MoE, ...) in bf16 built directly on ``device`` with
    N(0, 0.02) weights (norms 1)."""
    from transformers import AutoModelForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to(torch.bfloat16).eval()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)
    return model


def _flush(shard: dict[str, torch.Tensor], folder: Path, index: int, weight_map: dict[str, str]) -> None:
    from safetensors.torch import save_file

    name = f"model-{index:05d}.safetensors"
    save_file(shard, str(folder / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, name))
    shard.clear()


def write_shards(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Write (name, tensor) pairs into ``folder`` as safetensors shards of about SHARD_BYTES, each on
    disk as soon as it fills, named model-XXXXX-of-YYYYY, plus the index; returns the total bytes."""
    shard: dict[str, torch.Tensor] = {}
    size, index, total = 0, 0, 0
    weight_map: dict[str, str] = {}
    with torch.no_grad():
        for k, v in tensors:
            nbytes = v.numel() * v.element_size()
            if shard and size + nbytes > SHARD_BYTES:
                index += 1
                _flush(shard, folder, index, weight_map)
                size = 0
            shard[k] = v
            size += nbytes
            total += nbytes
    if shard:
        index += 1
        _flush(shard, folder, index, weight_map)
    final = {}
    for i in range(1, index + 1):
        src, dst = f"model-{i:05d}.safetensors", f"model-{i:05d}-of-{index:05d}.safetensors"
        os.rename(folder / src, folder / dst)
        final[src] = dst
    weight_map = {k: final[v] for k, v in weight_map.items()}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return total


def write_checkpoint(model: torch.nn.Module, out: Path, quantized: bool) -> dict[str, Any]:
    """Write ``model`` as a bf16 or an NVFP4 (compressed-tensors) checkpoint, shard by shard."""
    from nvfp4_fix.writer import ct_quantization_config, quantized_tensors

    t0 = time.perf_counter()
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in model.state_dict().items():
            prefix, _, leaf = name.rpartition(".")
            if quantized and prefix in linears and leaf == "weight":
                parts = quantized_tensors(prefix, t, "compressed-tensors")
                yield from ((k, v.cpu()) for k, v in parts.items())
            else:
                yield name, t.detach().to("cpu", copy=True).contiguous()

    total = write_shards(tmp, tensors())
    model.config.save_pretrained(tmp)
    if quantized:
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = ct_quantization_config(["lm_head"], False)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return {"path": str(out), "bytes": total, "seconds": time.perf_counter() - t0}


def ensure_checkpoints(root: Path, kinds: tuple[str, ...], cfg: Any, device: str,
                       model: torch.nn.Module | None = None) -> dict[str, Path]:  # fmt: skip
    """``root/bf16`` and/or ``root/nvfp4``, made once (a DONE marker) from the seeded random model."""
    root = Path(root)
    paths = {k: root / k for k in kinds}
    missing = [k for k in kinds if not (paths[k] / "DONE").is_file()]
    if missing:
        own = model is None
        if own:
            model = random_model(cfg, device)
        for k in missing:
            info = write_checkpoint(model, paths[k], quantized=(k == "nvfp4"))
            gb, sec = info["bytes"] / 1e9, info["seconds"]
            print(f"wrote {k} checkpoint: {gb:.2f} GB in {sec:.1f} s -> {info['path']}", flush=True)
        if own:
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    return paths


def card_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "CPU (no CUDA device)"


def versions() -> str:
    import transformers

    try:
        import triton

        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "none"
    return f"torch {torch.__version__}, transformers {transformers.__version__}, triton {tv}"
