"""Write the winners of a sweep_mma_mid.py run into ``cuda_mma.TUNED`` (src/nvfp4_fix/kernels/cuda_mma.py).

    python3 benchmarks/apply_mma_sweep.py sweep_mma_mid.json [--buckets 16,32] [--span 8=2,4,8]

Entries of the swept (bucket, N, K) are replaced by the fastest measured variant and warps; the rest of
the table is kept. ``--span B=M1,M2,..`` chooses bucket B's entry from the sweeps at every listed M
instead: the variant whose worst time / that M's best time is least (for a bucket of several M that
share one compiled kernel, e.g. 2..8). Deterministic: run on the device right after the sweep (so the
same call can time the dispatch with the new table) and here on the fetched JSON, it writes the same file.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "nvfp4_fix" / "kernels" / "cuda_mma.py"
KEYS = ("RT", "DEPTH", "XPRE", "MINB", "WN")


def least_worst(
    sweep: list[dict], top: int, ms: list[int]
) -> dict[tuple[int, int, int], tuple[dict, int, str]]:
    """Per (N, K) swept completely at every M of ``ms``: the variant and warps whose worst time / best
    time over those M is least, keyed (top, N, K)."""
    by_shape: dict[tuple[int, int], dict[int, dict]] = {}
    for v in sweep:
        if v["m"] in ms and v.get("complete", True):
            by_shape.setdefault((v["n"], v["k"]), {})[v["m"]] = v
    out = {}
    for (n, k), per_m in by_shape.items():
        if set(per_m) != set(ms):
            continue
        times: dict[tuple, dict[int, float]] = {}
        for m, v in per_m.items():
            for t, var, warps in v["all"]:
                times.setdefault((tuple((key, var[key]) for key in KEYS), warps), {})[m] = t
        worst = {
            cand: max(t[m] / per_m[m]["best_us"] for m in ms)
            for cand, t in times.items()
            if set(t) == set(ms)
        }
        if not worst:
            continue
        cand = min(worst, key=worst.get)
        t = times[cand]
        name = per_m[ms[0]]["name"].replace("Qwen3-30B-A3B ", "30B-A3B ")
        span = "/".join(str(m) for m in ms)
        note = f"{name}: M {span} " + "/".join(f"{t[m]:.1f}" for m in ms) + f" us, <= {worst[cand]:.2f}x best"
        out[(top, n, k)] = (dict(cand[0]), cand[1], note)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sweep_json")
    ap.add_argument("--buckets", default="16,32")
    ap.add_argument(
        "--span", default="", help="BUCKET=M,M,...: the bucket's entry is the least worst over those M"
    )
    args = ap.parse_args()
    buckets = {int(b) for b in args.buckets.split(",")}
    spans = {}
    if args.span:
        top, ms = args.span.split("=")
        spans[int(top)] = [int(m) for m in ms.split(",")]
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
    sweep = json.loads(Path(args.sweep_json).read_text())
    for v in sweep:
        if (
            v["m"] in buckets and v["m"] not in spans and v.get("complete", True)
        ):  # a shape cut short keeps its entry
            variant = {k: v["best"][k] for k in KEYS if k in v["best"]}
            name = v["name"].replace("Qwen3-30B-A3B ", "30B-A3B ")
            entries[(v["m"], v["n"], v["k"])] = (variant, v["warps"], f"{name}: {v['best_us']:.1f} us")
    for top, ms in spans.items():
        for key, entry in least_worst(sweep, top, ms).items():
            entries[key] = entry
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
