"""The output layer (lm_head) held as NVFP4 (opt-in, lossy): quantized at load time from the
checkpoint's dense lm_head.

Producers leave the lm_head in 16 bits; for a large vocabulary it is the biggest single read of a
decode step (Llama-3-8B: 128256 x 4096, 1.05 GB in bf16 against ~0.30 GB packed). Quantization is
the standard NVFP4 recipe of :mod:`nvfp4_fix.codec` (per-tensor divisor 6*448/amax, e4m3 scale per
16 values, nearest E2M1) and the layer is the packed :class:`~nvfp4_fix.layer.NVFP4Linear` every
quantized linear uses, so the logits differ from the checkpoint's by the NVFP4 rounding of the
lm_head.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .checkpoint import COMPRESSED_TENSORS
from .codec import BLOCK
from .embedding import dequantize_rows, quantize_rows_into
from .layer import NVFP4Linear

logger = logging.getLogger("nvfp4_fix")


class NVFP4LMHead(NVFP4Linear):
    """An :class:`NVFP4Linear` (compressed-tensors layout) made from a dense lm_head at load time.

    ``state_dict()`` never holds the packed tensors under the checkpoint's names, which would describe
    a layer the checkpoint's quantization config leaves dense:

    * untied: it holds the dequantized ``weight`` (on the CPU, in the dense lm_head's dtype) and logs
      a warning that it is not the checkpoint's original; ``load_state_dict`` quantizes a dense
      ``weight`` again;
    * tied to the input embedding (``tie_word_embeddings``): it holds nothing, as a tied lm_head
      never does: the embedding keeps the checkpoint's dense table, which is what gets saved.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        tied: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias, COMPRESSED_TENSORS, dtype=dtype, device=device)
        self.tied = tied

    @classmethod
    def from_linear(cls, linear: nn.Linear, tied: bool = False) -> NVFP4LMHead:
        """Quantize ``linear``'s weight onto its device (the dense weight is left untouched)."""
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device, tied)
        m.quantize_(w)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Fill the packed codes and scales from a dense ``weight`` [out, in] (chunk by chunk)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            expected = [self.out_features, self.in_features]
            raise ValueError(f"lm_head weight of shape {list(weight.shape)}; expected {expected}")
        if not weight.is_floating_point():
            raise ValueError(f"lm_head weight must be a float tensor, got {weight.dtype}")
        divisor = quantize_rows_into(weight, self.weight_packed, self.weight_scale, "divisor")
        self.weight_global_scale.copy_(divisor)
        self._mul, self._mul_key = None, None

    def dequantized_weight(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        return dequantize_rows(self.weight_packed, self.weight_scale, self.weight_mul, dtype, device)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if self.tied:
            return
        logger.warning(
            "nvfp4-fix: %sweight was quantized to NVFP4 at load (quantize_lm_head=True); the state dict "
            "holds it dequantized, which differs from the checkpoint's original by NVFP4 rounding",
            prefix,
        )
        destination[prefix + "weight"] = self.dequantized_weight(self.compute_dtype, "cpu")
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            if not self.tied:
                missing_keys.append(key)
            return
        try:
            self.quantize_(state_dict[key])
        except ValueError as e:
            error_msgs.append(f"{key}: {e}")
        if self.bias is not None and prefix + "bias" in state_dict:
            self.bias.data.copy_(state_dict[prefix + "bias"])

    def extra_repr(self) -> str:
        return super().extra_repr() + ", quantized at load" + (", tied" if self.tied else "")


def quantize_output_layer(model: nn.Module, requested: bool) -> bool:
    """Replace a loaded model's dense lm_head by an :class:`NVFP4LMHead` (lossy), or say why not.

    An lm_head tied to the input embedding is quantized into a packed copy of its own: the embedding
    keeps the dense table (it is tied, so ``quantize_embeddings`` leaves it dense), which also keeps
    ``save_pretrained`` writing the checkpoint's original table."""
    if not requested:
        return False
    try:
        head = model.get_output_embeddings()
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        head = emb = None
    name = next((n for n, m in model.named_modules() if m is head), "") if head is not None else ""
    weight = getattr(head, "weight", None)
    if head is None:
        why = f"{type(model).__name__} has no output layer (get_output_embeddings() is None)"
    elif type(head) is not nn.Linear or not isinstance(weight, torch.Tensor):
        why = f"{name} is a {type(head).__name__}, not a dense nn.Linear"
    elif head.in_features % BLOCK:
        why = f"its input width {head.in_features} is not a multiple of {BLOCK}"
    elif weight.device.type == "meta":
        why = f"{name}.weight is offloaded (on the meta device)"
    else:
        tied = emb is not None and getattr(emb, "weight", None) is weight
        new = NVFP4LMHead.from_linear(head, tied)
        hook = getattr(head, "_hf_hook", None)
        if hook is not None:  # device_map across devices: accelerate moves the input to the head's device
            from accelerate.hooks import add_hook_to_module

            add_hook_to_module(new, hook)
        from .swap import set_module

        set_module(model, name, new)
        return True
    logger.warning("nvfp4-fix: lm_head not quantized: %s", why)
    return False


__all__ = ["NVFP4LMHead", "quantize_output_layer"]
