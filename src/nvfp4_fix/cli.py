"""The ``nvfp4-fix`` command line.

Every subcommand is a module under ``nvfp4_fix.commands`` with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; adding one is a line in ``CORE`` here or in ``commands.COMMANDS``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
from collections.abc import Sequence

from . import commands

#: subcommand name -> module in nvfp4_fix.commands (the patch switches; the tools are in commands.COMMANDS).
CORE: dict[str, str] = {
    "apply-patch": "apply_patch",
    "remove-patch": "remove_patch",
    "check": "check",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvfp4-fix", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in CORE.items():
        mod = importlib.import_module(f".commands.{module}", __package__)
        p = sub.add_parser(
            name, help=mod.HELP, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        mod.add_arguments(p)
        p.set_defaults(func=functools.partial(commands.run_command, mod.run))
    commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
