#!/bin/bash
# One device call for what issues 18 and 19 still lack after session 8 (at most ~9.5 minutes on one H100,
# each step under its own time limit):
#  1. sweep_mid_m.py: the tl.dot tiles at M = 32 / 64 for the 8B, 70B and Qwen3-30B-A3B expert shapes
#     (paste the printed TUNED_M32 / TUNED_M64 into kernels/triton_ops.py, then rerun device_humming.sh);
#  2. bench_moe.py --compile at 8 layers: bf16 with compile_step too, so the MoE ratio is like for like;
#  3. the generation GPU tests (test_generation*.py) on the card;
#  4. batched decode at batch 1 / 8 / 32 at the full 32 layers of the 8B shape.
# Usage on the device machine: bash benchmarks/device_open_issues.sh   (files land in $OUT)
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
t0=$SECONDS
(cd benchmarks && timeout ${SWEEP_S:-200} python3 sweep_mid_m.py --m 32,64 --budget-s $(( ${SWEEP_S:-200} - 40 )) \
    --out "$OUT/sweep_mid_m.json" > "$OUT/sweep.log" 2>&1)
echo "sweep: rc $? in $((SECONDS - t0)) s"; grep -v "^  failed\|WRONG" "$OUT/sweep.log" | tail -30
t0=$SECONDS
timeout ${MOE_S:-130} python3 benchmarks/bench_moe.py --layers 8 --new-tokens 64 --compile --budget-s $(( ${MOE_S:-130} - 15 )) \
    --out "$OUT/RESULTS-moe.md" > "$OUT/moe.log" 2>&1
echo "bench_moe: rc $? in $((SECONDS - t0)) s"; grep "^|" "$OUT/moe.log" | tail -8
t0=$SECONDS
timeout ${TEST_S:-100} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_generation.py tests/test_generation_batch.py \
    > "$OUT/pytest-generation.txt" 2>&1
echo "generation tests: rc $? in $((SECONDS - t0)) s"; tail -1 "$OUT/pytest-generation.txt"; grep -m5 "^FAILED" "$OUT/pytest-generation.txt"
t0=$SECONDS
timeout ${BATCH_S:-120} python3 benchmarks/bench_generation.py --layers 32 --batches 1,8,32 --prompts 128 --new-tokens 64 \
    --skip-hf --out "$OUT/RESULTS-batch.md" > "$OUT/batch.log" 2>&1
echo "batch: rc $? in $((SECONDS - t0)) s"; grep "^|" "$OUT/batch.log" | tail -7
