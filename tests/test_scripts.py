"""The repository's shell scripts parse (a stray line in a device script's comment header stops the whole
call before its first step), and apply_mma_sweep's least-worst choice over several M picks what it says."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for d in ("scripts", "benchmarks", ".ci") for p in (ROOT / d).glob("*.sh")) + [
    ROOT / ".ci/run"
]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _apply_mma_sweep():
    spec = importlib.util.spec_from_file_location("apply_mma_sweep", ROOT / "benchmarks/apply_mma_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(m, times, n=4096, k=4096, complete=True):
    variants = [
        ({"RT": 1, "DEPTH": 2, "XPRE": 1, "MINB": 2, "LOADONLY": 0, "WN": 1}, 4),
        ({"RT": 1, "DEPTH": 1, "XPRE": 0, "MINB": 3, "LOADONLY": 0, "WN": 1}, 8),
        ({"RT": 2, "DEPTH": 1, "XPRE": 0, "MINB": 2, "LOADONLY": 0, "WN": 1}, 8),
    ]
    runs = sorted(
        ((t, v, w) for t, (v, w) in zip(times, variants, strict=True) if t is not None), key=lambda r: r[0]
    )
    best_us, best, warps = runs[0]
    return dict(
        name="8B o", m=m, n=n, k=k, best_us=best_us, best=best, warps=warps, complete=complete, all=runs
    )


def test_least_worst_takes_the_variant_with_the_smallest_worst_ratio():
    """Variant 0 wins at M = 8 but is 1.20x best at M = 2; variant 1 is never best and at most 1.05x;
    variant 2 is best at M = 2 and 1.30x at M = 8. The least worst is variant 1."""
    sweep = [_entry(2, [12.0, 10.5, 10.0]), _entry(4, [10.4, 10.5, 10.2]), _entry(8, [10.0, 10.5, 13.0])]
    out = _apply_mma_sweep().least_worst(sweep, 8, [2, 4, 8])
    variant, warps, note = out[(8, 4096, 4096)]
    assert (variant["MINB"], variant["DEPTH"], warps) == (3, 1, 8)
    assert note.endswith("<= 1.05x best")


def test_least_worst_skips_shapes_not_swept_at_every_m():
    """A shape missing one M, or cut short by the budget there, gets no entry; a variant that did not run
    at one M is not a candidate."""
    module = _apply_mma_sweep()
    assert module.least_worst([_entry(2, [1.0, 2.0, 3.0]), _entry(8, [1.0, 2.0, 3.0])], 8, [2, 4, 8]) == {}
    cut = [_entry(2, [1.0, 2.0, 3.0]), _entry(4, [1.0, 2.0, 3.0], complete=False), _entry(8, [1.0, 2.0, 3.0])]
    assert module.least_worst(cut, 8, [2, 4, 8]) == {}
    partial = [_entry(2, [None, 2.0, 2.1]), _entry(4, [1.0, 2.0, 2.2]), _entry(8, [1.0, 2.0, 2.0])]
    variant, warps, _ = module.least_worst(partial, 8, [2, 4, 8])[(8, 4096, 4096)]
    assert (variant["MINB"], warps) == (3, 8)  # variant 0 never ran at M = 2
