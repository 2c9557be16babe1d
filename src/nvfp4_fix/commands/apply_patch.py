"""Install the persistent start-up hook: a one-line nvfp4_fix_startup.pth in this environment's
site-packages. From then on every Python process of the environment applies nvfp4-fix's fixes (and,
unless --no-packed-layers, its packed-layer routing) as soon as it imports compressed_tensors.
Nothing else is imported at start-up. Undo with `nvfp4-fix remove-patch`; NVFP4_FIX_DISABLE=1 turns
it off for one process."""

from __future__ import annotations

import argparse
import json

HELP = "make the fixes persistent for this environment (writes nvfp4_fix_startup.pth)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--site-packages", metavar="DIR", help="install here instead of this environment's purelib"
    )
    p.add_argument(
        "--no-packed-layers",
        action="store_true",
        help="only the compressed-tensors fixes, no routing to nvfp4-fix's packed layers",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from ..compat import startup

    path = startup.install(args.site_packages, packed_layers=not args.no_packed_layers)
    state = startup.status(args.site_packages)
    if args.json:
        print(json.dumps({"installed": str(path), **state}, indent=2))
    else:
        print(f"installed {path}")
        print("new Python processes of this environment apply the fixes when they import compressed_tensors")
        if state["problem"]:
            print(f"warning: {state['problem']}")
    return 0
