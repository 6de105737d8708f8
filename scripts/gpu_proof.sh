#!/usr/bin/env bash
# The GPU proof: two calls of at most ~9 minutes on one lent H200 (15 minutes of device time, machine start included),
# in stages of decreasing value, each with its own timeout, log and result rows in $OUT as soon as it ends, so a
# killed call still returns every earlier stage. docs/perf/proof.md says what each stage measures.
#
#   bash scripts/gpu_proof.sh --plan                               # one line per stage with its budget; total
#   OUT=DIR QLFAST_COMMIT=<sha> bash scripts/gpu_proof.sh 1        # on the GPU; then `... 2` right after (warm)
#   QLFAST_PROOF_CPU=1 OUT=DIR bash scripts/gpu_proof.sh 1         # the CPU rehearsal, tiny sizes (CI runs 1 and 2)
#
# $OUT gets <call>-<stage>.log per stage, rows.jsonl (every measurement, bench/harness.py's rows) and status.tsv (one
# line per stage): at most 8 files per call, the device tool's limit. The exit code is non-zero if a stage failed.
# Env: PY (python; default python3, or .venv/bin/python in the rehearsal), QLFAST_COMMIT (the device copy has no
# .git), QLFAST_PROOF_DEADLINE (seconds per call, default 540: a stage's timeout is cut to what is left), .whl/*.whl
# (carried wheels, e.g. liger-kernel: installed to /tmp/site first), TRITON_CACHE_DIR (default /tmp/qlfast-triton).
set -uo pipefail
cd "$(dirname "$0")/.."

# call | stage | budget s | timeout s | what (budgets: docs/perf/proof.md derives them from compile counts and timings)
STAGES=(
  "1|env|20|60|versions, device; bf16 GEMM 8192^3 and 4 GiB copy ceilings (2 timed loops)"
  "1|build|120|240|setup.py build_ext: qlfast._C, 2 .cu + 1 .cpp with torch headers, MAX_JOBS=16 (~60-90 s)"
  "1|warm|0|150|22 Triton compiles (linear_logprob fwd 7, dz 2x7, attn_merge 1) on 12 processes BESIDE the build"
  "1|csrc|30|90|tests/test_csrc.py on the GPU: cuda linear_logprob + attn_merge vs float64 (needs build)"
  "1|kernels|90|240|bf16 gpu tests of every Triton kernel: one config each + every config once, ~80 compiles, 8 xdist"
  "1|linear_logprob|60|180|fwd, fwd+bwd at N=60000 H=5120 V=152064: triton (autotune 14 cfgs), cuda, liger; attn_merge"
  "2|env|15|60|versions; ceilings again (call 2 may land on a fresh machine)"
  "2|warm|45|150|98 Triton compiles (attention at 60K x 2 head layouts, the RL update's kernels) on 16 processes"
  "2|attention|90|240|causal fwd, fwd+bwd at L=61440, 40/8 and 28/4 heads: triton vs SDPA flash, cuDNN"
  "2|rl_update|150|330|one policy_update, Qwen2.5-7B shape, FSDP2 on 1 GPU, ckpt+offload, 48K-token shared group"
)
MACHINE_START=60  # device time to start the machine for call 1 (call 2 reuses it when sent within 30 s)

plan() {
  local total=$MACHINE_START
  local -A sub=()
  printf '%-5s %-15s %8s %9s  %s\n' call stage budget_s timeout_s what
  printf '%-5s %-15s %8s %9s  %s\n' 0 machine-start "$MACHINE_START" - "starting the lent machine (not a command)"
  for s in "${STAGES[@]}"; do
    IFS='|' read -r call name budget timeout what <<<"$s"
    printf '%-5s %-15s %8s %9s  %s\n' "$call" "$name" "$budget" "$timeout" "$what"
    total=$((total + budget))
    sub[$call]=$((${sub[$call]:-0} + budget))
  done
  echo "call 1: ${sub[1]} s of commands, call 2: ${sub[2]} s (deadline ${QLFAST_PROOF_DEADLINE:-540} s each)"
  echo "total: $total s"
}

if [[ "${1:-}" == "--plan" ]]; then plan; exit 0; fi
CALL=${1:-}
if [[ "$CALL" != "1" && "$CALL" != "2" ]]; then
  echo "usage: bash scripts/gpu_proof.sh --plan | 1 | 2   (QLFAST_PROOF_CPU=1 for the CPU rehearsal)" >&2
  exit 2
fi

CPU=${QLFAST_PROOF_CPU:-0}
if [[ -z "${PY:-}" ]]; then
  if [[ "$CPU" == "1" && -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT
export PYTHONUNBUFFERED=1 QLFAST_PROOF_CALL=$CALL QLFAST_BENCH_ROWS="$OUT/rows.jsonl"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/qlfast-triton}
if [[ -z "${QLFAST_COMMIT:-}" ]]; then
  QLFAST_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
fi
export QLFAST_COMMIT
if [[ "$CPU" == "1" ]]; then
  export QLFAST_DRIVER=none
elif command -v nvidia-smi >/dev/null; then
  QLFAST_DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)
  export QLFAST_DRIVER
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
DEADLINE=${QLFAST_PROOF_DEADLINE:-540}
T0=$(date +%s)
FAILED=0
WORKERS=$([[ "$CPU" == "1" ]] && echo 2 || echo 16)
XDIST=$("$PY" -c "import xdist" 2>/dev/null && [[ "$CPU" != "1" ]] && echo "-n 8" || echo "")
KERNEL_TESTS="tests/test_flash_attention.py tests/test_linear_logprob.py tests/test_linear_logprob_memory.py \
tests/test_policy_loss.py tests/test_attn_merge.py tests/test_shared_prefix.py tests/test_model.py"

