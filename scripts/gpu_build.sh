#!/usr/bin/env bash
# Builds qlfast._C (csrc/) in place on a CUDA machine and prints the build time; QLFAST_BENCH=1 then also times the
# cuda linear_logprob fwd+bwd at the real shapes (bf16, N=60000, V=152064, H=5120 and 3584) and the peak memory.
#   bash scripts/gpu_build.sh                 # build only
#   QLFAST_BENCH=1 bash scripts/gpu_build.sh  # build, then time (QLFAST_CUDA_CHUNK_MB=... to try other chunk sizes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export QLFAST_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
start=$(date +%s)
"$PY" setup.py build_ext --inplace 2>&1 | grep -v -E "^(copying|creating|running|writing)" || { echo "build failed"; exit 1; }
echo "qlfast._C built in $(( $(date +%s) - start )) s"
"$PY" -c "import torch; from qlfast import _C; print('ops:', torch.ops.qlfast.linear_logprob_fwd, torch.ops.qlfast.attn_merge_)"
[[ "${QLFAST_BENCH:-0}" == "1" ]] || exit 0
"$PY" - <<'PYEOF'
import torch
from qlfast.ops import _cuda

def timed(fn, reps=3):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]

print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
for n, h, v in [(60000, 5120, 152064), (60000, 3584, 152064)]:
    hid = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(v, h, device="cuda") * h**-0.5).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), device="cuda")
    g = torch.randn(n, device="cuda")
    out = {}
    fwd = lambda: out.update(r=_cuda.linear_logprob_fwd(hid, w, t, 1.0, True))
    t_f = timed(fwd)
    lp, ent, lse = out["r"]
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    t_b = timed(lambda: _cuda.linear_logprob_bwd(hid, w, t, lse, ent, g, g, 1.0))
    peak = (torch.cuda.max_memory_allocated() - base - hid.nbytes - w.nbytes) / 2**30  # minus the dh, dw outputs
    wc = w[:4352]
    t_mm = timed(lambda: hid @ wc.T, reps=5)
    fl = 8 * n * h * v
    print(f"N={n} H={h} V={v}: fwd {t_f:.1f} ms, bwd {t_b:.1f} ms, fwd+bwd {t_f + t_b:.1f} ms "
          f"({fl / (t_f + t_b) / 1e9:.0f} TFLOP/s of 8NHV), bwd extra peak {peak:.2f} GiB; "
          f"one chunk GEMM (N x 4352 x H) {t_mm:.2f} ms = {2 * n * h * 4352 / t_mm / 1e9:.0f} TFLOP/s")
    del hid, w, out, lp, ent, lse
PYEOF
