#!/bin/bash
# One device call for issue 19's batch-1 decode: the cuda_mma GPU tests (prefetch chain, dependent
# launches), the generation GPU tests, then profile_decode's per-variant A/B and kernel table of one
# compiled step (8B shape, 32 layers).   run: bash benchmarks/device_decode.sh   (~6 minutes)
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=${SRC:-$PWD/src} PYTHONUNBUFFERED=1
BENCH=${BENCH:-benchmarks}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout ${TEST_S:-150} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py -k "cuda_mma" \
    2>&1 | tee "$OUT/pytest-kernels.log" | tail -6
timeout ${TEST_S:-150} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_generation.py \
    2>&1 | tee "$OUT/pytest-generation.log" | tail -6
timeout ${PROFILE_S:-330} python3 $BENCH/profile_decode.py --compile --ab-prefetch --prompts ${PROMPTS:-128,2048} \
    2>&1 | tee "$OUT/profile-decode.log" | grep -v "^  .*us .*x  " | tail -40
grep -A32 "compile=True" "$OUT/profile-decode.log" | head -80
