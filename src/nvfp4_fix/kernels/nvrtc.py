"""Compile CUDA C with NVRTC at run time and launch it on torch's current stream.

NVRTC ships with every CUDA build of torch (the ``nvidia-cuda-nvrtc`` wheel), so no CUDA toolkit
is needed. The sources compiled here include no headers. ``settings.nvrtc_library`` (env
``NVFP4_FIX_NVRTC``) names a libnvrtc to try first.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import sys

import torch

from .. import settings


class CudaError(RuntimeError):
    pass


def _candidates(first: str | None) -> list[str]:
    names = [first] if first else []
    for base in sys.path:  # the nvidia-cuda-nvrtc wheel (cu12: nvidia/cuda_nvrtc/lib, cu13: nvidia/cu13/lib)
        names += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libnvrtc.so*")), reverse=True)
    return names + ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]


def nvrtc() -> ctypes.CDLL:
    return _load_nvrtc(settings.current().nvrtc_library)


@functools.cache
def _load_nvrtc(first: str | None) -> ctypes.CDLL:
    for name in _candidates(first):
        if "builtins" in name or ".alt." in name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        # libnvrtc opens its builtins library by name; a wheel's copy sits beside it, off the
        # loader's path unless a CUDA torch has loaded it: load it first, globally
        here = os.path.dirname(name)
        for builtins in sorted(glob.glob(os.path.join(here, "libnvrtc-builtins.so*"))) if here else ():
            if ".alt." not in builtins:
                with contextlib.suppress(OSError):
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        return lib
    raise CudaError("libnvrtc not found (install torch with CUDA, or set NVFP4_FIX_NVRTC to a libnvrtc path)")


@functools.cache
def libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


def _check_nvrtc(lib: ctypes.CDLL, res: int, what: str) -> None:
    if res:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise CudaError(f"NVRTC {what}: {lib.nvrtcGetErrorString(res).decode()}")


def compile_cubin(source: str, arch: str, options: tuple[str, ...] = ()) -> bytes:
    """CUDA C source -> cubin for ``arch`` (e.g. "sm_90"). Needs no GPU."""
    return compile_with_log(source, arch, options)[0]


def compile_with_log(source: str, arch: str, options: tuple[str, ...] = ()) -> tuple[bytes, str]:
    """The cubin and NVRTC's log (with ``--ptxas-options=-v`` in ``options``: registers and spills)."""
    lib = nvrtc()
    prog = ctypes.c_void_p()
    _check_nvrtc(
        lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"nvfp4.cu", 0, None, None), "create"
    )
    opts = [f"--gpu-architecture={arch}", "--std=c++17", *options]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    try:
        res = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if res:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise CudaError(f"NVRTC compile failed for {arch}:\n{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        _check_nvrtc(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        buf = ctypes.create_string_buffer(size.value)
        _check_nvrtc(lib, lib.nvrtcGetCUBIN(prog, buf), "cubin")
        return buf.raw, log.value.decode(errors="replace")
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _check_cu(res: int, what: str) -> None:
    if res:
        msg = ctypes.c_char_p()
        libcuda().cuGetErrorString(res, ctypes.byref(msg))
        raise CudaError(f"CUDA {what}: {msg.value.decode() if msg.value else res}")


#: CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_MAX_DYNAMIC_SHARED = 8


class Kernel:
    """A function of a loaded cubin; ``launch`` takes ints (as C int), ``ctypes.c_int64`` (as long long),
    tensors and None (as pointers). ``shared_bytes``: the dynamic shared memory of every launch."""

    def __init__(self, cubin: bytes, name: str, device: torch.device, shared_bytes: int = 0) -> None:
        with torch.cuda.device(device):
            torch.cuda.current_stream(device)  # makes torch's primary context current on this thread
            self._module = ctypes.c_void_p()
            self._image = ctypes.create_string_buffer(cubin)
            _check_cu(libcuda().cuModuleLoadData(ctypes.byref(self._module), self._image), "module load")
            self._fn = ctypes.c_void_p()
            _check_cu(
                libcuda().cuModuleGetFunction(ctypes.byref(self._fn), self._module, name.encode()), name
            )
            if shared_bytes:  # the opt-in above 48 KiB counts static shared memory too: always set
                _check_cu(
                    libcuda().cuFuncSetAttribute(self._fn, _MAX_DYNAMIC_SHARED, shared_bytes), "shared memory"
                )
        self.shared_bytes = shared_bytes
        self.device = device
        self._launch = libcuda().cuLaunchKernel

    def launch(self, grid: tuple[int, int, int], block: tuple[int, int, int], *args: object) -> None:
        held = []
        for a in args:
            if isinstance(a, torch.Tensor):
                held.append(ctypes.c_uint64(a.data_ptr()))
            elif a is None:
                held.append(ctypes.c_uint64(0))
            elif isinstance(a, int):
                held.append(ctypes.c_int32(a))
            elif isinstance(a, ctypes.c_int64):  # a `long long` parameter
                held.append(a)
            else:
                raise TypeError(f"unsupported kernel argument {type(a).__name__}")
        params = (ctypes.c_void_p * len(held))(*map(ctypes.addressof, held))
        stream = torch.cuda.current_stream(self.device).cuda_stream
        # the driver launches in the current context: switch only when another device is current
        other = torch.cuda.current_device() != self.device.index
        with torch.cuda.device(self.device) if other else contextlib.nullcontext():
            res = self._launch(
                self._fn, *grid, *block, self.shared_bytes, ctypes.c_void_p(stream), params, None
            )
        if res:
            _check_cu(res, "launch")
