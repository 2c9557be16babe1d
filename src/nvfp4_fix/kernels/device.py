"""Triton launches its kernels on the current CUDA device and stream: a kernel whose tensors live on
another device (a model split across GPUs, or one moved to cuda:1) would run on the wrong GPU, racing
the work of the right one. Every launch site enters ``on_device_of(tensor)`` first."""

from __future__ import annotations

import contextlib

import torch


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's CUDA device current for the block (a no-op when it already is, or for CPU tensors)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
