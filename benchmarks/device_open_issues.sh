#!/bin/bash
# Device calls for what issue 18 still lacks; STEPS picks the steps, each under its own time limit.
# Session 18 ran session 17's calls 1 and 3 (RESULTS-kernels-humming.md and RESULTS-batch.md, session 18).
# What it left unrun on a card (next session, in this order):
#   call 1: STEPS="mma apply mmatest humming" MMA_M=8,2,4,1 MMA_S=200 APPLY_BUCKETS=1,8 APPLY_ARGS="--span 8=2,4,8"
#           MMATEST_S=80 HSTEPS=bench BENCH_S=170 BENCH_ARGS="--m 1,2,4,8 --skip-correctness" (carry [".whl/humming"]):
#           cuda_mma's variants at M = 2, 4, 8 (and 1, now with the 8B lm_head) into the (2, 8) bucket of
#           cuda_mma.TUNED, which has no entries yet (M = 2-8 run the NT = 1 defaults: 70B q/k/v 26.0 us at M = 2
#           against 21.5 at M = 1 with its tuned variant), then the dispatch against Humming at M = 1-8, same run;
#           copy $OUT/cuda_mma.py into src/ (or rerun apply_mma_sweep.py on the fetched JSON)
#   call 2: STEPS="moe" MOE_ARGS="--layers 48 --new-tokens 64 --prompts 128 --paths compile --experts
#           cuda-sum --router on": TTFT of the 48-layer MoE through the sorted kernels and the route kernel
# Steps:
#  moetest the MoE GPU tests (cuda_moe and Triton decode experts, grouped kernels, lm_head, router)
#  mmatest the cuda_mma GPU tests (MMATEST_K: test_cuda_mma_gpu = the dispatch's variants at M up to 64;
#          cuda_mma = every variant family too, ~2 minutes)
#  moe     bench_moe.py (MOE_ARGS; default all 48 layers, compile_step, P = 128 and 2048, the one-launch
#          router, tensor-core decode experts with the pair sum in the down kernel; --profile-prefill adds
#          a profile of the 1-token call): bf16 and NVFP4 on the same path
#  moehum  bench_moe_humming.py (MOEHUM_T tokens, default 1,2,4,8): experts, ours vs Humming's MoE GEMMs vs
#          bf16 grouped_mm (needs carry [".whl/humming"])
#  humming device_humming.sh (issue 18's side-by-side table; HSTEPS picks bench / prefill / pytest)
#  moesweep sweep_moe_tiles.py --cuda: cuda_moe's compile variants and warps per kernel (gate_up, down,
#          down_sum) at T = 1 and 8, spill-free ones only, each checked against the Triton kernels
#  mma     sweep_mma_mid.py: cuda_mma at MMA_M rows, every spill-free variant and WN, against the tl.dot
#          GEMM and cuBLAS; writes its JSON after every shape
#  apply   apply_mma_sweep.py: the sweep's winners into cuda_mma.TUNED (on the device's copy; APPLY_BUCKETS,
#          APPLY_ARGS e.g. "--span 8=2,4,8"), the new file into $OUT
#  generation bench_generation.py --compile: batch-1 decode of the 8B shape, 32 layers (issue 19)
#  batch   batched decode at batch 1 / 8 / 32, full 32 layers of the 8B shape
#  tile    sweep_tile.py: cuda_tile's plan and variant families vs the dispatch without it, Humming (with
#          TILE_ARGS=--humming and carry [".whl/humming"]), cuBLAS, at TILE_M
#  tiletest the cuda_tile GPU tests
#  tldot   sweep_mid_m.py: the tl.dot tiles at M = 64 (fallback where cuda_mma does not win)
#  gen     the generation GPU tests (test_generation*.py)
#  fp8test the FP8 / mixed-precision GPU tests
# Usage on the device machine: STEPS="mma mmatest moe" bash benchmarks/device_open_issues.sh   (files land in $OUT)
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STEPS=${STEPS:-humming}  # HSTEPS below picks the humming step's parts
nvidia-smi -L
step() { t0=$SECONDS; echo "== $1"; }
done_() { echo "-- rc $1 in $((SECONDS - t0)) s"; }
for s in $STEPS; do case $s in
mma) step mma
    (cd benchmarks && timeout ${MMA_S:-230} python3 sweep_mma_mid.py --m ${MMA_M:-16,32,64} --only "${MMA_ONLY:-}" --budget-s $(( ${MMA_S:-230} - 30 )) \
        --out "$OUT/sweep_mma_mid.json" > "$OUT/sweep_mma.log" 2>&1); done_ $?
    grep "^|\|failed\|WRONG\|budget" "$OUT/sweep_mma.log" | tail -34 ;;
moesweep) step moesweep
    timeout ${MOESWEEP_S:-200} python3 benchmarks/sweep_moe_tiles.py --cuda --t 1,8 --layers 8 > "$OUT/moesweep.log" 2>&1; done_ $?
    grep "^|\|defaults" "$OUT/moesweep.log" | tail -50 ;;
apply) step apply  # the sweep's winners into cuda_mma.TUNED, so the steps after it time the new table
    python3 benchmarks/apply_mma_sweep.py "$OUT/sweep_mma_mid.json" --buckets ${APPLY_BUCKETS:-16,32} ${APPLY_ARGS:-}; done_ $?
    git diff --stat; cp src/nvfp4_fix/kernels/cuda_mma.py "$OUT/cuda_mma.py" ;;
