#!/bin/bash
# One device call: cuda_mma GPU tests, SASS of the kernel, kernel table at decode M.
# Usage on the device machine: bash benchmarks/device_mma.sh [models] [m list] [warps list]  (writes under $OUT)
set -u
export PYTHONPATH=src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
python3 - <<'PY' > "$OUT/sass.txt" 2>&1
import subprocess, torch
from nvfp4_fix.kernels import cuda_mma, nvrtc
for nt in (1, 2):
    open(f"/tmp/k{nt}.cubin", "wb").write(nvrtc.compile_cubin(cuda_mma.source(torch.bfloat16, nt), "sm_90"))
    print(subprocess.run(["cuobjdump", "-sass", "-res-usage", f"/tmp/k{nt}.cubin"], capture_output=True, text=True).stdout)
PY
grep -E "REG" "$OUT/sass.txt" | head -3
timeout 240 python3 -m pytest -q -m gpu tests/test_kernels.py -k "cuda_mma or dispatch_gpu or no_sync" -x > "$OUT/pytest.txt" 2>&1
tail -3 "$OUT/pytest.txt"
timeout 300 python3 benchmarks/bench_kernels.py --models ${1:-8b,70b} --m ${2:-1,4,16} --no-torch-dequant --mma-warps ${3:-4,8,16} \
  --out "$OUT/bench_mma.md" 2>&1 | grep -v "^  cuda_mma" | tail -30
grep "^  cuda_mma" "$OUT/bench_mma.md" | awk '{printf "%s %s %s %s %.1f\n", $2, $3, $4, $5, $6}' | paste -sd'|' | fold -w 2000
