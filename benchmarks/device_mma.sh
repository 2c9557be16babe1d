#!/bin/bash
# One device call: cuda_mma GPU tests, SASS of the kernel, kernel table at decode M.
# Usage on the device machine: bash benchmarks/device_mma.sh  (writes under $OUT)
set -u
export PYTHONPATH=src
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' > "$OUT/sass.txt" 2>&1
import os, subprocess, torch
from nvfp4_fix.kernels import cuda_mma, nvrtc
for dt in (torch.bfloat16,):
    b = nvrtc.compile_cubin(cuda_mma.source(dt, 1), "sm_90")
    open("/tmp/k.cubin", "wb").write(b)
    sass = subprocess.run(["cuobjdump", "-sass", "/tmp/k.cubin"], capture_output=True, text=True).stdout
    print(sass)
    res = subprocess.run(["cuobjdump", "-res-usage", "/tmp/k.cubin"], capture_output=True, text=True).stdout
    print(res)
PY
grep -E "REG|SHARED" "$OUT/sass.txt" | head -3
timeout 240 python3 -m pytest -q -m gpu tests/test_kernels.py -k "cuda_mma or dispatch_gpu or no_sync" -x 2>&1 | tail -15
timeout 300 python3 benchmarks/bench_kernels.py --models 8b,70b --m 1,4,16 --no-torch-dequant --mma-warps 2,4,8,16 \
  --out "$OUT/bench_mma.md" 2>&1 | grep -v "^  cuda_mma" | tail -30
grep "^  cuda_mma" "$OUT/bench_mma.md" | head -80
