#!/usr/bin/env bash
# Make (or reuse) the virtual environment .venvs/$1 from requirements/$1.txt, with the CPU torch 2.13.0.
set -euo pipefail
name="${1:?usage: setup_env.sh legacy|current}"
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venvs/$name"
stamp="$venv/.stamp"
want="$(cat "$root/requirements/$name.txt" "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
# torch first and pinned: any other version would pull a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" "torch==2.13.0" -r "$root/requirements/$name.txt"
"${pip[@]}" --no-deps -e "$root"
echo "$want" > "$stamp"
