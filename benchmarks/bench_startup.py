"""Start-up time of a Python interpreter with and without the persistent hook (``nvfp4-fix apply-patch``),
in a throwaway venv where nvfp4-fix is installed as users install it (a wheel, no dependencies).

    python3 benchmarks/bench_startup.py [--runs 50]

Prints the median of interleaved runs of ``python -c pass`` and ``python -c "import json"`` for each
side, and the difference. (tests/test_hook_stress.py checks what the hook imports; the time is only
measured here.)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from nvfp4_fix.compat import startup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp, ROOT],
                       check=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp / "venv"], check=True)
        py = tmp / "venv" / "bin" / "python"
        wheel = next(tmp.glob("nvfp4_fix-*.whl"))
        subprocess.run([*pip, "--python", py, "install", "--no-deps", "--no-index", wheel], check=True)
        site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip

        def start(code: str) -> float:
            t = time.perf_counter()
            subprocess.run([py, "-c", code], check=True)
            return time.perf_counter() - t

        print(f"python {sys.version.split()[0]}, {args.runs} interleaved starts per side")
        print("| code | without hook ms | with hook ms | difference ms |")
        print("|---|---:|---:|---:|")
        for code in ("pass", "import json"):
            without, with_hook = [], []
            for _ in range(args.runs):
                startup.remove(site)
                without.append(start(code))
                startup.install(site)
                with_hook.append(start(code))
            a, b = statistics.median(without) * 1e3, statistics.median(with_hook) * 1e3
            print(f"| `{code}` | {a:.2f} | {b:.2f} | {b - a:+.2f} |")


if __name__ == "__main__":
    main()
