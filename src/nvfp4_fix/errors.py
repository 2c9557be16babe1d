"""The package's own error type: every problem with user input surfaces as one of these."""

from __future__ import annotations

#: Characters str.splitlines() breaks on, shown escaped so a message stays one line.
_BREAKS = (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)
_LINE_BREAKS = {c: repr(chr(c))[1:-1] for c in _BREAKS}


class NVFP4Error(Exception):
    """Base class: a one-line message naming the file, tensor and what was expected.

    Line breaks in the message (e.g. from a tensor name or file name in untrusted input) are escaped.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (args[0].strip().translate(_LINE_BREAKS),)
        super().__init__(*args)


class CheckpointError(NVFP4Error, ValueError):
    """A checkpoint folder, header, config or tensor is not what the format requires."""
