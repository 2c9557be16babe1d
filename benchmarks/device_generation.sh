#!/bin/bash
# One device call for issue 19: the MoE / batched-generation GPU tests, then the MoE and batched-decode
# benchmarks on reduced depth (the session's device budget did not allow the full 48 / 32 layers).
set -u
export PYTHONPATH=$PWD/src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout ${TEST_S:-150} python3 -m pytest -q -m gpu tests/test_moe.py tests/test_generation_batch.py -p no:cacheprovider --timeout 100 > "$OUT/pytest.txt" 2>&1
tail -2 "$OUT/pytest.txt"; grep -m8 "^FAILED\|^ERROR" "$OUT/pytest.txt"
timeout ${MOE_S:-170} python3 benchmarks/bench_moe.py --layers ${MOE_LAYERS:-12} --new-tokens 64 --budget-s 150 --out "$OUT/RESULTS-moe.md" > "$OUT/moe.log" 2>&1
tail -14 "$OUT/moe.log"
timeout ${BATCH_S:-150} python3 benchmarks/bench_generation.py --layers ${GEN_LAYERS:-8} --batches 1,8,32 --prompts 128 --new-tokens 64 --skip-hf --out "$OUT/RESULTS-batch.md" > "$OUT/batch.log" 2>&1
tail -14 "$OUT/batch.log"
