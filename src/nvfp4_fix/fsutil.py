"""Writing outputs so that an interruption leaves either nothing or the old output, never a half."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import NVFP4Error


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` by rename.

    The temporary name is dot-prefixed (``.OUT.partial-*``), so a process killed mid-write leaves at
    most a hidden folder beside OUT, never a half-written OUT. An existing OUT is swapped out in one
    step where the OS can (Linux); elsewhere it is renamed to ``.OUT.old-PID`` first.
    """
    out = Path(out)
    if out.exists() and not force and any(out.iterdir()):
        raise NVFP4Error(f"{out}: output folder exists and is not empty (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            if f.is_file() and not f.is_symlink():
                os.chmod(f, 0o666 & ~umask)
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out.is_dir() and not out.is_symlink() and _exchange(tmp, out):
            return  # tmp now holds the old output: removed below
        old = None
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        elif old is not None:
            old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def carry_over(old: Path, new: Path, skip: re.Pattern[str]) -> list[str]:
    """Entries of ``old`` that ``new`` lacks and ``skip`` does not match, hard-linked (or copied)
    into ``new``: what a save into an existing folder leaves in place (tokenizer, README, sub-folders)."""
    kept = []
    for entry in sorted(Path(old).iterdir()):
        dst = new / entry.name
        if os.path.lexists(dst) or skip.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dst)
        kept.append(entry.name)
    return kept
