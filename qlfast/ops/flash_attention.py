"""qlfast.ops.flash_attention: varlen (packed) attention with GQA that returns its log-sum-exp.

    out, lse = flash_attention(q, k, v, cu_seqlens, causal=True)      # q (T, Hq, D), k/v (T, Hkv, D)

Memory contract: the triton backend never materialises the (L, L) scores: forward keeps an online softmax per
query tile (extra memory: lse (Hq, T) fp32); backward recomputes the score tiles from the saved lse (extra memory:
delta (Hq, T) fp32). The torch backend materialises scores per chunk of 1024 query rows.

Semantics are flash-attn's varlen ones: causal masks are bottom-right aligned when a sequence's q and kv lengths
differ, and a query row that sees no key gives out 0 and lse -inf. The low-level, non-autograd functions
`flash_attn_varlen_fwd` / `flash_attn_varlen_bwd` take separate q and kv ranges for ring attention; their backward
accepts the final merged out and lse of a ring.

Backends (TABLE below; qlfast/ops/_dispatch.py has the one rule for "auto"): "triton" (D in {64, 128}), "torch"
(the reference, anything), "flash_attn" when the flash-attn package is installed (CUDA only), and "sdpa" (CPU only,
any head dim: ATen's flash kernel for CPU over padded buckets; qlfast/ops/sdpa_varlen.py). auto: triton on CUDA
(flash_attn, then torch, for other head dims), sdpa on CPU (torch where sdpa cannot take the q/kv ranges).
"""

from __future__ import annotations

import importlib.util

import torch

from qlfast.ops import _dispatch
from qlfast.ops.sdpa_varlen import sdpa_varlen_bwd, sdpa_varlen_fwd
from qlfast.ref import attention as _ref

SUPPORTED_HEAD_DIMS = (64, 128)  # the triton kernels' D


def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _triton_supports(d: int | None = None, **_) -> str | None:
    if d is not None and d not in SUPPORTED_HEAD_DIMS:
        return f"head dim D must be one of {SUPPORTED_HEAD_DIMS}, got {d}"
    return None


def _flash_attn_supports(dtype=None, **_) -> str | None:
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes fp16/bf16, got {dtype}"
    return None


def _sdpa_supports(cu_q=None, cu_k=None, causal=True, **_) -> str | None:
    """ATen's CPU flash kernel over right-padded buckets: every sequence with queries needs keys, and a causal one
    needs Lq == Lk. The bounds are CPU tensors here, so reading them costs no device sync."""
    if cu_q is None or cu_k is None or cu_q is cu_k:
        return None
    lq, lk = cu_q.diff(), cu_k.diff()
    if bool(((lq > 0) & (lk == 0)).any()) or (causal and not torch.equal(lq, lk)):
        return "it needs Lk > 0 for every sequence with queries, and Lq == Lk when causal"
    return None


# Backends fastest first. CUDA: the triton kernels (docs/perf/flash_attention.md), then the flash-attn package where
# triton does not take the head dim, then the reference. CPU: ATen's CPU flash kernel ("sdpa", any head dim, with
# LSE; qlfast/ops/sdpa_varlen.py), then the reference (which takes any q/kv ranges); the Triton interpreter only when
# asked for. Every backend returns the LSE, which ring attention and shared-prompt attention merge by.
TABLE = _dispatch.Table(
    "flash_attention",
    [_dispatch.triton_backend("cpu", "cuda", supports=_triton_supports),
     _dispatch.Backend("flash_attn", ("cuda",),
                       lambda: None if _has_flash_attn() else "the flash_attn package is not installed",
                       _flash_attn_supports),
     _dispatch.Backend("sdpa", ("cpu",), supports=_sdpa_supports),
     _dispatch.TORCH],
    order={"cuda": ("triton", "flash_attn", "torch"), "cpu": ("sdpa", "torch", "triton")},
)


def _resolve(backend: str, q: torch.Tensor, cu_q=None, cu_k=None, causal=True) -> str:
    return TABLE.resolve(backend, q.device, d=q.shape[-1], dtype=q.dtype, cu_q=cu_q, cu_k=cu_k, causal=causal)


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, *, check_values: bool):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"flash_attention: q must be (Tq, Hq, D), k and v (Tk, Hkv, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    if k.shape != v.shape or k.shape[2] != d:
        raise ValueError(f"flash_attention: k and v must both be (Tk, Hkv, D={d}); got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
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
    if check_values:
        check_cu_seqlens(cu_seqlens_q, tq, "cu_seqlens_q")
        check_cu_seqlens(cu_seqlens_k, tk, "cu_seqlens_k")


def check_cu_seqlens(cu: torch.Tensor, total: int, name: str = "cu_seqlens") -> list[int]:
    """The bounds must rise from 0 to T (they cover the packed tokens); returns them as a list. One device sync:
    call once per batch (the model does), not per layer."""
    b = cu.tolist()
    if b[0] != 0 or b[-1] != total or any(b[i + 1] < b[i] for i in range(len(b) - 1)):
        raise ValueError(f"flash_attention: {name} must be non-decreasing from 0 to T={total} (it covers the "
                         f"packed tokens), got {b if len(b) <= 8 else b[:4] + ['...'] + b[-3:]}")
    return b


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
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, check_values=False)
    backend = _resolve(backend, q, cu_seqlens_q, cu_seqlens_k, causal)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _fwd_impl(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                     bool(causal), scale)


def flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                          softmax_scale, backend="auto"):
    """Non-autograd backward -> (dq, dk, dv) in q/k/v's dtypes. out and lse may be a ring's final merged ones."""
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, check_values=False)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != (q.shape[1], q.shape[0]):
        raise ValueError(f"flash_attn_varlen_bwd: dout and out must be (Tq, Hq, D) = {tuple(q.shape)} and lse "
                         f"(Hq, Tq) = {(q.shape[1], q.shape[0])}; got dout {tuple(dout.shape)}, out "
                         f"{tuple(out.shape)}, lse {tuple(lse.shape)}")
    backend = _resolve(backend, q, cu_seqlens_q, cu_seqlens_k, causal)
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


def flash_attention(q, k, v, cu_seqlens, *, max_seqlen=None, causal=True, softmax_scale=None, backend="auto",
                    check=True):
    """Attention over packed sequences, differentiable in q, k, v -> (out (T, Hq, D), lse (Hq, T) fp32).

    q (T, Hq, D), k and v (T, Hkv, D) with Hq a multiple of Hkv (GQA: query head h reads kv head h // (Hq/Hkv)),
    cu_seqlens int32 (S+1,) from 0 to T; causal within each sequence; softmax_scale defaults to 1/sqrt(D).
    max_seqlen (the longest sequence) is computed from cu_seqlens when not given.
    backend: "auto" | "triton" (D in {64, 128}) | "torch" | "flash_attn" (CUDA) | "sdpa" (CPU); auto picks as TABLE
    orders them for the device and inputs. lse is not differentiable. check=False skips reading cu_seqlens on the
    host (a device sync): a model checks once per batch (check_cu_seqlens) and passes max_seqlen, not per layer.
    """
    _validate(q, k, v, cu_seqlens, cu_seqlens, check_values=check)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must hold the same T tokens "
                         "(use flash_attn_varlen_fwd for separate q and kv ranges)")
    backend = _resolve(backend, q, causal=causal)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if max_seqlen is None:
        max_seqlen = _max_seqlen(cu_seqlens)
    return _FlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, int(max_seqlen),
                                 bool(causal), scale, backend)
