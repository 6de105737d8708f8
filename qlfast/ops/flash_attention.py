"""qlfast.ops.flash_attention: varlen (packed) attention with GQA that returns its log-sum-exp.

    out, lse = flash_attention(q, k, v, cu_seqlens, causal=True)      # q (T, Hq, D), k/v (T, Hkv, D)

Memory contract: the triton backend never materialises the (L, L) scores: forward keeps an online softmax per
query tile (extra memory: lse (Hq, T) fp32); backward recomputes the score tiles from the saved lse (extra memory:
delta (Hq, T) fp32). The torch backend materialises scores per chunk of 1024 query rows.

Semantics are flash-attn's varlen ones: causal masks are bottom-right aligned when a sequence's q and kv lengths
differ, and a query row that sees no key gives out 0 and lse -inf. The low-level, non-autograd functions
`flash_attn_varlen_fwd` / `flash_attn_varlen_bwd` take separate q and kv ranges for ring attention; their backward
accepts the final merged out and lse of a ring.

Backends: "auto" (triton on CUDA, torch on CPU), "triton", "torch", "flash_attn" when the flash-attn package is
installed (CUDA only), and "sdpa" (CPU only, any head dim: ATen's flash kernel for CPU over padded buckets; see
qlfast/ops/sdpa_varlen.py). Only "sdpa" takes head dims other than 64 and 128.
"""

from __future__ import annotations

import importlib.util

import torch

from qlfast.ops import _dispatch
from qlfast.ops.sdpa_varlen import sdpa_varlen_bwd, sdpa_varlen_fwd
from qlfast.ref import attention as _ref

SUPPORTED_HEAD_DIMS = (64, 128)


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _resolve(backend: str, device: torch.device) -> str:
    if backend == "sdpa":
        if device.type != "cpu":
            raise ValueError(f"flash_attention: backend='sdpa' runs ATen's CPU flash kernel; got {device} tensors")
        return backend
    if backend == "flash_attn":
        if device.type != "cuda" or not _has_flash_attn():
            raise ValueError("flash_attention: backend='flash_attn' needs CUDA tensors and the flash_attn package")
        return backend
    return _dispatch.resolve(backend, device, op="flash_attention")


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, *, check_values: bool, backend: str = "auto"):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"flash_attention: q must be (Tq, Hq, D), k and v (Tk, Hkv, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    if k.shape != v.shape or k.shape[2] != d:
        raise ValueError(f"flash_attention: k and v must both be (Tk, Hkv, D={d}); got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if d not in SUPPORTED_HEAD_DIMS and backend != "sdpa":
        raise ValueError(f"flash_attention: head dim D must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"flash_attention: Hq={hq} query heads must be a multiple of Hkv={hkv} kv heads (GQA)")
    if not q.is_floating_point() or q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"flash_attention: q, k, v must share a floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"flash_attention: {name} must be int32 of shape (S+1,) with S >= 1, got {cu.dtype} "
                             f"{tuple(cu.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"flash_attention: cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k "
                         f"{tuple(cu_seqlens_k.shape)} must describe the same number of sequences")
    devs = {t.device for t in (q, k, v, cu_seqlens_q, cu_seqlens_k)}
    if len(devs) != 1:
        raise ValueError(f"flash_attention: tensors on different devices: {sorted(map(str, devs))}")
    if not check_values:
        return
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, tq), ("cu_seqlens_k", cu_seqlens_k, tk)):
        b = cu.tolist()
        if b[0] != 0 or b[-1] != total or any(b[i + 1] < b[i] for i in range(len(b) - 1)):
            raise ValueError(f"flash_attention: {name} must be non-decreasing from 0 to T={total} (it covers the "
                             f"packed tokens), got {b if len(b) <= 8 else b[:4] + ['...'] + b[-3:]}")


def _max_seqlen(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max().item())


def _fwd_impl(backend, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    if backend == "sdpa":
        return sdpa_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    if backend == "torch":
        return _ref.forward(q, k, v, cu_q, cu_k, causal, scale)
    if backend == "triton":
        from qlfast.kernels import flash_attention as _tri

        return _tri.flash_attn_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
    return _flash_attn_pkg_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)


