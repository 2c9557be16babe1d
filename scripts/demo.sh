#!/usr/bin/env bash
# Set up the current environment and run the demo: load a shipped NVFP4 checkpoint, stay packed, generate.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup_env.sh" current
exec "$root/.venvs/current/bin/python" "$root/scripts/demo.py" "$@"
