"""nvfp4-fix's switches, read from the environment once and held in one typed, frozen object.

Every field has an environment variable (``NVFP4_FIX_<FIELD>``, see ``ENV_NAMES``) that sets it for the
whole process; the variables are read on the first ``current()`` call and never again, so nothing on a
hot path touches ``os.environ``. Tests and benchmarks change settings with ``override``::

    from nvfp4_fix import settings
    with settings.override(kernel="reference", fuse=False):
        ...

``NVFP4_FIX_DISABLE`` (the start-up hook's off switch) is not here: the hook must not import this
package. ``TRITON_INTERPRET`` belongs to Triton.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Literal, get_args

KernelName = Literal[
    "auto",
    "reference",
    "cuda_mma",
    "cuda_tile",
    "triton_gemv",
    "triton_mm",
    "dequant_mm",
    "cpu_gemv",
    "chunked",
    "blackwell_fp4",
    "humming",
]
KERNEL_NAMES: tuple[str, ...] = get_args(KernelName)

__all__ = ["Settings", "KernelName", "KERNEL_NAMES", "ENV_NAMES", "current", "override", "from_environ"]


@dataclasses.dataclass(frozen=True)
class Settings:
    #: NVFP4 GEMM kernel; "auto" picks per call shape (kernels/__init__.py).
    kernel: KernelName = "auto"
    #: Fuse q/k/v and gate/up siblings into one launch on CUDA at load.
    fuse: bool = True
    #: Smallest M sent to dequantize-into-scratch + cuBLAS instead of the tl.dot GEMM.
    dequant_mm_min_m: int = 256
    #: Largest bf16 scratch (MiB) the dequantize + cuBLAS path fills at once.
    scratch_mb: int = 256
    #: float32 rows (MiB) the CPU chunked path dequantizes at once.
    cpu_chunk_mb: int = 16
    #: torch.compile the CPU GEMV and dequantization (eager when off; same math).
    cpu_compile: bool = True
    #: Smallest layer (weights) the CPU compiles for: smaller ones run eagerly, since compiling costs
    #: seconds per process and per new input shape and wins nothing there (bench_cpu_compile.py).
    cpu_compile_min_weights: int = 1 << 22
    #: The NVRTC-compiled tensor-core decode kernel for small M on sm_80+.
    cuda_mma: bool = True
    #: The NVRTC-compiled tiled tensor-core kernel (kernels/cuda_tile.py) for wide layers at
    #: 17-48 token rows on the H100, where it was measured faster than cuda_mma and the tl.dot GEMM.
    cuda_tile: bool = True
    #: MoE decode experts on tensor cores (kernels/cuda_moe.py) where they support the call; off: the
    #: Triton decode kernels (kernels/moe_decode.py). On: 23 against 37 us a layer for Qwen3-30B-A3B's
    #: experts on an H100 (benchmarks/RESULTS-moe.md).
    cuda_moe: bool = True
    #: Path of a libnvrtc to load first; None searches the CUDA wheels and the loader path.
    nvrtc_library: str | None = None
    #: fast generation: the Triton split-KV decode attention (SDPA when off).
    decode_attention: bool = True
    #: fast generation: one-launch K/V append into the static cache (transformers' ops when off).
    kv_append: bool = True
    #: fast generation: softmax top-k MoE routers (Qwen3-MoE, Mixtral, OLMoE, ...) in one launch
    #: (generation/router.py; transformers' softmax + torch.topk when off).
    moe_router: bool = True
    #: MoE experts above decode sizes: sort the routed pairs by expert in one Triton program
    #: (kernels/moe_route.route) instead of ~35 torch ops: 115.0 against 174.9 us an experts call at 16
    #: tokens, 178.0 against 287.9 at 64 (H100, benchmarks/RESULTS-moe-humming.md, session 16).
    moe_route_kernel: bool = True
    #: Let "auto" run Humming (optional humming-kernels) where the table in kernels/table.py says it is
    #: faster. Off by default: it keeps a second, Humming-layout copy of each weight it runs.
    humming: bool = False
    #: FP8 layers whose checkpoint quantizes activations: run the quantized activations on FP8 tensor
    #: cores (torch._scaled_mm, sm_89+) where its scaling reproduces the checkpoint's (fp8_cuda.py);
    #: off: the emulation (fake-quantize, then W8A16).
    fp8_scaled_mm: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(f.name, getattr(self, f.name), f"field {f.name!r}")


ENV_NAMES: dict[str, str] = {
    "kernel": "NVFP4_FIX_KERNEL",
    "fuse": "NVFP4_FIX_FUSE",
    "dequant_mm_min_m": "NVFP4_FIX_DEQUANT_MM_MIN_M",
    "scratch_mb": "NVFP4_FIX_SCRATCH_MB",
    "cpu_chunk_mb": "NVFP4_FIX_CPU_CHUNK_MB",
    "cpu_compile": "NVFP4_FIX_CPU_COMPILE",
    "cpu_compile_min_weights": "NVFP4_FIX_CPU_COMPILE_MIN_WEIGHTS",
    "cuda_mma": "NVFP4_FIX_CUDA_MMA",
    "cuda_tile": "NVFP4_FIX_CUDA_TILE",
    "cuda_moe": "NVFP4_FIX_CUDA_MOE",
    "nvrtc_library": "NVFP4_FIX_NVRTC",
    "decode_attention": "NVFP4_FIX_DECODE_ATTENTION",
    "kv_append": "NVFP4_FIX_KV_APPEND",
    "moe_router": "NVFP4_FIX_MOE_ROUTER",
    "moe_route_kernel": "NVFP4_FIX_MOE_ROUTE_KERNEL",
    "humming": "NVFP4_FIX_HUMMING",
    "fp8_scaled_mm": "NVFP4_FIX_FP8_SCALED_MM",
}

_BOOL_FIELDS = (
    "fuse",
    "cpu_compile",
    "cuda_mma",
    "cuda_tile",
    "cuda_moe",
    "decode_attention",
    "kv_append",
    "moe_router",
    "moe_route_kernel",
    "humming",
    "fp8_scaled_mm",
)
_POSITIVE_INT_FIELDS = ("dequant_mm_min_m", "scratch_mb", "cpu_chunk_mb", "cpu_compile_min_weights")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _check(name: str, value: object, where: str) -> None:
    if name == "kernel":
        if value not in KERNEL_NAMES:
            names = ", ".join(KERNEL_NAMES)
            raise ValueError(f"{where}: unknown NVFP4 kernel {value!r}; choose one of {names}")
    elif name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected a bool, got {value!r}")
    elif name in _POSITIVE_INT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: expected a positive integer, got {value!r}")
    elif name == "nvrtc_library":
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{where}: expected a library path or None, got {value!r}")


def _parse(name: str, text: str, var: str) -> object:
    if name in _BOOL_FIELDS:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"environment variable {var}={text!r}: expected one of {', '.join(_TRUE + _FALSE)}")
    if name in _POSITIVE_INT_FIELDS:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"environment variable {var}={text!r}: expected a positive integer") from None
        _check(name, value, f"environment variable {var}")
        return value
    value = text.strip()
    _check(name, value, f"environment variable {var}")
    return value


def from_environ(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default ``os.environ``); unset or empty variables keep the defaults.
    A value that does not parse raises ValueError naming the variable and what it accepts."""
    env = os.environ if environ is None else environ
    values = {}
    for name, var in ENV_NAMES.items():
        text = env.get(var, "")
        if text.strip():
            values[name] = _parse(name, text, var)
    return Settings(**values)


_lock = threading.Lock()
_current: Settings | None = None


def current() -> Settings:
    """The settings in force: the environment's (read on the first call) unless ``override`` is active."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                _current = from_environ()
    return _current


@contextlib.contextmanager
def override(**fields: object) -> Iterator[Settings]:
    """Replace some fields for the duration of the block (validated like the environment); the
    previous settings come back on exit, also on an exception. Process-wide, not per thread."""
    global _current
    unknown = sorted(set(fields) - set(ENV_NAMES))
    if unknown:
        raise TypeError(f"unknown nvfp4-fix setting(s) {unknown}; fields are {sorted(ENV_NAMES)}")
    before = current()
    new = dataclasses.replace(before, **fields)  # type: ignore[arg-type]
    _current = new
    try:
        yield new
    finally:
        _current = before
