"""Write the winners of a sweep_mma_mid.py run into ``cuda_mma.TUNED`` (src/nvfp4_fix/kernels/cuda_mma.py).

    python3 benchmarks/apply_mma_sweep.py sweep_mma_mid.json [--buckets 16,32]

Entries of the swept (bucket, N, K) are replaced by the fastest measured variant and warps; the rest of
the table is kept. Deterministic: run on the device right after the sweep (so the same call can time the
dispatch with the new table) and here on the fetched JSON, it writes the same file.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "nvfp4_fix" / "kernels" / "cuda_mma.py"
KEYS = ("RT", "DEPTH", "XPRE", "MINB", "WN")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sweep_json")
    ap.add_argument("--buckets", default="16,32")
    args = ap.parse_args()
    buckets = {int(b) for b in args.buckets.split(",")}
    text = SRC.read_text()
    head, rest = text.split("TUNED: dict[tuple[int, int, int], tuple[dict[str, int], int]] = {\n", 1)
    body, tail = rest.split("\n}\n", 1)
    entries: dict[tuple[int, int, int], tuple[dict, int, str]] = {}
    comment = ""
    for line in body.splitlines():
        if line.strip().startswith("#"):
            comment = line.strip()[2:]
            continue
        m = re.match(r"^    (\(\d+, \d+, \d+\)): (\(.*\)),(?:  # (.*))?$", line)
        if not m:
            raise SystemExit(f"unexpected line in cuda_mma.TUNED: {line!r}")
        variant, warps = ast.literal_eval(m.group(2))
        entries[ast.literal_eval(m.group(1))] = (variant, warps, m.group(3) or comment)
        comment = ""
    for v in json.loads(Path(args.sweep_json).read_text()):
        if v["m"] in buckets and v.get("complete", True):  # a shape cut short by the budget keeps its entry
            variant = {k: v["best"][k] for k in KEYS if k in v["best"]}
            name = v["name"].replace("Qwen3-30B-A3B ", "30B-A3B ")
            entries[(v["m"], v["n"], v["k"])] = (variant, v["warps"], f"{name}: {v['best_us']:.1f} us")
    lines = []
    for key in sorted(entries):
        variant, warps, note = entries[key]
        line = f"    {key}: ({json.dumps(variant)}, {warps}),"
        if len(line) + len(note) + 4 > 110:
            lines += [f"    # {note}", line]
        else:
            lines.append(f"{line}  # {note}")
    table = "TUNED: dict[tuple[int, int, int], tuple[dict[str, int], int]] = {\n" + "\n".join(lines)
    SRC.write_text(head + table + "\n}\n" + tail)
    print(f"cuda_mma.TUNED: {len(entries)} entries ({sum(k[0] in buckets for k in entries)} from the sweep)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