def _bwd_impl(backend, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    if backend == "sdpa":
        return sdpa_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)
    if backend == "torch":
        return _ref.backward(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale)
    if backend == "triton":
        from qlfast.kernels import flash_attention_bwd as _tri_bwd

        return _tri_bwd.flash_attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)
    return _flash_attn_pkg_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)


def _flash_attn_pkg_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_varlen_forward

    res = _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=scale,
                                     causal=causal)
    out, lse = res[0], res[1]  # flash-attn >= 2.6 returns (out, softmax_lse, S_dmask, rng_state)
    # flash-attn gives +inf for rows that see no key; our contract is -inf (and out 0, which it already is)
    return out, torch.where(torch.isinf(lse), float("-inf"), lse.float())


def _flash_attn_pkg_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse = torch.where(torch.isinf(lse), float("inf"), lse).contiguous()
    _flash_attn_varlen_backward(dout.contiguous(), q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k,
                                dropout_p=0.0, softmax_scale=scale, causal=causal, window_size_left=-1,
                                window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False)
    return dq, dk, dv


def flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale,
                          backend="auto"):
    """Non-autograd forward over separate q and kv ranges -> (out (Tq, Hq, D) q's dtype, lse (Hq, Tq) fp32).

    Sequence s attends q[cu_seqlens_q[s]:cu_seqlens_q[s+1]] to k/v[cu_seqlens_k[s]:cu_seqlens_k[s+1]]; causal is
    bottom-right aligned; rows that see no key give out 0, lse -inf. Validates shapes and dtypes only (no device
    sync): cu_seqlens must cover the tokens and max_seqlen_* must bound the sequence lengths.
    """
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, check_values=False, backend=backend)
    backend = _resolve(backend, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _fwd_impl(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                     bool(causal), scale)


def flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                          softmax_scale, backend="auto"):
    """Non-autograd backward -> (dq, dk, dv) in q/k/v's dtypes. out and lse may be a ring's final merged ones."""
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, check_values=False, backend=backend)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(f"flash_attn_varlen_bwd: dout and out must be (Tq, Hq, D) = {tuple(q.shape)} and lse "
                         f"(Hq, Tq) = {(q.shape[1], q.shape[0])}; got dout {tuple(dout.shape)}, out "
                         f"{tuple(out.shape)}, lse {tuple(lse.shape)}")
    backend = _resolve(backend, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v, out, dout = q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), dout.contiguous()
    return _bwd_impl(backend, dout, q, k, v, out, lse.contiguous(), cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                     int(max_seqlen_k), bool(causal), scale)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, scale, backend):
        out, lse = _fwd_impl(backend, q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.causal, ctx.scale, ctx.backend = max_seqlen, causal, scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu = ctx.saved_tensors
        dq, dk, dv = _bwd_impl(ctx.backend, dout.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_seqlen,
                               ctx.max_seqlen, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(q, k, v, cu_seqlens, *, max_seqlen=None, causal=True, softmax_scale=None, backend="auto"):
    """Attention over packed sequences, differentiable in q, k, v -> (out (T, Hq, D), lse (Hq, T) fp32).

    q (T, Hq, D), k and v (T, Hkv, D) with Hq a multiple of Hkv (GQA: query head h reads kv head h // (Hq/Hkv)),
    D in {64, 128}; cu_seqlens int32 (S+1,) from 0 to T; causal within each sequence; softmax_scale defaults to
    1/sqrt(D). max_seqlen (the longest sequence) is computed from cu_seqlens when not given.
    backend: "auto" | "triton" | "torch" | "flash_attn" | "sdpa" (CPU). lse is not differentiable.
    """
    _validate(q, k, v, cu_seqlens, cu_seqlens, check_values=True, backend=backend)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must hold the same T tokens "
                         "(use flash_attn_varlen_fwd for separate q and kv ranges)")
    backend = _resolve(backend, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if max_seqlen is None:
        max_seqlen = _max_seqlen(cu_seqlens)
    return _FlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, int(max_seqlen),
                                 bool(causal), scale, backend)
