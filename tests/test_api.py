"""The public names resolve, and importing the package alone loads no torch (the start-up hook
imports it lazily)."""

import subprocess
import sys

import nvfp4_fix


def test_every_public_name_resolves() -> None:
    for name in nvfp4_fix.__all__:
        assert getattr(nvfp4_fix, name) is not None, name


def test_import_is_light() -> None:
    code = "import nvfp4_fix, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
