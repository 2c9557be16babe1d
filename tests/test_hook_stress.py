"""The persistent start-up hook under stress: 16 processes applying and removing it at once, processes
killed mid-apply, what it loads at start-up, `pip uninstall` with the hook left behind, read-only
site-packages. Its start-up time is measured by benchmarks/bench_startup.py, not asserted here (a
timed assertion fails on a loaded machine).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nvfp4_fix.compat import startup

VALID = {startup.pth_line(True), startup.pth_line(False)}

#: One worker: apply or remove the hook N times through the real CLI entry point, in-process.
WORKER = """
import random, sys
from nvfp4_fix.cli import main
site, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
for _ in range(n):
    cmd = rng.choice(["apply-patch", "apply-patch --no-packed-layers", "remove-patch"]).split()
    assert main([*cmd, "--site-packages", site, "--json"]) == 0
"""


def _pth_state(site: Path) -> str | None:
    try:
        return (site / startup.PTH_NAME).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _workers(site: Path, n: int, rounds: int) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(site), str(rounds), str(i)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for i in range(n)
    ]


def test_sixteen_processes_apply_and_remove_at_once(tmp_path: Path) -> None:
    """Readers racing the writers only ever see the .pth absent or complete; the end state is valid;
    no temporary file is left."""
    site = tmp_path / "site-packages"
    site.mkdir()
    procs = _workers(site, 16, 25)
    seen: dict[str, int] = {}
    while any(p.poll() is None for p in procs):
        text = _pth_state(site)
        key = "absent" if text is None else ("valid" if text in VALID else f"BAD {text!r}")
        seen[key] = seen.get(key, 0) + 1
    for p in procs:
        assert p.wait() == 0, p.stderr.read().decode()[-2000:] if p.stderr else ""
    print(f"\n16 writers x 25 apply/remove each; a racing reader saw {seen}")
    assert set(seen) <= {"absent", "valid"}, seen
    assert _pth_state(site) in VALID | {None}
    assert [p.name for p in site.iterdir()] in ([], [startup.PTH_NAME])


def test_processes_killed_mid_apply_leave_a_valid_or_no_hook(tmp_path: Path) -> None:
    """SIGKILL at random moments: the .pth is never truncated; a left-over temporary file is dot-
    prefixed and not a .pth, so site.py never runs it."""
    site = tmp_path / "site-packages"
    site.mkdir()
    procs = _workers(site, 8, 10_000)
    time.sleep(1.0)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        time.sleep(0.02)
    for p in procs:
        p.wait()
    assert _pth_state(site) in VALID | {None}
    for p in site.iterdir():
        assert p.name == startup.PTH_NAME or (p.name.startswith(".") and not p.name.endswith(".pth")), p.name
    assert startup.status(site)["problem"] in (None, "not installed")


def _purelib(py: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(subprocess.check_output([py, "-c", code], text=True).strip())


def _run(*cmd: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """nvfp4-fix built as a wheel (no network: setuptools from this environment)."""
    out = tmp_path_factory.mktemp("wheel")
    skip = shutil.ignore_patterns(".*", "fixture-envs", "tests", "build", "*.egg-info", "benchmarks")
    src = shutil.copytree(Path(__file__).parents[1], out / "src", ignore=skip)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    _run(*pip, "-w", out, src, check=True)
    return next(out.glob("nvfp4_fix-*.whl"))


def _venv_with(wheel: Path, root: Path) -> tuple[Path, Path, list[str]]:
    """A throwaway venv (no pip of its own) with only nvfp4-fix installed, by this environment's pip."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    py = root / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(py), "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "--no-deps", "--no-index", str(wheel)], check=True)
    return py, _purelib(py), pip


def test_hook_loads_nothing_at_start_up(tmp_path: Path, wheel: Path) -> None:
    """In a venv where nvfp4-fix is installed as users install it, with the hook applied, a plain
    interpreter start imports nothing of ours (or torch / transformers): the hook's cost is one .pth
    line and a tiny finder (timed in benchmarks/bench_startup.py)."""
    py, site, _ = _venv_with(wheel, tmp_path / "venv")
    startup.install(site)
    assert (site / startup.PTH_NAME).read_text() in VALID  # the hook is there, armed
    prefixes = ("torch", "transformers", "compressed", "nvfp4", "_nvfp4")
    code = f"import sys; print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))"
    r = _run(py, "-c", code, check=True)
    assert r.stdout.strip() == "[]" and r.stderr == ""  # the .pth line imports nothing of ours
    r = _run(py, "-X", "importtime", "-c", "pass", check=True)
    assert not [line for line in r.stderr.splitlines() if "nvfp4" in line], r.stderr


def test_pip_uninstall_with_the_hook_left_behind_is_silent(tmp_path: Path, wheel: Path) -> None:
    """Install into a throwaway venv, apply-patch, pip uninstall: the .pth stays (pip does not know
    it), and every later interpreter start, and an import of compressed_tensors, stays silent."""
    py, site, pip = _venv_with(wheel, tmp_path / "throwaway")
    (site / "compressed_tensors.py").write_text("")  # a stand-in that triggers the hook on import
    applied = _run(py.parent / "nvfp4-fix", "apply-patch", "--no-packed-layers")
    assert applied.returncode == 0 and (site / startup.PTH_NAME).exists(), applied.stderr
    armed = _run(py, "-c", "import compressed_tensors, _nvfp4_fix_startup as h; print(h.ARMED)")
    assert armed.stdout.strip() == "{'packed_layers': False}", armed.stderr
    subprocess.run([*pip, "uninstall", "-y", "nvfp4-fix"], check=True)
    assert (site / startup.PTH_NAME).exists() and not (site / "_nvfp4_fix_startup.py").exists()
    for code in ("pass", "import compressed_tensors", "import site, sys; print(end='')"):
        r = _run(py, "-c", code)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), (code, r.stderr)


@contextlib.contextmanager
def read_only(site: Path) -> Iterator[None]:
    """``site`` read-only for this user: file modes, or, for root (who ignores them), a read-only
    bind mount where mounting is allowed."""
    if os.geteuid() != 0:
        site.chmod(0o555)
        try:
            yield
        finally:
            site.chmod(0o755)
        return
    r = _run("mount", "--bind", "-o", "ro", site, site)
    if r.returncode != 0:
        pytest.skip(f"root here cannot mount a read-only folder: {r.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(site)], check=True)


def test_read_only_site_packages_is_a_clear_message(tmp_path: Path) -> None:
    site = tmp_path / "site-packages"
    site.mkdir()
    startup.install(site)
    (site / startup.PTH_NAME).rename(site / "other.pth")
    cli = (sys.executable, "-m", "nvfp4_fix.cli")
    with read_only(site):
        if os.access(site, os.W_OK) and not _run("touch", site / "probe").returncode:
            pytest.skip("cannot make a folder read-only here")
        r = _run(*cli, "apply-patch", "--site-packages", site)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("nvfp4-fix: error: cannot write") and "writable" in r.stderr, r.stderr
        assert "Permission denied" in r.stderr or "Read-only file system" in r.stderr, r.stderr
        assert sorted(p.name for p in site.iterdir()) == ["other.pth"]
    startup.install(site)
    with read_only(site):
        r = _run(*cli, "remove-patch", "--site-packages", site)
        assert r.returncode == 2 and r.stderr.startswith("nvfp4-fix: error: cannot remove"), r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        assert _pth_state(site) in VALID
