"""The package's own error type: every problem with user input surfaces as one of these."""

from __future__ import annotations


class NVFP4Error(Exception):
    """Base class: a one-line message naming the file, tensor and what was expected."""


class CheckpointError(NVFP4Error, ValueError):
    """A checkpoint folder, header, config or tensor is not what the format requires."""
