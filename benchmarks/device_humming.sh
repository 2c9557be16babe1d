#!/bin/bash
# One device call for issue 18, under 9 minutes on an H100 (each step has its own time limit):
#  1. benchmarks/bench_humming.py: Humming's transformed-copy bytes, the side-by-side table at every M
#     of the issue (ours, Humming, the NVFP4Linear dispatch with default settings and with Humming on,
#     cuBLAS bf16, dequantize+mm) with the targets' ratio lines, then every backend's correctness.
#     Humming JIT-compiles ~13 s per new (N, K, dtype) into $HUMMING_CACHE_DIR; the later steps reuse it.
#  2. benchmarks/bench_prefill_humming.py: eager prefill of the 32-layer 8B shape at P=2048, NVFP4
#     (default, and Humming on) vs bf16, same run.
#  3. the GPU tests of every backend (tests/test_backends.py, test_humming.py, test_selection.py) and
#     test_kernels.py's no-sync / CUDA-graph / torch.compile test of the default dispatch (the rest of
#     test_kernels.py's GPU tests take longer than this call allows: run them in their own call).
# The device image has torch, triton, transformers, cuda-bindings, jinja2 and filelock; only the
# humming-kernels wheel travels:
#   here:   mkdir -p .whl/humming && pip download humming-kernels==0.1.20 --no-deps -d .whl/humming
#   run:    command "bash benchmarks/device_humming.sh", carry [".whl/humming"]   (~7.5 minutes; at most ~8.7)
# HSTEPS="bench prefill pytest" (the default) picks the steps; BENCH_ARGS adds arguments to bench_humming.py
# (e.g. --shapes expert), TEST_K picks tests (pytest -k).
# Outputs under $OUT (6 files): bench_humming.md, bench_humming.json, bench.log, prefill.md,
# prefill.log, pytest.log.
set -u -o pipefail
T0=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/humming/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HUMMING_CACHE_DIR=${HUMMING_CACHE_DIR:-/tmp/hcache}
nvidia-smi -L
stamp() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }

HSTEPS=${HSTEPS:-bench prefill pytest}  # which of the three steps run
has() { [[ " $HSTEPS " == *" $1 "* ]]; }

if has bench; then
    stamp "bench_humming"
    timeout ${BENCH_S:-300} python3 benchmarks/bench_humming.py ${BENCH_ARGS:-} --out "$OUT" --budget-s $(( ${BENCH_S:-300} - 25 )) \
        > "$OUT/bench.log" 2>&1
    echo "rc $?"; grep -A14 "^Targets of issue 18" "$OUT/bench.log"; grep "^correctness\|^(total" "$OUT/bench.log"
fi
if has prefill; then
    stamp "prefill"
    timeout ${PREFILL_S:-85} python3 benchmarks/bench_prefill_humming.py --out "$OUT" --budget-s $(( ${PREFILL_S:-85} - 25 )) \
        > "$OUT/prefill.log" 2>&1
    echo "rc $?"; tail -9 "$OUT/prefill.log"
fi
if has pytest; then
    stamp "pytest"
    timeout ${TEST_S:-125} python3 -m pytest -q -p no:cacheprovider --timeout 90 -rfE \
        tests/test_backends.py tests/test_humming.py tests/test_selection.py \
        tests/test_kernels.py::test_gpu_no_sync_graph_and_compile ${TEST_K:+-k "$TEST_K"} > "$OUT/pytest.log" 2>&1
    echo "rc $?"; tail -3 "$OUT/pytest.log"; grep -m10 "^FAILED\|^ERROR" "$OUT/pytest.log"
fi
stamp "done"
