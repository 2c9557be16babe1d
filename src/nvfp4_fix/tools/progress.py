"""Progress bars for slow steps: tqdm when installed, else a small one; silent unless stderr is a TTY."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

#: Set by ``--quiet``; bars are also off whenever stderr is not a terminal.
QUIET = False
#: Bars appear only once a step has run this long (seconds).
DELAY = 1.0


def enabled() -> bool:
    return not QUIET and sys.stderr is not None and sys.stderr.isatty()


class _Bar:
    """A minimal stand-in for tqdm: one line on stderr, redrawn at most 10 times a second."""

    def __init__(self, total: int | None, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n, self.start, self.last, self.shown = 0, time.monotonic(), 0.0, False

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self.start >= DELAY and now - self.last >= 0.1:
            self._draw(now)

    def _draw(self, now: float) -> None:
        self.last, self.shown = now, True
        rate = self.n / max(now - self.start, 1e-9)
        if self.total:
            filled = int(20 * self.n / self.total)
            text = f"{self.desc}: [{'#' * filled}{'.' * (20 - filled)}] {self.n}/{self.total}"
        else:
            text = f"{self.desc}: {self.n}"
        sys.stderr.write(f"\r{text} {self.unit} ({rate:.1f}/s)\x1b[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            self._draw(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Null:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str, unit: str = "it") -> Any:
    """An object with ``update(n)`` and ``close()``."""
    if not enabled():
        return _Null()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Bar(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, delay=DELAY, file=sys.stderr, leave=False)


def track(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Iterate ``items`` with a progress bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    b = bar(total, desc, unit)
    try:
        for item in items:
            yield item
            b.update(1)
    finally:
        b.close()


@contextlib.contextmanager
def transformers_bars() -> Iterator[None]:
    """transformers draws its own loading bars ("Loading weights"); they follow this module's switch:
    off under ``--quiet`` or when stderr is not a terminal, as ours are."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled() else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
