"""Which backend runs an NVFP4 GEMM on CUDA: this package's kernels or Humming, by measurement.

One table, rows read top to bottom, the first match wins: (compute capability range, M range, shape
class) -> backend. Shape classes split the layers by weight elements N*K. The sm_90 rows are the
faster backend per (M, class) in benchmarks/RESULTS-kernels-humming.md (one H100 run: cold L2,
CUDA-graph replay, M = 1..4096, Llama-3 8B/70B and Qwen3-30B-A3B expert shapes); between measured M
the boundary sits at the last M measured faster. Cards without measurements (sm_75 to sm_89, sm_100+)
get no Humming rows: our kernels there (Triton before sm_80, cuda_mma/Triton/dequantize+cuBLAS from
sm_80) are the tested default.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Backend = Literal["nvfp4", "humming"]
ShapeClass = Literal["tiny", "small", "medium", "big", "large"]

#: upper bounds (exclusive) of N*K for the classes: MoE experts (Qwen3-30B-A3B 1536x2048, 2048x768) are
#: tiny; 8B q/k/v and o small; 8B down and 70B o medium; 70B q/k/v big; 8B gate_up, 70B gate_up and
#: down and the lm_heads large. "big" is where ours still wins at M = 1 and Humming from M = 2.
CLASS_BOUNDS: tuple[tuple[ShapeClass, int], ...] = (
    ("tiny", 4 << 20),
    ("small", 48 << 20),
    ("medium", 72 << 20),
    ("big", 96 << 20),
)


@dataclasses.dataclass(frozen=True)
class Row:
    cc_min: tuple[int, int]
    cc_max: tuple[int, int]
    m_min: int
    m_max: int
    shape: ShapeClass | None  # None: any
    backend: Backend


INF = 1 << 62
H100 = ((9, 0), (9, 0))

TABLE: tuple[Row, ...] = (
    # session 12's run (143 points, ours / Humming time): tiny 0.55-0.87 up to M = 64, 1.00-1.12 at
    # 128 with the tl.dot GEMM (dequantize + cuBLAS there: 0.69-0.87, selection.TINY_DEQUANT_MM_MIN_M),
    # 0.49-0.80 from 256, so no tiny row; small 0.93-1.02 at 16, 1.05-1.49 at 32-256, 0.98-1.13 at 512,
    # 0.94-1.00 at 1024; medium 0.95-1.00 at 8, 1.07-1.94 at 16-1024, 0.98 at 2048; large 0.90-1.10 at
    # M = 1 (70B q/k/v 0.90, 70B down 1.10), 1.01-2.21 up to 1024, 0.98-1.06 at 2048.
    # Session 15's run (every weight copy cold) kept these rows and split 70B q/k/v (84M elements) off
    # the large class as "big": ours / Humming 0.90 at M = 1 (sessions 14 and 15), 1.08 at M = 2,
    # while the large layers are 1.00-1.06 at M = 1.
    Row(*H100, 17, 512, "small", "humming"),
    Row(*H100, 9, 1024, "medium", "humming"),
    Row(*H100, 2, 2048, "big", "humming"),
    Row(*H100, 1, 2048, "large", "humming"),
    Row(*H100, 1, INF, None, "nvfp4"),
)


def shape_class(n: int, k: int) -> ShapeClass:
    for name, bound in CLASS_BOUNDS:
        if n * k < bound:
            return name
    return "large"


def backend_for(cc: tuple[int, int], m: int, n: int, k: int) -> Backend:
    """The measured-fastest backend; "nvfp4" where no row matches."""
    cls = shape_class(n, k)
    for row in TABLE:
        if row.cc_min <= cc <= row.cc_max and row.m_min <= m <= row.m_max and row.shape in (None, cls):
            return row.backend
    return "nvfp4"


def humming_ranges(cc: tuple[int, int]) -> list[str]:
    """The rows that send work to Humming on this card, for the log line."""
    out = []
    for row in TABLE:
        if row.backend == "humming" and row.cc_min <= cc <= row.cc_max:
            hi = "+" if row.m_max >= INF else f"-{row.m_max}"
            out.append(f"M {row.m_min}{hi}" + (f" ({row.shape} layers)" if row.shape else ""))
    return out
