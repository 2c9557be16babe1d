"""Shared by the LoRA tests: the packed model, its dense float32 twin holding the float64-dequantized
weights (AWQ pre-scale and W4A4 / FP8 activation fake-quantization by a pre-hook, the latter with a
straight-through gradient; FP8 layers of mixed checkpoints through tools.fp8_reference), identical
adapters, one step's gradients."""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from torch import nn

import nvfp4_fix
from nvfp4_fix.codec import dequantize
from nvfp4_fix.fp8 import FP8Linear
from nvfp4_fix.layer import NVFP4Linear, fake_quantize_activations
from nvfp4_fix.tools.fp8_reference import reference_act_quant, reference_weight

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def load(path: Path, dtype: torch.dtype = torch.float32, **kw) -> nn.Module:  # noqa: ANN003
    return nvfp4_fix.from_pretrained(path, dtype=dtype, **kw)


def _dense_fp8(mod: FP8Linear) -> nn.Linear:
    """A float32 nn.Linear with the float64 reference of an FP8 layer's weight, its activation
    quantization (tools.fp8_reference) by a straight-through pre-hook."""
    dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
    w64 = reference_weight(mod.weight, mod.weight_scale, mod.spec)
    dense.weight = nn.Parameter(w64.float(), requires_grad=False)
    if mod.bias is not None:
        dense.bias = nn.Parameter(mod.bias.detach().float(), requires_grad=False)
    if mod.activation_mode == "quantize" and mod.spec.activations != "none":
        s_in = None if mod.input_scale is None else float(mod.input_scale.reshape(-1)[0])

        def pre(_m: nn.Module, args: tuple) -> tuple:
            x = args[0]
            q = reference_act_quant(x.detach().double(), mod.spec, s_in, x.dtype).to(x.dtype)
            return (x + (q - x).detach(), *args[1:])

        dense.register_forward_pre_hook(pre)
    return dense


def densify(model: nn.Module) -> nn.Module:
    """Replace every NVFP4Linear (and FP8Linear) by a float32 nn.Linear with its float64-dequantized
    weight."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, FP8Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, _dense_fp8(mod))
            continue
        if not isinstance(mod, NVFP4Linear):
            continue
        dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        w64 = dequantize(mod.weight_packed, mod.weight_scale, mod.weight_mul, "multiplier", torch.float64)
        dense.weight = nn.Parameter(w64.to(torch.float32), requires_grad=False)
        if mod.bias is not None:
            dense.bias = nn.Parameter(mod.bias.detach().float(), requires_grad=False)
        pqs = None if mod.pre_quant_scale is None else mod.pre_quant_scale.detach().float()
        div = mod.input_divisor if mod.activation_mode == "quantize" else None

        def pre(_m: nn.Module, args: tuple, pqs=pqs, div=div) -> tuple:  # noqa: ANN001
            x = args[0]
            if pqs is not None:
                x = x * pqs
            if div is not None:  # straight-through: forward fake-quantized, gradient unchanged
                x = x + (fake_quantize_activations(x.detach(), div) - x).detach()
            return (x, *args[1:])

        dense.register_forward_pre_hook(pre)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, dense)
    return model


def lora_config(**kw) -> peft.LoraConfig:  # noqa: ANN003
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": KINDS, **kw})


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = torch.randn(p.shape, generator=g) * std
            values[n] = p.data.clone()
    return values


def adapted_pair(path: Path, **load_kw) -> tuple[nn.Module, nn.Module]:  # noqa: ANN003
    packed = peft.get_peft_model(load(path, **load_kw), lora_config())
    dense = peft.get_peft_model(densify(load(path, **load_kw)), lora_config())
    values = randomize_adapters(packed)
    missing = dense.load_state_dict(values, strict=False).unexpected_keys
    assert not missing and values, "the two models must carry the same adapters"
    return packed, dense


def step_grads(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    model(inputs_embeds=emb, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["inputs_embeds"] = emb.grad.clone()
    return grads


def batch(model: nn.Module, seed: int = 1, shape: tuple[int, int] = (2, 24)) -> torch.Tensor:
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
