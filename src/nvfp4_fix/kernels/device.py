"""What the launchers need to know about a CUDA device, asked once per device.

Triton launches its kernels on the current CUDA device and stream: a kernel whose tensors live on
another device (a model split across GPUs, or one moved to cuda:1) would run on the wrong GPU, racing
the work of the right one. Every launch site enters ``on_device_of(tensor)`` first."""

from __future__ import annotations

import contextlib
import functools

import torch


def device_index(device: torch.device) -> int:
    """The index of CUDA ``device``; the current device for a bare ``cuda``."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index``."""
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def arrival_counters(device: torch.device, kernel: str, size: int) -> torch.Tensor:
    """``size`` int32 arrival counters of one kernel on ``device``, zero between calls: the kernel's last
    program to arrive resets its own. One set per (device, kernel): calls on one device run in stream
    order."""
    return torch.zeros(size, dtype=torch.int32, device=device)


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's CUDA device current for the block (a no-op when it already is, or for CPU tensors)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