budget_of() {  # budget and timeout of stage $1 in this call
  for s in "${STAGES[@]}"; do
    IFS='|' read -r call name budget timeout _ <<<"$s"
    if [[ "$call" == "$CALL" && "$name" == "$1" ]]; then echo "$budget $timeout"; return; fi
  done
}

# run_stage NAME CMD...: the command under its timeout (cut to the call's deadline), its output in $OUT/<call>-NAME.log,
# a status line and a JSON row as soon as it ends.
run_stage() {
  local name=$1; shift
  local budget timeout left rc start secs status
  read -r budget timeout <<<"$(budget_of "$name")"
  left=$((DEADLINE - ($(date +%s) - T0) - 10))
  ((timeout > left)) && timeout=$left
  start=$(date +%s)
  if ((timeout < 5)); then
    rc=124; status="skipped: no time left in this call"
    echo "$status" >"$OUT/$CALL-$name.log"
  else
    timeout -k 10 "$timeout" bash -c '"$@"' _ "$@" >"$OUT/$CALL-$name.log" 2>&1  # functions are exported
    rc=$?
    status=$([[ $rc -eq 0 ]] && echo ok || { [[ $rc -eq 124 || $rc -eq 137 ]] && echo "timed out after ${timeout} s" \
      || echo "failed (rc=$rc)"; })
  fi
  secs=$(($(date +%s) - start))
  ((rc != 0)) && FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$CALL" "$name" "$rc" "$secs" "$budget" "$status" >>"$OUT/status.tsv"
  printf '{"op": "stage", "call": %s, "stage": "%s", "rc": %s, "seconds": %s, "budget_s": %s, "status": "%s", ' \
    "$CALL" "$name" "$rc" "$secs" "$budget" "$status" >>"$OUT/rows.jsonl"
  printf '"commit": "%s", "small": %s, "date": "%s"}\n' "$QLFAST_COMMIT" "$([[ $CPU == 1 ]] && echo true || echo false)" \
    "$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" >>"$OUT/rows.jsonl"
  echo "[$CALL/$name] $status in ${secs} s (budget ${budget} s)"
  return $rc
}

stage_env() {
  { date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; nproc; free -g 2>/dev/null | head -2; } || true
  "$PY" bench/proof.py env
}

stage_build() {
  local s rc
  s=$(date +%s)
  if [[ "$CPU" == "1" ]]; then
    QLFAST_BUILD_CUDA=auto "$PY" setup.py -q build_ext --inplace
  else
    QLFAST_BUILD_CUDA=1 MAX_JOBS=16 "$PY" setup.py build_ext --inplace
  fi
  rc=$?
  "$PY" bench/proof.py built "$rc" "$(($(date +%s) - s))"
}

stage_pytest() {  # stage_pytest NAME MARKER_EXPR PYTEST_ARGS...
  local name=$1 marks=$2 rc; shift 2
  "$PY" -m pytest -q -p no:cacheprovider ${marks:+-m "$marks"} --junitxml="$TMPD/$name.xml" "$@"
  rc=$?
  "$PY" bench/proof.py pytest "$name" "$TMPD/$name.xml" "$rc"
}

stage_csrc() {
  if [[ "$CPU" != "1" ]] && ! grep -q $'\tbuild\t0\t' "$OUT/status.tsv"; then
    echo "skipped: the build stage failed (qlfast._C is not there)"; return 1
  fi
  stage_pytest csrc gpu tests/test_csrc.py -k "not compiles"
}

stage_kernels() {  # the gpu tests with one config per kernel (QLFAST_TRITON_AUTOTUNE=0), then every config once
  local rc
  # shellcheck disable=SC2086
  QLFAST_TRITON_AUTOTUNE=0 stage_pytest kernels gpu $XDIST $KERNEL_TESTS
  rc=$?
  # the rehearsal runs two of them (the interpreter takes ~2 minutes for all; CI runs all in tests/)
  local pick=()
  [[ "$CPU" == "1" ]] && pick=(-k "listed_above or (linear_logprob_every_config and 0-float)")
  # shellcheck disable=SC2086
  stage_pytest kernel-configs "" $XDIST tests/test_triton_configs.py "${pick[@]}" || rc=1
  return $rc
}

export PY OUT CPU TMPD CALL XDIST KERNEL_TESTS
export -f stage_env stage_build stage_pytest stage_csrc stage_kernels

echo "gpu_proof call $CALL: commit $QLFAST_COMMIT, $([[ $CPU == 1 ]] && echo 'CPU rehearsal' || echo GPU), OUT=$OUT"
if [[ "$CALL" == "1" ]]; then
  run_stage env stage_env
  # the parallel compile runs beside nvcc (which keeps ~3 of the 16 cores busy)
  run_stage warm "$PY" bench/warm.py 1 --workers "$((WORKERS > 4 ? WORKERS - 4 : WORKERS))" &
  WARM_PID=$!
  run_stage build stage_build
  wait "$WARM_PID" || FAILED=1
  run_stage csrc stage_csrc
  run_stage kernels stage_kernels
  run_stage linear_logprob "$PY" bench/proof.py linear_logprob
else
  run_stage env stage_env
  run_stage warm "$PY" bench/warm.py 2 --workers "$WORKERS"
  run_stage attention "$PY" bench/proof.py attention
  run_stage rl_update "$PY" bench/rl_update.py
fi
echo "---- call $CALL: $(($(date +%s) - T0)) s; status ($OUT/status.tsv): call stage rc seconds budget status"
grep "^$CALL	" "$OUT/status.tsv"
exit $FAILED