humming) step humming  # needs carry [".whl/humming"]
    HSTEPS=${HSTEPS:-bench} BENCH_S=${BENCH_S:-300} OUT="$OUT/humming" bash benchmarks/device_humming.sh; done_ $? ;;
generation) step generation
    timeout ${GENB_S:-200} python3 benchmarks/bench_generation.py --compile --skip-hf --new-tokens 128 \
        --out "$OUT/RESULTS-generation.md" > "$OUT/generation.log" 2>&1; done_ $?
    grep "^|" "$OUT/generation.log" | tail -12 ;;
mmatest) step mmatest
    timeout ${MMATEST_S:-70} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py -k "${MMATEST_K:-test_cuda_mma_gpu}" \
        > "$OUT/pytest-mma.txt" 2>&1; done_ $?
    tail -1 "$OUT/pytest-mma.txt"; grep -m5 "^FAILED\|Error" "$OUT/pytest-mma.txt" ;;
moetest) step moetest
    timeout ${MOETEST_S:-140} python3 -m pytest -q -m gpu -p no:cacheprovider ${MOETEST_FILES:-tests/test_moe.py tests/test_moe_decode.py tests/test_moe_router.py \
        tests/test_lm_head.py} > "$OUT/pytest-moe.txt" 2>&1; done_ $?
    tail -1 "$OUT/pytest-moe.txt"; grep -m5 "^FAILED\|Error" "$OUT/pytest-moe.txt" ;;
moe) step moe
    timeout ${MOE_S:-400} python3 benchmarks/bench_moe.py ${MOE_ARGS:---layers 48 --new-tokens 64 --prompts 128,2048 --paths compile --experts cuda-sum --router on} \
        --budget-s $(( ${MOE_S:-400} - 40 )) --out "$OUT/RESULTS-moe.md" > "$OUT/moe.log" 2>&1; done_ $?
    grep "^|" "$OUT/moe.log" | tail -8; grep -A28 "^== .* decode step\|^== .* 1-token call" "$OUT/moe.log" | cut -c1-150 ;;
moehum) step moehum  # needs carry [".whl/humming"]
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/humming/*.whl
    PYTHONPATH=/tmp/site:$PYTHONPATH HUMMING_CACHE_DIR=/tmp/hcache timeout ${MOEHUM_S:-300} python3 benchmarks/bench_moe_humming.py \
        --t ${MOEHUM_T:-1,2,4,8} --budget-s $(( ${MOEHUM_S:-300} - 40 )) --out "$OUT/RESULTS-moe-humming.md" > "$OUT/moehum.log" 2>&1; done_ $?
    grep "^|\|WRONG\|failed\|refused" "$OUT/moehum.log" | tail -24 ;;
tile) step tile
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/humming/*.whl 2>/dev/null
    (cd benchmarks && PYTHONPATH=/tmp/site:$PYTHONPATH HUMMING_CACHE_DIR=/tmp/hcache timeout ${TILE_S:-300} python3 sweep_tile.py ${TILE_ARGS:-} \
        --m ${TILE_M:-17,24,32,40,48} --budget-s $(( ${TILE_S:-300} - 30 )) --out "$OUT/sweep_tile.json" > "$OUT/tile.log" 2>&1); done_ $?
    grep -v "^    " "$OUT/tile.log" | tail -80 ;;
tiletest) step tiletest
    timeout ${TILETEST_S:-150} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_tile.py > "$OUT/pytest-tile.txt" 2>&1; done_ $?
    tail -1 "$OUT/pytest-tile.txt"; grep -m8 "^FAILED\|Error" "$OUT/pytest-tile.txt" ;;
tldot) step tldot
    (cd benchmarks && timeout ${TLDOT_S:-80} python3 sweep_mid_m.py --m 64 --budget-s $(( ${TLDOT_S:-80} - 20 )) \
        --out "$OUT/sweep_mid_m.json" > "$OUT/sweep_tldot.log" 2>&1); done_ $?
    grep -v "^  failed\|WRONG" "$OUT/sweep_tldot.log" | tail -14 ;;
gen) step gen
    timeout ${GEN_S:-100} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_generation.py \
        tests/test_generation_batch.py > "$OUT/pytest-generation.txt" 2>&1; done_ $?
    tail -1 "$OUT/pytest-generation.txt"; grep -m5 "^FAILED" "$OUT/pytest-generation.txt" ;;
fp8test) step fp8test
    timeout ${FP8_S:-120} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fp8.py tests/test_fp8_kernels.py \
        tests/test_fp8_act_quant.py tests/test_mixed*.py > "$OUT/pytest-fp8.txt" 2>&1; done_ $?
    tail -1 "$OUT/pytest-fp8.txt"; grep -m8 "^FAILED\|^ERROR" "$OUT/pytest-fp8.txt" ;;
batch) step batch
    timeout ${BATCH_S:-120} python3 benchmarks/bench_generation.py --layers 32 --batches 1,8,32 --prompts 128 \
        --new-tokens 64 --skip-hf --out "$OUT/RESULTS-batch.md" > "$OUT/batch.log" 2>&1; done_ $?
    grep "^|" "$OUT/batch.log" | tail -7 ;;
esac; done
