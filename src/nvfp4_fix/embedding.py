"""The input embedding table held as NVFP4 (opt-in, lossy): quantized at load time, rows dequantized on
lookup.

Producers leave ``embed_tokens`` in bf16; for a large vocabulary it is a big share of a packed model
(Llama-3-8B: 0.98 GiB of 5.63). Held as NVFP4 it takes 4.5 bits a value. Quantization uses the
standard NVFP4 recipe of :mod:`nvfp4_fix.codec` (per-tensor multiplier amax/(6*448), e4m3 scale per
16 values, nearest E2M1), so the table differs from the checkpoint's by the usual NVFP4 error.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .codec import BLOCK, FP4_MAX, FP8_MAX, dequantize, quantize

#: Values (de)quantized at once (512 rows of a 4096-wide table): codec.quantize's scratch is ~50 bytes
#: a value, so a load needs ~100 MiB beyond the packed table, never the table in float32.
CHUNK_ELEMENTS = 1 << 21


@torch.no_grad()
def quantize_rows_into(
    weight: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, convention: str
) -> torch.Tensor:
    """codec.quantize of a dense [R, D] table (on any device) into ``packed`` [R, D/2] and ``scale``
    [R, D/16] (on their device), ``CHUNK_ELEMENTS`` values at a time, with the per-tensor scale of the
    whole table (amax / (6 * 448) as a multiplier, its inverse as a divisor), which is returned."""
    dev = packed.device
    chunks = weight.split(max(1, CHUNK_ELEMENTS // weight.shape[1]))
    amax = torch.zeros((), dtype=torch.float32, device=dev)
    for c in chunks:
        if c.numel():
            amax = torch.maximum(amax, c.to(dev).abs().amax().to(torch.float32))
    if not torch.isfinite(amax):
        raise ValueError("the table holds inf or NaN: it cannot be quantized")
    amax = amax.clamp(min=1e-12)  # codec.quantize's conventions
    g = amax / (FP8_MAX * FP4_MAX) if convention == "multiplier" else (FP8_MAX * FP4_MAX / amax).reshape(1)
    start = 0
    for c in chunks:
        p, s, _ = quantize(c.to(dev), convention, g)
        packed[start : start + len(c)] = p
        scale[start : start + len(c)] = s
        start += len(c)
    return g


def dequantize_rows(
    packed: torch.Tensor,
    scale: torch.Tensor,
    mul: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The dense [R, D] table of ``packed`` / ``scale`` / multiplier ``mul`` in ``dtype`` on ``device``
    (default: the codes'), made ``CHUNK_ELEMENTS`` values at a time."""
    rows, half = packed.shape
    out = torch.empty((rows, 2 * half), dtype=dtype, device=device or packed.device)
    step = max(1, CHUNK_ELEMENTS // (2 * half))
    for s in range(0, rows, step):
        out[s : s + step] = dequantize(packed[s : s + step], scale[s : s + step], mul, "multiplier", dtype)
    return out


class NVFP4Embedding(nn.Module):
    """``nn.Embedding`` lookup over a table held as NVFP4: ``weight_packed`` uint8 [V, D/2] (two E2M1
    codes a byte), ``weight_scale`` e4m3 [V, D/16], ``weight_scale_2`` float32 scalar multiplier, so
    ``table = e2m1 * weight_scale * weight_scale_2``. ``forward`` gathers the rows of the given ids and
    dequantizes only those, in ``output_dtype``: device tensors only (no host sync, CUDA-graph safe).

    ``state_dict()`` holds the dequantized table as ``weight`` (on the CPU, in ``output_dtype``), so
    ``save_pretrained`` writes a plain checkpoint; ``load_state_dict`` quantizes a dense ``weight``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if embedding_dim % BLOCK:
            raise ValueError(f"embedding_dim {embedding_dim} is not a multiple of the block size {BLOCK}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.output_dtype = padding_idx, dtype
        v, d = num_embeddings, embedding_dim
        for name, shape, dt in (
            ("weight_packed", (v, d // 2), torch.uint8),
            ("weight_scale", (v, d // BLOCK), torch.float8_e4m3fn),
            ("weight_scale_2", (), torch.float32),
        ):  # not persistent: state_dict() holds the dense ``weight`` instead
            init = torch.ones if dt == torch.float32 else torch.empty
            self.register_buffer(name, init(shape, dtype=dt, device=device), persistent=False)

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        padding_idx: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> NVFP4Embedding:
        """Quantize a dense table [V, D] (on any device, e.g. a checkpoint tensor on the CPU) onto
        ``device`` (default: the table's)."""
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"a table must be a 2-D float tensor, got {weight.dtype} {list(weight.shape)}")
        device = device if device is not None else weight.device
        m = cls(*weight.shape, padding_idx, dtype or weight.dtype, device)
        m.quantize_(weight)
        return m

    def quantize_(self, weight: torch.Tensor) -> None:
        """Fill the table from ``weight`` [V, D], ``CHUNK_ELEMENTS`` values at a time: only the packed
        tensors and one chunk's scratch ever exist on this module's device."""
        if tuple(weight.shape) != (self.num_embeddings, self.embedding_dim):
            expected = [self.num_embeddings, self.embedding_dim]
            raise ValueError(f"table of shape {list(weight.shape)}; expected {expected}")
        mul = quantize_rows_into(weight, self.weight_packed, self.weight_scale, "multiplier")
        self.weight_scale_2.copy_(mul)

    def dequantized_weight(
        self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """The whole table [V, D] (default: ``output_dtype``, this module's device), made chunk by chunk."""
        mul = self.weight_scale_2
        return dequantize_rows(self.weight_packed, self.weight_scale, mul, dtype or self.output_dtype, device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        flat = input_ids.reshape(-1)
        scales = self.weight_scale.view(torch.uint8)[flat].view(torch.float8_e4m3fn)
        mul = self.weight_scale_2
        rows = dequantize(self.weight_packed[flat], scales, mul, "multiplier", self.output_dtype)
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    def _apply(self, fn: Any, recurse: bool = True) -> NVFP4Embedding:
        # model.half() / .to(dtype) would cast the e4m3 scales and the float32 multiplier (float8 counts
        # as floating point): keep the format, move devices only, and output the new dtype instead.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self.output_dtype = new.dtype
                self._buffers[name] = old.to(new.device)
        return self

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dequantized_weight(device="cpu")

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
            missing_keys.append(key)
            return
        try:
            self.quantize_(state_dict[key])
        except ValueError as e:
            error_msgs.append(f"{key}: {e}")

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, nvfp4, output_dtype={self.output_dtype}"


def quantize_input_embedding(model: nn.Module, requested: bool | None) -> bool:
    """Replace a loaded model's input embedding table by an :class:`NVFP4Embedding` (lossy), or say
    why not. ``requested=None`` follows low-memory mode. A table shared with the lm_head stays dense:
    the output layer needs it whole."""
    from . import layer

    if not (layer.LOW_MEMORY if requested is None else requested):
        return False
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    name = next((n for n, m in model.named_modules() if m is emb), "")
    if not isinstance(emb, nn.Embedding):
        why = f"{type(model).__name__} has no nn.Embedding input embedding"
    elif _tied_to_output(model, emb):
        why = f"{name}.weight is tied to the output layer (tie_word_embeddings), which needs it dense"
    elif type(emb) is not nn.Embedding or emb.max_norm is not None:
        why = f"{type(emb).__name__} is not a plain nn.Embedding"
    elif emb.embedding_dim % BLOCK:
        why = f"its width {emb.embedding_dim} is not a multiple of {BLOCK}"
    else:
        new = NVFP4Embedding.from_dense(
            emb.weight.detach(), emb.padding_idx, emb.weight.dtype, emb.weight.device
        )
        from .swap import set_module

        set_module(model, name, new)
        return True
    log = logging.getLogger("nvfp4_fix")
    (log.warning if requested else log.info)("nvfp4-fix: input embedding not quantized: %s", why)
    return False


def _tied_to_output(model: nn.Module, emb: nn.Module) -> bool:
    out = model.get_output_embeddings()
    return out is not None and getattr(out, "weight", None) is emb.weight
