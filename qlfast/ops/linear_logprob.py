"""qlfast.ops.linear_logprob: per-token log-probs (and entropy) straight from hidden states and the LM head.

    logprob, entropy = linear_logprob(hidden, weight, targets, temperature=0.7, return_entropy=True)

Memory contract: the (N, V) logits are never materialised. The triton forward keeps an online log-sum-exp,
target logit and entropy per row in registers while it tiles the GEMM (extra memory O(N)); the cuda and torch
backends walk chunks of the logits (extra memory O(chunk x V)). Backward recomputes logit tiles from the saved
fp32 LSE (triton: one (N, Vc) dz chunk of <= 256 MiB at a time plus an fp32 (N, H) dh accumulator; see
kernels/linear_logprob.py). The LSE, entropy and dW accumulate in fp32 for every backend.

All three backends share one contract, so one autograd.Function serves them:
    fwd(hidden, weight, targets, inv_temp, with_entropy) -> (logprob, entropy | None, lse)
    bwd(hidden, weight, targets, lse, entropy, grad_logprob, grad_entropy, inv_temp) -> (dhidden, dweight)
"""

from __future__ import annotations

import torch

from qlfast.ops import _dispatch
from qlfast.ref import linear_logprob as _ref

IGNORE_INDEX = _ref.IGNORE_INDEX

# Backends fastest first. CUDA: triton was measured at 641 ms fwd+bwd on the 32B head (H100, docs/perf/
# linear_logprob.md) with fp32-exact log-probs; the cuda backend has no timing on a GPU yet, so it comes after triton
# until a row under bench/results/ shows it faster (scripts/gpu_proof.sh times both). CPU: the chunked torch reference
# (the Triton interpreter is correct but slow).
TABLE = _dispatch.Table(
    "linear_logprob",
    [_dispatch.triton_backend("cpu", "cuda"), _dispatch.cuda_backend("linear_logprob_fwd"), _dispatch.TORCH],
    order={"cuda": ("triton", "cuda", "torch"), "cpu": ("torch", "triton")},
)


def _impl(backend: str):
    if backend == "torch":
        return _ref.forward, _ref.backward
    if backend == "triton":
        from qlfast.kernels import linear_logprob as _tri

        return _tri.linear_logprob_fwd, _tri.linear_logprob_bwd
    from qlfast.ops import _cuda

    return _cuda.linear_logprob_fwd, _cuda.linear_logprob_bwd


class _LinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, with_entropy, backend):
        fwd, _ = _impl(backend)
        logprob, entropy, lse = fwd(hidden, weight, targets, inv_temp, with_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.inv_temp, ctx.backend = inv_temp, backend
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # an unused output (say entropy) gets None: its backward term is skipped
        return logprob, entropy, lse

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy, _grad_lse):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        if grad_logprob is None and grad_entropy is None:
            return None, None, None, None, None, None
        _, bwd = _impl(ctx.backend)
        dhidden, dweight = bwd(hidden, weight, targets, lse, entropy, grad_logprob, grad_entropy, ctx.inv_temp)
        return (dhidden if ctx.needs_input_grad[0] else None, dweight if ctx.needs_input_grad[1] else None,
                None, None, None, None)


def _validate(hidden, weight, targets, temperature):
    """Shapes, dtypes, devices: no device sync."""
    if hidden.dim() != 2:
        raise ValueError(f"linear_logprob: hidden must be (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_logprob: weight must be (V, H) = (V, {hidden.shape[1]}) to match hidden (N, H) = "
                         f"{tuple(hidden.shape)}, got {tuple(weight.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"linear_logprob: hidden and weight must share a floating dtype, got {hidden.dtype} and "
                         f"{weight.dtype}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"linear_logprob: targets must be (N,) = ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_logprob: targets must be int64 (or int32) token ids, got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"linear_logprob: tensors on different devices: hidden {hidden.device}, weight "
                         f"{weight.device}, targets {targets.device}")
    if not temperature > 0:
        raise ValueError(f"linear_logprob: temperature must be > 0, got {temperature}")


def bad_targets(targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """(N,) bool on the targets' device: ids outside [0, V) that are not the ignore index (no device sync)."""
    return (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))


def raise_bad_target(targets: torch.Tensor, bad: torch.Tensor, vocab: int):
    i = int(bad.nonzero()[0, 0])
    raise ValueError(f"linear_logprob: targets[{i}] = {int(targets[i])} is outside [0, V={vocab}) and is not the "
                     f"ignore index {IGNORE_INDEX}")


def _check_targets(targets, vocab):
    """One device sync: the target ids are in range."""
    if targets.numel():
        bad = bad_targets(targets, vocab)
        if bool(bad.any()):
            raise_bad_target(targets, bad, vocab)


def linear_logprob_with_lse(hidden, weight, targets, *, temperature=1.0, return_entropy=False, backend="auto",
                            check=True):
    """Like linear_logprob but also returns the fp32 log-sum-exp (N,): (logprob, entropy | None, lse)."""
    _validate(hidden, weight, targets, temperature)
    if check:
        _check_targets(targets, weight.shape[0])
    backend = TABLE.resolve(backend, hidden.device)
    targets = targets.long()
    if hidden.shape[0] == 0:
        empty = hidden.new_empty(0, dtype=torch.float32)
        ent = empty.clone() if return_entropy else None
        # keep the graph connected so that .backward() on an empty batch works and gives zero gradients
        zero = (hidden.sum() + weight.sum()) * 0.0
        return empty + zero, (ent + zero if ent is not None else None), empty.clone()
    hidden, weight = hidden.contiguous(), weight.contiguous()
    return _LinearLogprob.apply(hidden, weight, targets.contiguous(), 1.0 / float(temperature), return_entropy,
                                backend)


def linear_logprob(hidden, weight, targets, *, temperature=1.0, return_entropy=False, backend="auto", check=True):
    """Log-prob of `targets` under softmax(hidden @ weight.T / temperature), without building the logits.

    hidden (N, H), weight (V, H) same float dtype, targets (N,) int64 with -100 as ignore index (those rows give
    logprob 0, entropy 0, zero gradient). Returns logprob (N,) fp32, and entropy (N,) fp32 if return_entropy.
    backend: "auto" | "triton" | "cuda" | "torch" (qlfast.ops._dispatch: auto is the first of TABLE.order for the
    device). check=False skips the one device sync that checks the target ids (shapes are always checked).
    """
    logprob, entropy, _ = linear_logprob_with_lse(hidden, weight, targets, temperature=temperature,
                                                  return_entropy=return_entropy, backend=backend, check=check)
    return (logprob, entropy) if return_entropy else logprob
