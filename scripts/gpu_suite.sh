#!/usr/bin/env bash
# The whole GPU suite in one call on a lent H100/H200: build qlfast._C, run the gpu-marked tests, run bench/ at real
# sizes. Logs and bench rows go to $OUT (or ./gpu-out). Usage: bash scripts/gpu_suite.sh [pytest -k expr for bench]
# Liger-Kernel (a comparison provider) is not on the GPU image; fetch its pure-Python wheel here first and carry .whl:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl liger-kernel==0.8.5
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
t0=$(date +%s)
QLFAST_BUILD_CUDA=${QLFAST_BUILD_CUDA:-1} MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps --no-index -e . \
  > "$OUT/build.log" 2>&1; echo "build rc=$? in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.txt"
tail -5 "$OUT/build.log"
$PY -c "import qlfast.ops._dispatch as d; print('qlfast._C loaded:', d.cuda_ext() is not None)" 2>&1 | tee -a "$OUT/env.txt"
if [[ "${SKIP_TESTS:-0}" != "1" ]]; then
  timeout ${TEST_TIMEOUT:-900} $PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [[ "${SKIP_BENCH:-0}" != "1" ]]; then
  QLFAST_BENCH_RESULTS=$OUT QLFAST_BENCH_SIZE=real timeout ${BENCH_TIMEOUT:-1800} $PY -m pytest -q bench -p no:cacheprovider \
    --benchmark-disable-gc ${1:+-k "$1"} 2>&1 | tee "$OUT/bench.log" | tail -60
fi
