#!/bin/bash
# Session 7, first device call: issue 15's device_mixed.sh, then the GPU tests of this session's other
# new GPU paths (fused MoE decode experts, NVFP4 lm_head, backends), so none ships unrun.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TEST_S=${TEST_S:-100} FP8_S=${FP8_S:-80} MIXED_S=${MIXED_S:-200} bash benchmarks/device_mixed.sh
export PYTHONPATH=${SRC:-$PWD/src} PYTHONUNBUFFERED=1
t0=$SECONDS
timeout ${MORE_S:-110} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_moe.py tests/test_moe_decode.py tests/test_lm_head.py \
    tests/test_generation_batch.py > "$OUT/pytest-more.txt" 2>&1
echo "moe/lm_head/batch tests: rc $? in $((SECONDS - t0)) s"; tail -2 "$OUT/pytest-more.txt"
grep -m12 "^FAILED\|^ERROR" "$OUT/pytest-more.txt"
