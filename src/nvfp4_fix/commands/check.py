"""Report the installed torch / transformers / compressed-tensors, the known bugs those releases have,
and whether nvfp4-fix's fixes are active in this process (it imports compressed_tensors, so a
persistent hook gets the chance to apply them) and persistently (nvfp4_fix_startup.pth present and
valid). Exit code 1 when a fix the installed releases need is not active; 0 otherwise."""

from __future__ import annotations

import argparse
import json
from typing import Any

HELP = "which known NVFP4 bugs this environment has and whether the fixes are active"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site-packages", metavar="DIR", help="look for the start-up hook here")
    p.add_argument(
        "--no-import",
        action="store_true",
        help="do not import compressed_tensors (faster; in-process state then unknown)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def build(site_packages: str | None = None, do_import: bool = True) -> dict[str, Any]:
    import platform

    from ..compat import compressed_tensors as ct
    from ..compat import startup

    vers = ct.versions()
    if do_import and vers[ct.PACKAGE] is not None:
        import compressed_tensors  # noqa: F401  (fires the start-up hook, if one is armed)
    fixes = ct.status()
    missing = [f.name for f in fixes if f.needed and not f.applied]
    persistent = startup.status(site_packages)
    return {
        "python": platform.python_version(),
        "versions": {**vers, "nvfp4-fix": ct.installed_version("nvfp4-fix")},
        "known_bugs": [
            {
                "key": b.key,
                "package": b.package,
                "summary": b.summary,
                "symptom": b.symptom,
                "fixed_by": b.fixed_by,
                "fix": b.fix,
            }
            for b in ct.bugs_for(vers)
        ],
        "fixes": [f.as_dict() for f in fixes],
        "in_process": not missing,
        "persistent": persistent,
        "missing": missing,
        "ok": not missing,
    }


def _text(rep: dict[str, Any]) -> str:
    v = rep["versions"]
    lines = [f"python {rep['python']}, " + ", ".join(f"{k} {v[k] or 'not installed'}" for k in v)]
    bugs = rep["known_bugs"]
    lines.append(f"known bugs in these releases: {len(bugs) or 'none'}")
    lines += [f"  - {b['key']}: {b['symptom']}\n      fix: {b['fixed_by']}" for b in bugs]
    lines.append("fixes:")
    lines += [f"  {f['name']:<26} {f['reason']}" for f in rep["fixes"]]
    p = rep["persistent"]
    state = "installed and valid" if p["valid"] else p["problem"]
    lines.append(
        f"persistent hook {p['path']}: {state}"
        + (" (disabled by NVFP4_FIX_DISABLE)" if p["disabled_by_env"] else "")
    )
    if rep["missing"]:
        lines.append(
            f"MISSING: {', '.join(rep['missing'])}: run `nvfp4-fix apply-patch`, or call "
            "nvfp4_fix.apply_patch() before loading"
        )
    else:
        lines.append("OK: every fix these releases need is active")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rep = build(args.site_packages, do_import=not args.no_import)
    print(json.dumps(rep, indent=2) if args.json else _text(rep))
    return 0 if rep["ok"] else 1
