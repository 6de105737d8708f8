"""Memory contract of linear_logprob: fwd+bwd never comes near the size of the full (N, V) fp32 logits.

At N=8192, V=32768 the fp32 logits are 1 GiB; the extra peak memory of fwd+bwd must stay under a quarter of that.
On CPU the torch backend is measured in a fresh subprocess by its peak RSS (VmHWM after a reset through
/proc/self/clear_refs) above the RSS once inputs exist; on GPU the triton backend by torch.cuda.max_memory_allocated.
Also: the torch backend is no slower than naive eager (full logits) where eager fits.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from qlfast.ops.linear_logprob import linear_logprob
from qlfast.ref.linear_logprob import naive_linear_logprob
from qlfast.testing import one_triton_config

_one_config = one_triton_config()  # one autotune config per kernel on a GPU

N, V, H = 8192, 32768, 64
FULL_LOGITS = N * V * 4  # 1 GiB

_WORKER = r"""
import json, sys, torch
from qlfast.ops.linear_logprob import linear_logprob
N, V, H = map(int, sys.argv[1:4])
torch.manual_seed(0)
def rss(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
hidden = (torch.randn(N, H)).requires_grad_(True)
weight = (torch.randn(V, H) * 0.1).requires_grad_(True)
targets = torch.randint(0, V, (N,))
g = torch.randn(N)
# warm-up at a tiny size: loads kernels, thread pools and allocator arenas outside the measurement
lp, ent = linear_logprob(hidden[:64], weight[:512], targets[:64] % 512, return_entropy=True, backend="torch")
((lp + ent) * g[:64]).sum().backward()
hidden.grad = weight.grad = None
base = rss("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
lp, ent = linear_logprob(hidden, weight, targets, temperature=0.7, return_entropy=True, backend="torch")
((lp + ent) * g).sum().backward()
assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
print(json.dumps({"extra": rss("VmHWM:") - base}))
"""


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _can_reset_hwm(), reason="needs /proc peak-RSS reset")
def test_torch_backend_cpu_peak_memory_under_quarter_of_logits():
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", _WORKER, str(N), str(V), str(H)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    extra = json.loads(proc.stdout.strip().splitlines()[-1])["extra"]
    assert extra < FULL_LOGITS / 4, f"extra peak RSS {extra / 2**20:.0f} MiB >= {FULL_LOGITS / 4 / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_triton_backend_gpu_peak_memory_under_quarter_of_logits():
    torch.manual_seed(0)
    hidden = torch.randn(N, H, device="cuda").requires_grad_(True)
    weight = (torch.randn(V, H, device="cuda") * 0.1).requires_grad_(True)
    targets = torch.randint(0, V, (N,), device="cuda")
    g = torch.randn(N, device="cuda")
    lp, ent = linear_logprob(hidden, weight, targets, return_entropy=True, backend="triton")  # compile/autotune
    ((lp + ent) * g).sum().backward()
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lp, ent = linear_logprob(hidden, weight, targets, temperature=0.7, return_entropy=True, backend="triton")
    ((lp + ent) * g).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < FULL_LOGITS / 4, f"extra peak {extra / 2**20:.0f} MiB >= {FULL_LOGITS / 4 / 2**20:.0f} MiB"


def _median_time(fn, reps=3):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def test_torch_backend_cpu_not_slower_than_naive_eager():
    torch.manual_seed(0)
    n, v, h = 1024, 8192, 128
    hidden = torch.randn(n, h).requires_grad_(True)
    weight = (torch.randn(v, h) * 0.1).requires_grad_(True)
    targets = torch.randint(0, v, (n,))
    g = torch.randn(n)

    def step(fn):
        lp, ent = fn()
        ((lp + ent) * g).sum().backward()
        hidden.grad = weight.grad = None

    ours = _median_time(lambda: step(lambda: linear_logprob(hidden, weight, targets, temperature=0.7,
                                                            return_entropy=True, backend="torch")))
    naive = _median_time(lambda: step(lambda: naive_linear_logprob(hidden, weight, targets, 0.7, True)))
    assert ours <= 1.2 * naive, f"torch backend {ours * 1e3:.0f} ms > 1.2 x naive eager {naive * 1e3:.0f} ms"
