#!/bin/bash
# One device call for issue 15's GPU figures (about 5 minutes on one H100, at most 7.5 by the timeouts):
# the FP8 / mixed GPU tests, the FP8 layer table (bench_fp8.py) and the 27B-like mixed checkpoint under a
# 24 GiB cap (bench_mixed_27b.py: written layer by layer by the repo's writer, ~16 GiB in /tmp).
# Needs no compressed-tensors (its tests are not GPU-marked; the GPU tests compare with float references).
# Usage on the device machine: bash benchmarks/device_mixed.sh   (files land in $OUT; MIXED_ARGS=--compile
# also decodes the 27B-like checkpoint with compile_step, MIXED_S=400 for the time it takes)
set -u
export PYTHONPATH=${SRC:-$PWD/src} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /tmp | tail -1; free -g | sed -n 2p
per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 90")
t0=$SECONDS
timeout ${TEST_S:-120} python3 -m pytest -q -m gpu tests/test_fp8.py tests/test_fp8_kernels.py tests/test_mixed*.py \
    -p no:cacheprovider $per_test > "$OUT/pytest.txt" 2>&1
echo "tests: rc $? in $((SECONDS - t0)) s"; tail -2 "$OUT/pytest.txt"; grep -m8 "^FAILED\|^ERROR" "$OUT/pytest.txt"
t0=$SECONDS
timeout ${FP8_S:-120} python3 benchmarks/bench_fp8.py --reps ${FP8_REPS:-15} --out "$OUT/RESULTS-fp8.md" > "$OUT/fp8.log" 2>&1
echo "bench_fp8: rc $? in $((SECONDS - t0)) s"; grep -m8 "^FAILED\|Error" "$OUT/fp8.log"
t0=$SECONDS
timeout ${MIXED_S:-240} python3 benchmarks/bench_mixed_27b.py --layers ${LAYERS:-64} --cap-gib 24 ${MIXED_ARGS:-} \
    --out "$OUT/RESULTS-mixed.md" > "$OUT/mixed.log" 2>&1
echo "bench_mixed_27b: rc $? in $((SECONDS - t0)) s"; tail -12 "$OUT/mixed.log"
