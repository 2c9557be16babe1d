#!/bin/bash
# One device call for the MoE decode launches (issue 19 item 1): the MoE GPU tests, the decode-tile
# sweep with launch counts, then bf16 vs NVFP4 decode at 8 layers. At most 9.5 minutes (timeouts 150 + 200 + 200 s).
# Usage on the device machine: bash benchmarks/device_moe.sh   (SWEEP_ARGS=--quick for a short sweep)
set -u
export PYTHONPATH=$PWD/src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
t0=$SECONDS
timeout ${TEST_S:-150} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_moe.py tests/test_moe_decode.py > "$OUT/pytest-moe.txt" 2>&1
echo "moe tests: rc $? in $((SECONDS - t0)) s"; tail -2 "$OUT/pytest-moe.txt"; grep -m5 "^FAILED" "$OUT/pytest-moe.txt"
t0=$SECONDS
timeout ${SWEEP_S:-200} python3 benchmarks/sweep_moe_tiles.py ${SWEEP_ARGS:-} > "$OUT/sweep-moe.txt" 2>&1
echo "sweep: rc $? in $((SECONDS - t0)) s"; cat "$OUT/sweep-moe.txt"
timeout ${MOE_S:-200} python3 benchmarks/bench_moe.py --layers ${MOE_LAYERS:-8} --new-tokens 64 --budget-s 180 --out "$OUT/RESULTS-moe.md" > "$OUT/moe.log" 2>&1
echo "bench_moe: rc $?"; tail -14 "$OUT/moe.log"
