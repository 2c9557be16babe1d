#!/usr/bin/env bash
# Create the producer virtualenvs used by scripts/make_fixtures.py.
#   scripts/make_fixture_envs.sh [legacy] [current] [modelopt]     (default: all three)
# Each env lives in fixture-envs/<name>/ (git-ignored) and gets a READY file when its smoke
# import works.  torch 2.13.0 (CPU wheel, /opt/wheels or PyPI's CPU index) is installed FIRST and
# pinned through a constraints file, so pip can never pull another (CUDA) torch.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENVS="$ROOT/fixture-envs"
PY="${PYTHON:-python3.11}"
mkdir -p "$ENVS"
CONS="$ENVS/constraints.txt"
cat > "$CONS" <<'CONS_EOF'
torch==2.13.0
CONS_EOF
export PIP_CONSTRAINT="$CONS"
export PIP_DISABLE_PIP_VERSION_CHECK=1

mkenv() {  # name
    local d="$ENVS/$1"
    rm -rf "$d"
    "$PY" -m venv "$d"
    "$d/bin/pip" install -q --upgrade pip
    "$d/bin/pip" install -q torch==2.13.0
}

smoke() {  # name python-snippet
    local d="$ENVS/$1"
    "$d/bin/python" -c "$2"
    "$d/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
    "$d/bin/pip" freeze > "$d/freeze.txt"
    date -u +%FT%TZ > "$d/READY"
    echo "[$1] READY"
}

legacy() {
    local d="$ENVS/legacy"; mkenv legacy
    # llmcompressor 0.9.0.2 pins torch<=2.9.1 (CUDA-only on PyPI): --no-deps, deps by hand.
    "$d/bin/pip" install -q --no-deps llmcompressor==0.9.0.2
    "$d/bin/pip" install -q compressed-tensors==0.13.0 transformers==4.57.3 accelerate==1.12.0 \
        datasets==4.4.1 "loguru>=0.7.2,<=0.7.3" "pyyaml>=6.0.1,<=6.0.3" "numpy>=2.0,<=2.3.5" \
        "requests>=2.32.2,<=2.32.5" "tqdm>=4.66.3,<=4.67.1" "nvidia-ml-py>=12.560.30,<=13.590.44" \
        "pillow>=10.4.0,<=12.1.1" tokenizers safetensors
    smoke legacy 'import llmcompressor, compressed_tensors, transformers; from llmcompressor import oneshot; print(llmcompressor.__version__, compressed_tensors.__version__, transformers.__version__)'
}

current() {
    local d="$ENVS/current"; mkenv current
    # llmcompressor 0.14.0.1: install without deps (auto-round and friends are not needed for NVFP4).
    "$d/bin/pip" install -q --no-deps llmcompressor==0.14.0.1
    "$d/bin/pip" install -q compressed-tensors==0.19.0 "transformers>=5.17,<5.18" "datasets>=5.2,<5.3" \
        "accelerate>=1.15.0" "loguru>=0.7.2" "pyyaml>=6.0.1" "numpy>=2.0.0" "requests>=2.32.2" \
        "tqdm>=4.66.3" "nvidia-ml-py>=12.560.30" "pillow>=10.4.0" tokenizers safetensors psutil
    smoke current 'import llmcompressor, compressed_tensors, transformers; from llmcompressor import oneshot; print(llmcompressor.__version__, compressed_tensors.__version__, transformers.__version__)'
}

modelopt() {
    local d="$ENVS/modelopt"; mkenv modelopt
    # modelopt's hf extra pulls deepspeed/diffusers/peft...: take only what export needs.
    "$d/bin/pip" install -q nvidia-modelopt==0.47.0 requests "transformers>=4.57,<5.15" \
        "accelerate>=1.0.0" "datasets>=3.0.0" "huggingface_hub>=0.24.0" tokenizers safetensors
    smoke modelopt 'import modelopt, transformers; import modelopt.torch.quantization as mtq; from modelopt.torch.export import export_hf_checkpoint; print(modelopt.__version__, transformers.__version__)'
}

targets=("$@"); [ ${#targets[@]} -eq 0 ] && targets=(legacy current modelopt)
for t in "${targets[@]}"; do "$t"; done
