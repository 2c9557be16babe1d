"""A bare venv that sees this environment's packages through a plain-path .pth (so none of this
environment's own .pth files, e.g. an installed start-up hook, run in it): for tests of the persistent
start-up hook in fresh processes."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import _nvfp4_fix_startup


def bridge_venv(root: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = Path(subprocess.check_output(
        [str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        text=True).strip())  # fmt: skip
    hook_dir = Path(_nvfp4_fix_startup.__file__).parent
    (site / "00_bridge.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n{hook_dir}\n")
    return root
