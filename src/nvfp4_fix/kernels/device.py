"""Where and how a kernel launches.

Triton launches its kernels on the current CUDA device and stream: a kernel whose tensors live on
another device (a model split across GPUs, or one moved to cuda:1) would run on the wrong GPU, racing
the work of the right one. Every launch site enters ``on_device_of(tensor)`` first.

Programmatic dependent launch (``settings.pdl``, sm_90+): a kernel launched so may start while the
kernel before it on the stream finishes; it must execute ``griddepcontrol.wait`` (Triton:
``tl.extra.cuda.gdc_wait``) before it touches memory that earlier kernels write or read, and lets the
next kernel launch (``launch_dependents``) only after that wait.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from .. import settings

#: First compute capability with programmatic dependent launch (``griddepcontrol``)
PDL_MIN_CC = (9, 0)


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make t's CUDA device current for the block (a no-op when it already is, or for CPU tensors)."""
    if t.is_cuda and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@functools.cache
def _pdl_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= PDL_MIN_CC


def pdl_for(device_index: int) -> bool:
    """Whether kernels on this CUDA device launch as programmatic dependent launches."""
    return settings.current().pdl and _pdl_capable(device_index)


def triton_pdl(t: torch.Tensor) -> dict[str, bool]:
    """Launch arguments for a Triton kernel with a ``PDL: tl.constexpr`` parameter (which, when true,
    starts with ``gdc_wait(); gdc_launch_dependents()``) for work on ``t``'s device."""
    if t.is_cuda and pdl_for(t.device.index if t.device.index is not None else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}
