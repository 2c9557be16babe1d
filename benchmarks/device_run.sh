#!/bin/bash
# One device call for a session's checks: the whole GPU suite (tests/test_gpu.py's two-GPU tests run
# only where two GPUs are lent, e.g. kind nvidia-h100-x2), then the per-layer kernel table.
# Usage on the device machine: bash benchmarks/device_run.sh   (about 6 minutes on one H100)
set -u
export PYTHONPATH=$PWD/src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${TEST_S:-400} python3 -m pytest -q -m gpu tests/ -p no:cacheprovider > "$OUT/pytest.txt" 2>&1
tail -3 "$OUT/pytest.txt"; grep -m5 "^FAILED" "$OUT/pytest.txt"
timeout ${BENCH_S:-150} python3 benchmarks/bench_kernels.py --no-torch-dequant --out "$OUT/bench.log" > /dev/null 2>&1
cut -d'|' -f2-7 "$OUT/bench.log"
