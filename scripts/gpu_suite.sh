#!/usr/bin/env bash
# Both calls of the GPU proof back to back (scripts/gpu_proof.sh; docs/perf/proof.md), for a GPU machine without the
# lent machines' 10-minute command limit. On a lent H200 send `gpu_proof.sh 1` and `gpu_proof.sh 2` as two calls.
#   OUT=DIR QLFAST_COMMIT=<sha> bash scripts/gpu_suite.sh
# Liger-Kernel (a comparison provider) is not on the GPU image; fetch its pure-Python wheel here first and carry .whl:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5
set -uo pipefail
cd "$(dirname "$0")/.."
rc=0
bash scripts/gpu_proof.sh 1 || rc=1
bash scripts/gpu_proof.sh 2 || rc=1
exit $rc
