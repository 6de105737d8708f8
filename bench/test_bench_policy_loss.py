"""Benchmark: GRPO/DAPO policy loss fwd+bwd (loss -> dhidden, dweight), time and peak memory.

GPU (real sizes): N = 16384 and 60000 packed tokens, H = 5120, V = 152064 (Qwen2.5-32B head), bf16, DAPO config
(token-mean, clip 0.2/0.28, old log-probs given, entropy metric on). Providers:
  qlfast-{triton,cuda,torch}   qlfast.ops.policy_loss (cuda only when torch.ops.qlfast has linear_logprob_fwd)
  qlfast-triton-noentropy      the same without the entropy metric (entropy_metric=False)
  linear_logprob-{triton,...}  bare linear_logprob fwd+bwd: the floor the loss should stay within 1.1x of
  naive                        eager full logits: h @ W^T, log_softmax, gather, the loss (qlfast.ref.policy_loss);
                               an OOM is recorded as a row with "oom": true instead of failing
  liger                        Liger-Kernel's LigerFusedLinearGRPOLoss (loss_type="dapo", beta=0) if importable
CPU: tiny sizes, torch providers only (the Triton interpreter's times mean nothing).

FLOPs counted as 6 N H V (forward GEMM + the two backward GEMMs) for every provider, so TFLOP/s compare; the
fused providers also recompute the logits in backward (8 N H V executed).

    pytest bench/test_bench_policy_loss.py
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from harness import bench, guarded, real_sizes, record

from qlfast.ops._dispatch import has_cuda_op
from qlfast.ops.linear_logprob import linear_logprob
from qlfast.ops.policy_loss import PolicyLossConfig, policy_loss
from qlfast.ref.policy_loss import policy_loss_reference

ON_GPU = torch.cuda.is_available()
if real_sizes():
    SHAPES = [dict(N=16384, H=5120, V=152064, S=4), dict(N=60000, H=5120, V=152064, S=4)]
    DTYPE = torch.bfloat16
    PROVIDERS = ["qlfast-triton", "qlfast-triton-noentropy", "qlfast-cuda", "qlfast-torch", "linear_logprob-triton",
                 "linear_logprob-cuda", "naive", "liger"]
else:
    SHAPES = [dict(N=384, H=64, V=2000, S=4)]
    DTYPE = torch.bfloat16 if ON_GPU else torch.float32
    PROVIDERS = ["qlfast-torch", "linear_logprob-torch", "naive", "liger"]
CONFIG = PolicyLossConfig(clip_low=0.2, clip_high=0.28)


def _inputs(shape, device):
    n, h, v, s = shape["N"], shape["H"], shape["V"], shape["S"]
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=DTYPE, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device=device, dtype=DTYPE, generator=g) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device, generator=g)
    seq = torch.arange(n, device=device) * s // n  # S equal sequences
    advantages = torch.randn(s, device=device, generator=g)[seq]
    mask = (torch.arange(n, device=device) % (n // s)) >= (n // s) // 10  # a short prompt prefix per sequence
    old = -torch.rand(n, device=device, generator=g) * 12  # behaviour log-probs around a random policy's
    return hidden, weight, targets, advantages, mask, old


def _make_fn(provider, shape, hidden, weight, targets, advantages, mask, old):
    """-> a callable running forward + backward to (dhidden, dweight)."""
    leaves = (hidden, weight)
    if provider.startswith("qlfast-"):
        backend = provider.split("-")[1]
        if backend == "cuda" and not has_cuda_op("linear_logprob_fwd"):
            pytest.skip("qlfast._C has no linear_logprob_fwd")
        if backend == "triton" and importlib.util.find_spec("qlfast.kernels.linear_logprob") is None:
            pytest.skip("qlfast/kernels/linear_logprob.py not there")
        cfg = PolicyLossConfig(clip_low=0.2, clip_high=0.28, entropy_metric=not provider.endswith("noentropy"))
        return lambda: torch.autograd.grad(policy_loss(hidden, weight, targets, advantages, mask, old_logprob=old,
                                                       config=cfg, backend=backend)[0], leaves)
    if provider.startswith("linear_logprob-"):
        backend = provider.split("-")[1]
        if backend == "cuda" and not has_cuda_op("linear_logprob_fwd"):
            pytest.skip("qlfast._C has no linear_logprob_fwd")
        grad = torch.randn(hidden.shape[0], device=hidden.device) * 1e-4
        return lambda: torch.autograd.grad(linear_logprob(hidden, weight, targets, backend=backend), leaves, grad)
    if provider == "naive":
        return lambda: torch.autograd.grad(policy_loss_reference(hidden, weight, targets, advantages, mask,
                                                                 old_logprob=old, config=CONFIG)[0], leaves)
    if provider == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError:
            pytest.skip("liger-kernel not installed")
        s, t = shape["S"], shape["N"] // shape["S"]
        loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28,
                                           loss_type="dapo")
        adv_seq = advantages.view(s, t)[:, 0].contiguous()

        def fn():
            out = loss_fn(hidden.view(s, t, -1), weight, targets.view(s, t), mask.view(s, t).long(), adv_seq,
                          old_per_token_logps=old.view(s, t))
            return torch.autograd.grad(out[0] if isinstance(out, tuple) else out, leaves)

        return fn
    raise ValueError(provider)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s['N']}-H{s['H']}-V{s['V']}")
def test_bench_policy_loss(benchmark, shape, provider):
    device = "cuda" if ON_GPU else "cpu"
    if shape["N"] % shape["S"]:
        raise ValueError("N must be a multiple of S")
    inputs = _inputs(shape, device)
    fn = _make_fn(provider, shape, *inputs)
    row_shape = {**shape, "dtype": str(DTYPE).split(".")[-1]}
    flops = 6.0 * shape["N"] * shape["H"] * shape["V"]
    _, oom = guarded(fn)
    if oom is not None:  # outside the except block: no frame of fn keeps its tensors alive
        del fn, inputs
        record("policy_loss", provider, row_shape, "fwd+bwd",
               {"median_ms": float("nan"), "min_ms": float("nan"), "reps": 0, "peak_bytes": 0}, extra={"oom": True})
        pytest.skip(f"{provider}: out of memory at {row_shape} (recorded as an oom row)")
    bench(benchmark, "policy_loss", provider, row_shape, "fwd+bwd", fn, flops=flops, warmup=2 if ON_GPU else 1,
          rep=8 if ON_GPU else 2)
