"""The FP8 linear layer of mixed-precision checkpoints: e4m3 weights kept in 8 bits.

Parameters keep the checkpoint's own names, dtypes and shapes (compressed-tensors ``float-quantized``
and ModelOpt ``FP8`` use the same names), so ``state_dict()`` and ``save_pretrained`` write back
exactly what was read:

==================  ==============================================================================
``weight``          float8_e4m3fn [N, K]
``weight_scale``    float32 or bf16: [1] or [] (per tensor), [N, 1] or [N] (per channel),
                    [ceil(N/bn), ceil(K/bk)] (blocks of bn x bk; the last ones may be partial)
``input_scale``     one value, only for static FP8 activations
==================  ==============================================================================

W = float(weight) * weight_scale (broadcast per tensor, row or block). Compute is W8A16: the weight is
dequantized a chunk of rows at a time into the activation dtype and multiplied there. On the CPU the
chunk's dequantization is torch.compile'd into one pass, and one token (M = 1) runs a compiled GEMV
that decodes the e4m3 codes inside its loop in float32 (``NVFP4_FIX_CPU_COMPILE=0``: eager ops, same
math). On CUDA (``fp8_cuda.py``, ``kernels/triton_fp8.py``): M <= 128 runs the Triton W8A16 tl.dot
kernel, larger M a Triton dequantization into a bf16 scratch + cuBLAS (the torch chunks remain for
environments without Triton; under torch.compile these run as one custom op). Where the
checkpoint quantizes activations to FP8, ``activation_mode="quantize"`` (the default) reproduces it
as compressed-tensors' forward does (same dtypes, same order of operations); ``"bf16"`` skips it. On
sm_89+ the quantized activations run on FP8 tensor cores (``torch._scaled_mm``) where its scaling
reproduces the checkpoint's (``settings.fp8_scaled_mm``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from . import fp8_cuda, settings
from .classify import QuantizedModule
from .codec import FP8_MAX
from .schemes import FP8Spec

_TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

#: Rows dequantized at a time: bounds the scratch to ~CHUNK_ELEMENTS values whatever the layer size.
CHUNK_ELEMENTS = 1 << 22


def fp8_scale_rows(spec: FP8Spec, scale: torch.Tensor, r0: int, r1: int, k: int) -> torch.Tensor:
    """The float32 multiplier of weight rows [r0, r1), broadcastable to [r1 - r0, k]."""
    s = scale.to(torch.float32)
    if spec.weights == "tensor":
        return s.reshape(1, 1)
    if spec.weights == "channel":
        return s.reshape(-1, 1)[r0:r1]
    assert spec.block is not None
    bn, bk = spec.block
    rows = s[r0 // bn : (r1 - 1) // bn + 1].repeat_interleave(bn, dim=0)
    rows = rows[r0 - (r0 // bn) * bn :][: r1 - r0]
    return rows.repeat_interleave(bk, dim=1)[:, :k]


def dequantize_fp8(
    weight: torch.Tensor,
    scale: torch.Tensor,
    spec: FP8Spec,
    dtype: torch.dtype = torch.float32,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Dense rows ``rows`` (default: all) of an FP8 weight [N, K], computed in float32."""
    n, k = weight.shape
    r0, r1 = rows or (0, n)
    return (weight[r0:r1].to(torch.float32) * fp8_scale_rows(spec, scale, r0, r1, k)).to(dtype)


