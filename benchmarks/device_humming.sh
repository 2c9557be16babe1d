#!/bin/bash
# One device call for issue 18: Humming's GPU tests, then benchmarks/bench_humming.py (correctness of
# every backend, Humming's transformed-copy bytes, the side-by-side table). The device image has
# cuda-bindings, jinja2 and filelock; only the humming-kernels wheel travels:
#   here:   mkdir -p .whl/humming && pip download humming-kernels==0.1.20 --no-deps -d .whl/humming
#   run:    command "bash benchmarks/device_humming.sh", carry [".whl/humming"]   (about 8 minutes: Humming JIT-compiles ~13 s per new layer shape)
set -u -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/humming/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HUMMING_CACHE_DIR=${HUMMING_CACHE_DIR:-/tmp/hcache}
nvidia-smi -L
timeout ${TEST_S:-240} python3 -m pytest -q -p no:cacheprovider tests/test_humming.py 2>&1 | tee "$OUT/pytest.log" | tail -30
timeout ${BENCH_S:-330} python3 benchmarks/bench_humming.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -150
