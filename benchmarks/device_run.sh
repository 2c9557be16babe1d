#!/bin/bash
# One device call for this session's checks: GPU tests of the generation path, fusion and decode
# attention, then the decode/prefill profile. Usage on the device machine: bash benchmarks/device_run.sh
set -u
export PYTHONPATH=src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${TEST_S:-200} python3 -m pytest -q -m gpu -x tests/test_decode_attention.py tests/test_fusion.py \
  tests/test_generation.py > "$OUT/pytest.txt" 2>&1
tail -3 "$OUT/pytest.txt"
timeout ${PROFILE_S:-330} python3 benchmarks/profile_decode.py ${PROFILE_ARGS:---compile --prefill} > "$OUT/profile.txt" 2>&1
grep -E "^==|GPU kernel time" "$OUT/profile.txt"
