"""Benchmark of qlfast.ops.linear_logprob against naive eager, torch.compile and Liger's fused linear cross-entropy.

    pytest bench/test_bench_linear_logprob.py            # GPU: real shapes (QwenLong-L1-32B / 7B LM heads), bf16
    QLFAST_BENCH_SIZE=small pytest bench/...             # CPU-sized shapes anywhere

FLOPs: 2NHV forward, 8NHV forward + backward (the backward recomputes the logits: 2NHV more than the 6NHV of autograd).
A provider that would not fit (naive eager at N=60000, V=152064 needs ~128 GB) records a row with a `status` saying
why instead of crashing. Liger's loss computes its gradients inside the forward, so only its fwd+bwd row compares.
"""

import importlib.util
import math

import harness
import pytest
import torch

from qlfast.ops import _dispatch
from qlfast.ops.linear_logprob import linear_logprob
from qlfast.ref.linear_logprob import naive_linear_logprob

OP = "linear_logprob"
REAL = harness.real_sizes()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
if REAL:
    SHAPES = [(60000, 5120, 152064), (60000, 3584, 152064)]
else:
    SHAPES = [(512, 128, 4096)]
TINY = (64, 32, 512)  # the Triton interpreter is far slower than the kernels it runs: CPU triton rows use this
PROVIDERS = ["qlfast-triton", "qlfast-cuda", "qlfast-torch", "naive", "compile", "liger"]
MODES = ["fwd", "fwd+bwd"]
_compiled = {}


def _skip(provider, shape, mode, status):
    n, h, v = shape
    nan = float("nan")
    harness.record(OP, provider, {"N": n, "H": h, "V": v, "dtype": str(DTYPE)}, mode,
                   {"median_ms": nan, "min_ms": nan, "reps": 0, "peak_bytes": 0}, extra={"status": status})
    pytest.skip(status)


def _fn(provider, mode, hidden, weight, targets, g):
    """The callable to time, or a string saying why this provider cannot run here."""
    if provider.startswith("qlfast-"):
        backend = provider.split("-", 1)[1]
        if backend == "cuda" and not _dispatch.has_cuda_op("linear_logprob_fwd"):
            return "qlfast._C has no linear_logprob_fwd (extension not built)"
        if backend == "cuda" and DEVICE != "cuda":
            return "needs a CUDA GPU"
        op = lambda: linear_logprob(hidden, weight, targets, return_entropy=True, backend=backend)
    elif provider == "naive":
        op = lambda: naive_linear_logprob(hidden, weight, targets, 1.0, True)
    elif provider == "compile":
        if DEVICE != "cuda":
            return "cpu: inductor's compile time dwarfs the op at bench sizes here"
        if "naive" not in _compiled:
            _compiled["naive"] = torch.compile(naive_linear_logprob)
        op = lambda: _compiled["naive"](hidden, weight, targets, 1.0, True)
    elif provider == "liger":
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger_kernel is not installed"
        if DEVICE != "cuda":
            return "liger needs a CUDA GPU"
        if mode == "fwd":
            return "liger computes gradients inside its forward: only fwd+bwd compares"
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger():
            loss_fn(weight, hidden, targets).backward()
            hidden.grad = weight.grad = None

        return liger
    else:
        raise ValueError(provider)
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return op()
        return fwd

    def fwd_bwd():
        lp, ent = op()
        ((lp + 0.01 * ent) * g).sum().backward()
        hidden.grad = weight.grad = None

    return fwd_bwd


def _predicted_bytes(provider, n, h, v):
    """Rough working set: naive eager keeps ~4 (N, V) fp32 arrays (logits, log-softmax, softmax, grad)."""
    if provider in ("naive", "compile"):
        return n * v * (DTYPE.itemsize + 4 * (4 if provider == "naive" else 2))
    return 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bench_linear_logprob(benchmark, shape, provider, mode):
    if provider == "qlfast-triton" and DEVICE == "cpu":
        shape = TINY
    n, h, v = shape
    if DEVICE == "cuda":
        free = harness.free_bytes()  # after emptying the cache: what is really free
        need = _predicted_bytes(provider, n, h, v)
        if need > 0.9 * free:
            _skip(provider, shape, mode, f"skipped: oom predicted ({need / 2**30:.0f} GiB > {free / 2**30:.0f} free)")
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=DEVICE, dtype=DTYPE).requires_grad_(mode != "fwd")
    weight = (torch.randn(v, h, device=DEVICE) * (1.0 / math.sqrt(h))).to(DTYPE).requires_grad_(mode != "fwd")
    targets = torch.randint(0, v, (n,), device=DEVICE)
    g = torch.randn(n, device=DEVICE)
    fn = _fn(provider, mode, hidden, weight, targets, g)
    if isinstance(fn, str):
        _skip(provider, shape, mode, f"skipped: {fn}")
    flops = (2 if mode == "fwd" else 8) * n * h * v
    slow = provider == "qlfast-triton" and DEVICE == "cpu"
    _, oom = harness.guarded(harness.bench, benchmark, OP, provider, {"N": n, "H": h, "V": v, "dtype": str(DTYPE)},
                             mode, fn, flops=flops, warmup=1 if slow else 2, rep=2 if slow else 5)
    if oom is not None:  # outside any except block: nothing keeps this item's tensors alive
        del fn, hidden, weight
        harness.free_device_memory()
        _skip(provider, shape, mode, f"skipped: oom ({oom})")
