"""Capture a step in a CUDA graph the way the tests need it: run once on a side stream first (Triton
and NVRTC compile there, never inside the capture), then capture one call."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def captured(step: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """(graph, the captured call's output): ``graph.replay()`` refills that output in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
