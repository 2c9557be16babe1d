"""Remove the persistent start-up hook (nvfp4_fix_startup.pth) from this environment's site-packages.
Processes already running keep their fixes until they exit."""

from __future__ import annotations

import argparse
import json

HELP = "remove the persistent start-up hook"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site-packages", metavar="DIR", help="remove it from here instead of this environment")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from ..compat import startup

    removed = startup.remove(args.site_packages)
    path = startup.pth_path(args.site_packages)
    if args.json:
        print(json.dumps({"path": str(path), "removed": removed}, indent=2))
    else:
        print(f"removed {path}" if removed else f"not installed: no {path}")
    return 0
