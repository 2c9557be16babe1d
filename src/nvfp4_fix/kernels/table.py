"""Which backend runs an NVFP4 GEMM on CUDA: this package's kernels or Humming, by measurement.

One table, rows read top to bottom, the first match wins: (compute capability range, M range, shape
class) -> backend. Shape classes split the layers by weight elements N*K. The sm_90 rows come from the
side-by-side H100 measurement in ../shared/docs/nvfp4-facts.md ("Peers measured side by side": cold L2,
CUDA-graph replay, M = 1, 16, 128, 2048 on the Llama-3 8B/70B shapes): this package's kernels were faster
at M = 1 on most shapes (0.95-1.43x Humming's speed), Humming at M = 16 and 128 (ours 0.47-0.84x) and
mostly at 2048 (0.85-1.09x). M = 2..8, where our cuda_mma kernel runs, was not measured against Humming;
benchmarks/bench_humming.py measures every M from 1 to 4096 and is how these rows are to be refined.
Cards without measurements (sm_75 to sm_89, sm_100+) get no Humming rows: our kernels there (Triton
before sm_80, cuda_mma/Triton/dequantize+cuBLAS from sm_80) are the measured-correct default.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Backend = Literal["nvfp4", "humming"]
ShapeClass = Literal["small", "large"]

#: N*K at or above which a layer is "large" (8B down/gate_up, 70B layers, lm_heads); 8B q/k/v and o,
#: and MoE experts are "small".
LARGE_ELEMENTS = 48 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Row:
    cc_min: tuple[int, int]
    cc_max: tuple[int, int]
    m_min: int
    m_max: int
    shape: ShapeClass | None  # None: any
    backend: Backend


INF = 1 << 62

TABLE: tuple[Row, ...] = (
    Row((9, 0), (9, 0), 1, 8, None, "nvfp4"),
    Row((9, 0), (9, 0), 9, INF, None, "humming"),
)


def shape_class(n: int, k: int) -> ShapeClass:
    return "large" if n * k >= LARGE_ELEMENTS else "small"


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
