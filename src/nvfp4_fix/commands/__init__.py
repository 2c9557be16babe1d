"""Checkpoint tools as ``nvfp4-fix`` subcommands: inspect, verify, dequantize, convert, generate, bench,
model-card.

``nvfp4_fix.cli`` plugs them in with one call on its subparsers object::

    from .commands import register
    register(subparsers)          # each sets args.func(args) -> exit code

Each module in this package has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int`` and
imports nothing heavy at module level. ``run_command`` turns every NVFP4Error (and OSError) into
``nvfp4-fix: error: <one line>`` and exit code 2. ``python -m nvfp4_fix.commands`` runs them without cli.py.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import NVFP4Error

#: subcommand name -> module in this package.
COMMANDS: dict[str, str] = {
    "inspect": "inspect",
    "verify": "verify",
    "dequantize": "dequantize",
    "convert": "convert",
    "generate": "generate",
    "bench": "bench",
    "model-card": "model_card",
}


#: Commands that read configs and safetensors headers only: an id whose weights are not downloaded is
#: described from its headers, never downloaded.
HEADERS_ONLY = ("inspect", "model-card")


def _resolve_path(args: argparse.Namespace) -> None:
    """``args.path`` (a folder or a hub id) becomes a local folder; ``args.tensors`` the tensor table
    read from the hub's headers when a headers-only command meets an id whose weights are not here."""
    from ..hub import has_weights, local_folder, looks_like_repo_id, remote_tensor_index

    name = args.path
    headers_only = args.command in HEADERS_ONLY and not getattr(args, "scan", False)
    folder = local_folder(name, args.revision, weights=not headers_only)
    args.tensors = None
    if headers_only and looks_like_repo_id(name) and not os.path.isdir(name) and not has_weights(folder):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            cache = constants.HF_HUB_CACHE
            raise NVFP4Error(f"{name}: its weights are not in the cache {cache} (HF_HUB_OFFLINE is set)")
        args.tensors = remote_tensor_index(name, folder, args.revision)
    args.path = str(folder)


def error(message: str) -> int:
    print(f"nvfp4-fix: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand: bad input gives one line on stderr and exit code 2, never a traceback."""
    from ..tools import progress

    progress.QUIET = bool(getattr(args, "quiet", False))
    try:
        if getattr(args, "path", None) is not None:
            _resolve_path(args)
        return func(args)
    except NVFP4Error as e:
        return error(str(e))
    except BrokenPipeError:  # e.g. `nvfp4-fix inspect PATH | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        return error(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        print("nvfp4-fix: interrupted", file=sys.stderr)
        return 130


def register(subparsers: Any) -> None:
    """Add every subcommand of this package to an argparse subparsers object."""
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f".{module}", __name__)
        p = subparsers.add_parser(
            name, help=mod.HELP, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        mod.add_arguments(p)
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        p.add_argument("--revision", help="hub revision (branch, tag or commit) when PATH is an org/model id")
        p.set_defaults(func=functools.partial(run_command, mod.run), command=name)


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point with only these subcommands (cli.main is the full one)."""
    parser = argparse.ArgumentParser(prog="nvfp4-fix")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    return int(args.func(args))
