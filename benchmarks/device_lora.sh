#!/bin/bash
# One device call: the GPU test suite, then the LoRA benchmark (NVFP4 vs bf16 vs bitsandbytes NF4).
# bitsandbytes travels as its Python files + libbitsandbytes_cuda130.so in .whl/site (carry .whl).
# Usage on the device machine: bash benchmarks/device_lora.sh
set -u
export PYTHONPATH=$PWD/.whl/site:$PWD/src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import transformers, peft, torch; print('transformers', transformers.__version__, 'peft', peft.__version__, 'torch', torch.__version__)"
timeout ${TEST_S:-240} python3 -m pytest -q -m gpu tests/ -p no:cacheprovider --continue-on-collection-errors --timeout 120 > "$OUT/pytest.txt" 2>&1
tail -3 "$OUT/pytest.txt"; grep -m8 "^FAILED\|^ERROR" "$OUT/pytest.txt"
timeout ${BENCH_S:-320} python3 benchmarks/bench_lora.py --steps 6 --warmup 2 --out "$OUT/RESULTS-lora.md" > "$OUT/lora.log" 2>&1
tail -25 "$OUT/lora.log"