def _gemv_f32(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """float32 [1, N] = x [1, K] @ (e4m3 W * scale[rows, cols]).T, for torch.compile to fuse the decode
    into the reduction (no dense W is written)."""
    return (x.to(torch.float32) * (weight.to(torch.float32) * scale[rows][:, cols])).sum(-1).unsqueeze(0)


@functools.lru_cache(maxsize=1)
def _compiled_gemv():  # noqa: ANN202
    return torch.compile(_gemv_f32, dynamic=True)


def _rows_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """x @ W[rows].T with those rows dequantized (float32 product, rounded to x's dtype) on the way."""
    return nn.functional.linear(x, (weight.to(torch.float32) * scale[rows][:, cols]).to(x.dtype))


@functools.lru_cache(maxsize=1)
def _compiled_rows_linear():  # noqa: ANN202
    return torch.compile(_rows_linear, dynamic=True)


def fake_quantize_fp8(x: torch.Tensor, spec: FP8Spec, input_scale: torch.Tensor | None) -> torch.Tensor:
    """FP8 quantize-dequantize of activations as compressed-tensors' forward does it, in x's dtype:
    scale = amax / 448 (per tensor, token or group; 0 -> the dtype's eps) or the static input_scale;
    x' = e4m3(clamp(x / scale, +-448)) * scale."""
    mode = spec.activations
    if mode == "none":
        return x
    if mode == "static":
        if input_scale is None:
            raise ValueError("static FP8 activations need an input_scale")
        return _qdq(x, input_scale.to(x.dtype).reshape(()))
    if mode == "dynamic-group":
        g = spec.group_size or 0
        if g <= 0 or x.shape[-1] % g:
            raise ValueError(f"activation width {x.shape[-1]} is not a multiple of the FP8 group size {g}")
        groups = x.unflatten(-1, (x.shape[-1] // g, g))
        return _qdq(groups, _dynamic_scale(groups.abs().amax(dim=-1, keepdim=True))).flatten(-2)
    if mode == "dynamic-token":
        return _qdq(x, _dynamic_scale(x.abs().amax(dim=-1, keepdim=True)))
    return _qdq(x, _dynamic_scale(x.abs().amax()))


def _dynamic_scale(amax: torch.Tensor) -> torch.Tensor:
    scale = amax / FP8_MAX
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(scale.dtype).eps), scale)


def _qdq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.to(x.dtype) * scale


class StraightThrough(torch.autograd.Function):
    """Training through a layer with FP8 activations: the forward quantizes them as inference does, the
    backward passes the gradient unchanged (d fq(x)/dx := 1), as for NVFP4 activations
    (``layer.StraightThrough``); differentiating the quantizer's own ops would send gradient through
    the amax-derived scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: FP8Spec, input_scale: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        return fake_quantize_fp8(x, spec, input_scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        return grad, None, None


def linear_in_row_chunks(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    spec: FP8Spec,
    bias: torch.Tensor | None,
    rows: Callable[[torch.Tensor, int, int], torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """x @ W.T (+ bias) with W dequantized to x's dtype CHUNK_ELEMENTS at a time (torch ops, any device).
    ``rows(x, r0, r1)``, where given, computes output rows [r0, r1) first; None from it falls back to the
    torch ops for the rest."""
    n, k = weight.shape
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    if step >= n and rows is None:
        return nn.functional.linear(x, dequantize_fp8(weight, weight_scale, spec, x.dtype), bias)
    out = x.new_empty((*x.shape[:-1], n))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        y = rows(x, r0, r1) if rows is not None else None
        if y is None:
            rows = None
            y = nn.functional.linear(x, dequantize_fp8(weight, weight_scale, spec, x.dtype, (r0, r1)))
        out[..., r0:r1] = y if bias is None else y + bias[r0:r1].to(x.dtype)
    return out


class FP8Linear(nn.Module):
    """y = x @ W.T + b with W held as e4m3 codes and the checkpoint's scales."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: FP8Spec,
        *,
        bias: bool = False,
        scale_shape: tuple[int, ...] = (1,),
        scale_dtype: torch.dtype = torch.float32,
        input_scale_shape: tuple[int, ...] | None = None,
        input_scale_dtype: torch.dtype = torch.float32,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if (spec.activations == "static") != (input_scale_shape is not None):
            raise ValueError(
                f"{spec.describe()}: input_scale_shape must be given exactly for static activations"
            )
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.activation_mode = "quantize"
        self.dense_weight: torch.Tensor | None = None  # only when dequantized once on purpose

        def param(shape: tuple[int, ...], dt: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dt, device=device), requires_grad=False)

        self.weight = param((out_features, in_features), torch.float8_e4m3fn)
        self.weight_scale = param(scale_shape, scale_dtype)
        self.input_scale = (
            param(input_scale_shape, input_scale_dtype) if input_scale_shape is not None else None
        )
        self.bias = param((out_features,), dtype) if bias else None

    @classmethod
    def for_checkpoint(
        cls, q: QuantizedModule, bias: bool, dtype: torch.dtype, device: torch.device | str | None = "meta"
    ) -> FP8Linear:
        """The layer for one FP8 linear of a checkpoint, its scales in the checkpoint's shapes and dtypes."""
        if q.scheme != "fp8" or q.fp8 is None:
            raise ValueError(f"{q.prefix}: not an FP8 layer ({q.describe()})")
        return cls(
            q.in_features,
            q.out_features,
            q.fp8,
            bias=bias,
            scale_shape=q.scale_shape,
            scale_dtype=_TORCH_DTYPES[q.scale_dtype],
            input_scale_shape=q.input_scale_shape,
            input_scale_dtype=_TORCH_DTYPES[q.input_scale_dtype],
            dtype=dtype,
            device=device,
        )

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001
        # model.to(dtype) / .half() would cast the e4m3 weight and the scales: keep their format,
        # move devices only (as NVFP4Linear does).
        fixed = {n: p.data for n, p in self._parameters.items() if p is not None and n != "bias"}
        super()._apply(fn, recurse)
        for name, old in fixed.items():
            p = self._parameters[name]
            if p.dtype != old.dtype:
                self._parameters[name] = nn.Parameter(old.to(p.device), requires_grad=False)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.weight_scale, self.spec, dtype)

    def _scale_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale as [R, C] float32, row block of each row, column block of each column), cached."""
        s = self.weight_scale
        key = (s.device, s.data_ptr(), s._version)
        cached = self.__dict__.get("_index")
        if cached is not None and cached[0] == key:
            return cached[1]
        n, k, dev = self.out_features, self.in_features, s.device
        bn, bk = self.spec.block or (1, k)
        if self.spec.weights == "tensor":
            bn, bk = n, k
        elif self.spec.weights == "channel":
            bn, bk = 1, k
        scale = s.detach().to(torch.float32).reshape(-(-n // bn), -(-k // bk))
        index = (scale, torch.arange(n, device=dev) // bn, torch.arange(k, device=dev) // bk)
        self.__dict__["_index"] = (key, index)
        return index

    def _compile_pays(self) -> bool:
        """As for the packed NVFP4 layers: small layers run eagerly (settings.cpu_compile_min_weights)."""
        s = settings.current()
        return s.cpu_compile and self.weight.numel() >= s.cpu_compile_min_weights

    def _cpu_gemv(self, x: torch.Tensor) -> torch.Tensor | None:
        """One token on the CPU through the compiled GEMV, or None where it does not apply or fails."""
        if not (x.device.type == "cpu" and x.numel() == x.shape[-1] and self._compile_pays()):
            return None
        if torch.compiler.is_compiling():
            return None
        try:
            y = _compiled_gemv()(x.reshape(1, -1), self.weight, *self._scale_index())
        except Exception:  # no C++ compiler, unsupported platform: the chunked path is exact too
            return None
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def keep_dense_copy(self, dtype: torch.dtype | None) -> None:
        """Dequantize once and compute with the dense copy (fast on CPU, at dense memory), or drop it
        (``None``). The FP8 tensors stay, so ``state_dict()`` is unchanged either way."""
        from . import layer

        if dtype is not None and layer.LOW_MEMORY:
            raise RuntimeError("low-memory mode is on: layers keep no dequantized copy")
        self.dense_weight = None if dtype is None else self.dequantized_weight(dtype)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_mode == "quantize":
            if torch.is_grad_enabled() and x.requires_grad:
                return StraightThrough.apply(x, self.spec, self.input_scale)
            return fake_quantize_fp8(x, self.spec, self.input_scale)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_weight is None and x.is_cuda:
            return fp8_cuda.layer_forward(self, x)  # _scaled_mm, Triton W8A16, else the torch path
        x = self.prepare_input(x)
        if self.dense_weight is not None:
            return nn.functional.linear(x, self.dense_weight.to(x.dtype), self.bias)
        y = self._cpu_gemv(x)
        if y is not None:
            return y
        compiled = x.device.type == "cpu" and self._compile_pays() and not torch.compiler.is_compiling()
        rows = self._cpu_rows if compiled else None
        return linear_in_row_chunks(x, self.weight, self.weight_scale, self.spec, self.bias, rows)

    def _cpu_rows(self, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor | None:
        """Rows [r0, r1) of the output through the compiled dequantize-and-multiply, or None if it fails."""
        scale, rows, cols = self._scale_index()
        try:
            return _compiled_rows_linear()(x, self.weight[r0:r1], scale, rows[r0:r1], cols)
        except Exception:  # no C++ compiler, unsupported platform: the eager chunk is exact too
            return None

    def extra_repr(self) -> str:
        mode = f", activations={self.activation_mode}" if self.spec.activations != "none" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.spec.describe()}{mode}"
        )
