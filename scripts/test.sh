#!/usr/bin/env bash
# Set up both test environments (legacy: compressed-tensors 0.13.0 + transformers 4.57.3;
# current: newest releases) and run the whole test suite in each.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
status=0
for env in legacy current; do
    bash scripts/setup_env.sh "$env" || { echo "setting up $env failed"; exit 1; }
done
for env in legacy current; do
    echo "=== tests: $env environment ==="
    NVFP4_FIX_TEST_ENV="$env" ".venvs/$env/bin/python" -m pytest -q -p no:cacheprovider "$@" tests || status=1
done
echo "=== ruff ==="
.venvs/current/bin/ruff check src tests scripts benchmarks || status=1
.venvs/current/bin/ruff format --check src tests scripts benchmarks || status=1
exit $status
