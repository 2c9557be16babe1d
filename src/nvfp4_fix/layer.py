"""The packed NVFP4 linear layer: one module class for compressed-tensors and ModelOpt checkpoints.

Parameters keep the checkpoint's own names, dtypes and shapes, so ``state_dict()`` and
``save_pretrained`` write back exactly what was loaded:

====================  ===========================  ===========================
                      compressed-tensors           ModelOpt
====================  ===========================  ===========================
codes uint8 [N, K/2]  ``weight_packed``            ``weight``
e4m3 [N, K/16]        ``weight_scale``             ``weight_scale``
per-tensor float32    ``weight_global_scale`` (÷)  ``weight_scale_2`` (×)
activation (W4A4)     ``input_global_scale`` (÷)   ``input_scale`` (×)
AWQ                   -                            ``pre_quant_scale`` [K]
====================  ===========================  ===========================
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import settings
from .checkpoint import COMPRESSED_TENSORS, MODELOPT
from .codec import BLOCK, FP4_MAX, FP8_MAX, dequantize, e2m1_table, round_to_e2m1_codes
from .kernels import act_quant, nvfp4_linear

#: Set by ``enable_low_memory_mode()``: no layer may hold a dequantized copy of its weight.
LOW_MEMORY = False

#: "quantize" reproduces the producer's activation fake-quantization (W4A4 checkpoints);
#: "bf16" feeds activations unquantized (faster; what vLLM's Marlin path does before Blackwell).
ACTIVATION_MODES = ("quantize", "bf16")


def fake_quantize_activations(x: torch.Tensor, global_divisor: torch.Tensor) -> torch.Tensor:
    """NVFP4 quantize-dequantize of activations per 16-element group along the last dim, as
    compressed-tensors' forward and vLLM's emulation do: scale = e4m3(global * amax / 6)."""
    shape = x.shape
    if shape[-1] % BLOCK:
        raise ValueError(f"activation width {shape[-1]} is not a multiple of {BLOCK}")
    g = global_divisor.to(torch.float32)
    groups = x.reshape(*shape[:-1], shape[-1] // BLOCK, BLOCK)
    # amax / 6 is rounded to the activation dtype before the global scale, as compressed-tensors does:
    # near an e4m3 rounding boundary that double rounding decides the scale of the whole group.
    local = groups.abs().amax(dim=-1, keepdim=True) / FP4_MAX  # in x.dtype, as compressed-tensors
    scale = (g * local.to(torch.float32)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(torch.float8_e4m3fn).eps), scale)
    step = scale / g
    codes = round_to_e2m1_codes((groups.to(torch.float32) / step).clamp(-FP4_MAX, FP4_MAX))
    q = e2m1_table(x.device)[codes.long()]
    return (q * step).to(x.dtype).reshape(shape)


def quantize_activations(x: torch.Tensor, global_divisor: torch.Tensor) -> torch.Tensor:
    """``fake_quantize_activations`` in one fused kernel where it runs (CUDA with Triton; the same
    bits), else the torch ops. ``settings.kernel == "reference"`` forces the torch ops."""
    if x.is_cuda and act_quant.supports(x) and settings.current().kernel != "reference":
        return act_quant.fake_quantize(x, global_divisor)
    return fake_quantize_activations(x, global_divisor)


class StraightThrough(torch.autograd.Function):
    """W4A4 training: the forward fake-quantizes the activations (the same bits as inference), the
    backward passes the gradient through unchanged (straight-through estimator: d fq(x)/dx := 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return quantize_activations(x, divisor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad, None


class NVFP4Linear(nn.Module):
    """y = x @ W.T + b with W held packed (4.5 bits a weight) and computed through one dispatch."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        layout: str = COMPRESSED_TENSORS,
        input_scale: bool = False,
        pre_quant_scale: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % BLOCK:
            raise ValueError(f"in_features {in_features} is not a multiple of the NVFP4 block size {BLOCK}")
        if layout not in (COMPRESSED_TENSORS, MODELOPT):
            raise ValueError(f"layout must be {COMPRESSED_TENSORS!r} or {MODELOPT!r}, got {layout!r}")
        self.in_features, self.out_features, self.layout = in_features, out_features, layout
        self.activation_mode = "quantize"
        # The model's dtype: float32 activations on CUDA (peft's prepare_model_for_kbit_training upcasts
        # the norms and embeddings) are computed in it, as bitsandbytes does with its compute_dtype.
        self.compute_dtype = dtype
        self.dense_weight: torch.Tensor | None = None  # only when dequantized once on purpose
        self._mul: torch.Tensor | None = None
        self._mul_key: tuple[object, ...] | None = None
        self._fused = None  # a fusion.FusedGroup once fused with its siblings (q/k/v, gate/up)
        self._fused_index = 0  # this layer's place in the group

        def param(shape: tuple[int, ...], dt: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dt, device=device), requires_grad=False)

        ct = layout == COMPRESSED_TENSORS
        self._packed_name = "weight_packed" if ct else "weight"
        self._global_name = "weight_global_scale" if ct else "weight_scale_2"
        self._input_name = ("input_global_scale" if ct else "input_scale") if input_scale else None
        # Registered directly: ``weight_packed`` is also a class property (for the ModelOpt layout).
        self._parameters[self._packed_name] = param((out_features, in_features // 2), torch.uint8)
        self.weight_scale = param((out_features, in_features // BLOCK), torch.float8_e4m3fn)
        self._parameters[self._global_name] = param((1,) if ct else (), torch.float32)
        if self._input_name:
            self._parameters[self._input_name] = param((1,) if ct else (), torch.float32)
        self.pre_quant_scale = param((in_features,), dtype) if pre_quant_scale else None
        self.bias = param((out_features,), dtype) if bias else None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001
        # model.half() / .to(dtype) would cast the e4m3 block scales and the float32 global scales
        # (float8 counts as floating point): keep their format, move devices only.
        fixed = {
            n: p.data
            for n, p in self._parameters.items()
            if p is not None and n not in ("bias", "pre_quant_scale")
        }
        super()._apply(fn, recurse)
        with contextlib.suppress(Exception):  # follows .float() / .to(dtype); a device move keeps it
            self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        for name, old in fixed.items():
            p = self._parameters[name]
            if p.dtype != old.dtype:
                self._parameters[name] = nn.Parameter(old.to(p.device), requires_grad=False)
        self._mul, self._mul_key = None, None
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super()._load_from_state_dict(*args, **kwargs)
        self._mul, self._mul_key = None, None
        if self._fused is not None:
            self._fused._mul_key = None  # its per-row multipliers are recomputed on the next eager call

    @property
    def weight_packed(self) -> torch.Tensor:
        """The uint8 codes [N, K/2], whatever the checkpoint called them."""
        return self._parameters[self._packed_name]

    @property
    def weight_mul(self) -> torch.Tensor:
        """The per-tensor factor in the multiplier convention: a float32 scalar on the weights' device,
        computed once per value of the global scale (one launch less per forward)."""
        g = self._parameters[self._global_name]
        if torch.compiler.is_compiling():
            # torch.compile: data_ptr()/version checks graph-break; take the value an eager call
            # cached (a compiled step is always preceded by an eager prefill), else compute inline
            # (one small kernel more per layer).
            if self._mul is not None and self._mul_key is not None:
                return self._mul
            g32 = g.to(torch.float32)
            return (1.0 / g32 if self.layout == COMPRESSED_TENSORS else g32).reshape(())
        key = (g.device, g.data_ptr(), g._version)
        if self._mul_key != key:
            g32 = g.detach().to(torch.float32)
            self._mul = (1.0 / g32 if self.layout == COMPRESSED_TENSORS else g32).reshape(())
            self._mul_key = key
        return self._mul

    @property
    def input_divisor(self) -> torch.Tensor | None:
        """The activation global scale in compressed-tensors' divisor convention, or None (W4A16)."""
        if self._input_name is None:
            return None
        s = self._parameters[self._input_name].to(torch.float32)
        return s if self.layout == COMPRESSED_TENSORS else 1.0 / s

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight_packed, self.weight_scale, self.weight_mul, "multiplier", dtype)

    def keep_dense_copy(self, dtype: torch.dtype | None) -> None:
        """Dequantize once and compute with the dense copy (fast on CPU, at dense memory), or drop it
        (``None``). The packed tensors stay, so ``state_dict()`` is unchanged either way."""
        if dtype is not None and LOW_MEMORY:
            raise RuntimeError("low-memory mode is on: layers keep no dequantized copy")
        self.dense_weight = None if dtype is None else self.dequantized_weight(dtype)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """AWQ pre-scale and, for W4A4 in "quantize" mode, the activation fake-quantization."""
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        divisor = self.input_divisor
        if divisor is not None and self.activation_mode == "quantize":
            if torch.is_grad_enabled() and x.requires_grad:
                x = StraightThrough.apply(x, divisor)
            else:
                x = quantize_activations(x, divisor)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == torch.float32 and self.compute_dtype != torch.float32:
            # float32 GEMMs run an order of magnitude slower than half-precision ones on a GPU
            return self._alone(x.to(self.compute_dtype)).to(x.dtype)
        if self._fused is not None:
            if torch.compiler.is_compiling():
                y = self._fused.traced_output(self, x)
            else:
                y = self._fused.output(self, x)
            if y is not None:
                return y
        return self._alone(x)

    def _alone(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_input(x)
        if self.dense_weight is not None:
            return nn.functional.linear(x, self.dense_weight.to(x.dtype), self.bias)
        return nvfp4_linear(x, self.weight_packed, self.weight_scale, self.weight_mul, self.bias)

    def extra_repr(self) -> str:
        mode = f", activations={self.activation_mode}" if self._input_name else ""
        awq = ", awq" if self.pre_quant_scale is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, layout={self.layout}{mode}{awq}"
        )


from . import lora_hook  # noqa: E402  (peft learns the packed layer once both are imported)

lora_hook.arm()
