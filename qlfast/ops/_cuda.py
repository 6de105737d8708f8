"""The `cuda` backend: thin wrappers over the qlfast._C extension's torch.ops.qlfast.* and their fake kernels.

    from qlfast.ops import _cuda
    if _cuda.available():
        logprob, entropy, lse = _cuda.linear_logprob_fwd(hidden, weight, targets, inv_temp, with_entropy)

Ops (csrc/, registered with torch.library so they trace under torch.compile and FSDP2):
    qlfast::linear_logprob_fwd(hidden, weight, targets, inv_temp, with_entropy) -> (logprob, entropy, lse)
        cuBLAS chunk GEMM over the vocabulary + one epilogue pass per chunk (online LSE, target logit, entropy).
        Extra memory: one (N, Vc) logits chunk in the input dtype (<= 512 MiB) + O(N) fp32 row state.
        The op always returns an entropy tensor, empty (0,) when not asked; the wrapper turns that into None.
    qlfast::linear_logprob_bwd(hidden, weight, targets, lse, entropy?, grad_logprob?, grad_entropy?, inv_temp)
        -> (dhidden, dweight): recompute each chunk, dlogits in place, dW[chunk] in one GEMM (fp32 accumulation in
        cuBLAS, written once), dhidden in an (N, H) fp32 accumulator. Extra memory: (N, Vc) + (N, H) fp32.
    qlfast::attn_merge_(out, lse, block_out, block_lse) -> ()
        in-place LSE merge of ring attention's partial results (log-sigmoid form, -inf safe).
The Python contract is that of every linear_logprob backend (qlfast/ops/linear_logprob.py).
"""

from __future__ import annotations

import torch

from qlfast.ops import _dispatch

_OPS = ("linear_logprob_fwd", "linear_logprob_bwd", "attn_merge_")


_fakes_registered = False


def available(op: str = "linear_logprob_fwd") -> bool:
    """True when qlfast._C is built and registers torch.ops.qlfast.<op> (its fake kernels are then registered too)."""
    if not _dispatch.has_cuda_op(op):
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Fake (meta) kernels: shapes and dtypes only, so torch.compile / FSDP2 can trace through the ops. Idempotent."""
    global _fakes_registered
    if _fakes_registered or not all(hasattr(torch.ops.qlfast, op) for op in _OPS):
        return
    _fakes_registered = True

    @torch.library.register_fake("qlfast::linear_logprob_fwd")
    def _(hidden, weight, targets, inv_temp, with_entropy):
        n = hidden.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        return hidden.new_empty(n, **f32), hidden.new_empty(n if with_entropy else 0, **f32), hidden.new_empty(n, **f32)

    @torch.library.register_fake("qlfast::linear_logprob_bwd")
    def _(hidden, weight, targets, lse, entropy, grad_logprob, grad_entropy, inv_temp):
        return (torch.empty_like(hidden, memory_format=torch.contiguous_format),
                torch.empty_like(weight, memory_format=torch.contiguous_format))

    @torch.library.register_fake("qlfast::attn_merge_")
    def _(out, lse, block_out, block_lse):
        return None


if _dispatch.cuda_ext() is not None:
    _register_fakes()


def linear_logprob_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temp: float,
                       with_entropy: bool):
    """-> logprob (N,) fp32, entropy (N,) fp32 or None, lse (N,) fp32."""
    logprob, entropy, lse = torch.ops.qlfast.linear_logprob_fwd(hidden, weight, targets, float(inv_temp),
                                                                bool(with_entropy))
    return logprob, (entropy if with_entropy else None), lse


def linear_logprob_bwd(hidden, weight, targets, lse, entropy, grad_logprob, grad_entropy, inv_temp: float):
    """-> dhidden (N, H) in hidden's dtype, dweight (V, H) in weight's dtype; grad_logprob/grad_entropy may be None."""
    dhidden, dweight = torch.ops.qlfast.linear_logprob_bwd(hidden, weight, targets, lse, entropy, grad_logprob,
                                                           grad_entropy, float(inv_temp))
    return dhidden, dweight


def attn_merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """In place: out (T, H, D) fp32 and lse (H, T) fp32 absorb block_out (T, H, D) / block_lse (H, T)."""
    torch.ops.qlfast.attn_merge_(out, lse, block_out, block_lse)
