"""Ulysses sequence parallelism (Jacobs et al. 2023, "DeepSpeed Ulysses"): all-to-all from sequence shards to head
shards, full-sequence attention on the local heads, all-to-all back.

    out = ulysses_attention(q, k, v, plan.cu_seqlens, plan.max_seqlen, group=sp_group)

Rank r holds tokens [r T/W, (r+1) T/W) of the packed (padded) batch (sharding.contiguous_plan). One all-to-all
turns q, k, v (T/W, H, D) into (T, H/W, D): rank r receives heads [r H/W, (r+1) H/W) of every token. GQA: query
head h reads kv head h // (Hq/Hkv), so with W <= Hkv (W dividing Hkv) rank r's query heads read exactly its kv
heads; with W > Hkv the kv heads are first replicated W/Hkv times (repeat_interleave, whose backward sums the
copies' gradients), giving each rank the one kv head its query heads need. q, k and v travel in one all-to-all
(concatenated per destination rank); the output takes a second one back. Both are autograd Functions whose
backward is the inverse all-to-all.

Memory contract: per rank, the (T, (Hq + 2 Hkv')/W, D) head-sharded q/k/v and the (T, Hq/W, D) output, where
Hkv' = max(Hkv, W); attention itself is qlfast.ops.flash_attention's (no (T x T) scores on the triton backend).
Communication per rank per layer: forward (W-1)/W of the local q, k, v and out; backward the same again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from qlfast.ops.flash_attention import flash_attention
from qlfast.parallel.sharding import check_same_across_ranks, check_ulysses_heads


def _a2a(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)  # after .contiguous(): empty_like keeps a transposed input's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_head(x: torch.Tensor, group) -> torch.Tensor:
    # (t, W, h, D) with x[:, p] the heads destined for rank p -> (W t, h, D): every rank's tokens, our heads
    t, w, h, d = x.shape
    return _a2a(x.transpose(0, 1), group).reshape(w * t, h, d)


def _head_to_seq(x: torch.Tensor, group, w: int) -> torch.Tensor:
    # (W t, h, D): all tokens, our heads -> (t, W, h, D): our tokens, every rank's heads (rank p's at [:, p])
    tw, h, d = x.shape
    return _a2a(x.reshape(w, tw // w, h, d), group).transpose(0, 1)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.w = group, x.shape[1]
        return _seq_to_head(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _head_to_seq(grad, ctx.group, ctx.w), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, w):
        ctx.group = group
        return _head_to_seq(x, group, w)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_head(grad, ctx.group), None, None


def seq_to_head(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-to-all: (T/W, H, D) sequence shard -> (T, H/W, D) head shard (ranks' pieces in rank order)."""
    return _SeqToHead.apply(x, group)


def head_to_seq(x: torch.Tensor, group, w: int) -> torch.Tensor:
    """The inverse of seq_to_head for a group of w ranks: (T, H/W, D) -> (T/W, H, D)."""
    return _HeadToSeq.apply(x, group, w)


def _validate(q, k, v, cu, w, check, group):
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"ulysses_attention: q must be (T/W, Hq, D) and k, v (T/W, Hkv, D) on the same tokens; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"ulysses_attention: cu_seqlens (the global packing) must be int32 (S+1,), got {cu.dtype} "
                         f"{tuple(cu.shape)}")
    if check:
        total, err = int(cu[-1]), None
        if total != q.shape[0] * w:
            err = (f"ulysses_attention: cu_seqlens covers T={total} tokens but W={w} ranks x T/W={q.shape[0]} "
                   f"local tokens = {q.shape[0] * w}; pass the padded global packing "
                   f"(sharding.contiguous_plan(...).cu_seqlens)")
        check_same_across_ranks(cu, group, what="ulysses_attention: cu_seqlens", local_error=err)


def ulysses_attention(q, k, v, cu_seqlens, max_seqlen=None, *, group=None, causal=True, softmax_scale=None,
                      backend="auto", check=True, prefix=None):
    """Ulysses attention over `group` (default: the world), differentiable in q, k, v -> out (T/W, Hq, D).

    q (T/W, Hq, D), k and v (T/W, Hkv, D): this rank's contiguous shard (sharding.contiguous_plan) of a packed
    batch of T tokens; cu_seqlens int32 (S+1,) and max_seqlen: the GLOBAL packing (the plan's cu_seqlens and
    max_seqlen). Hq must be divisible by W; W must divide Hkv or Hkv divide W. backend selects the single-device
    attention. check=True validates cu_seqlens and compares it across ranks (one host sync, a tiny all_gather).
    prefix: a qlfast.ops.SharedPrefix over the global packing (prompt-shared GRPO groups): after the all-to-all every
    rank holds all tokens of its heads, so the shared-prompt attention runs there unchanged (causal only).
    """
    if not dist.is_initialized():
        raise ValueError("ulysses_attention: torch.distributed is not initialised (launch with torchrun)")
    w = dist.get_world_size(group)
    _validate(q, k, v, cu_seqlens, w, check, group)
    t, hq, d = q.shape
    rep = check_ulysses_heads(hq, k.shape[1], w)
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    hq_l, hk_l = hq // w, k.shape[1] // w
    # one all-to-all for q, k, v: per destination rank p, its q heads then its k heads then its v heads
    qkv = torch.cat([q.reshape(t, w, hq_l, d), k.reshape(t, w, hk_l, d), v.reshape(t, w, hk_l, d)], dim=2)
    qkv = _SeqToHead.apply(qkv, group)  # (T, hq_l + 2 hk_l, D)
    qh, kh, vh = qkv.split([hq_l, hk_l, hk_l], dim=1)
    if prefix is not None:
        if not causal:
            raise ValueError("ulysses_attention: prefix (shared-prompt attention) is causal; got causal=False")
        from qlfast.ops.shared_prefix import check_layout, shared_prefix_attention

        if check:
            check_layout(cu_seqlens, prefix, qh.shape[0])
        out, _ = shared_prefix_attention(qh, kh, vh, cu_seqlens, prefix, max_seqlen=max_seqlen,
                                         softmax_scale=softmax_scale, backend=backend, check=False)
    else:
        # the trainer passes check=False (it checks the plan once per batch): then no host read per layer
        out, _ = flash_attention(qh, kh, vh, cu_seqlens, max_seqlen=max_seqlen, causal=causal,
                                 softmax_scale=softmax_scale, backend=backend, check=check)  # (T, hq_l, D)
    return _HeadToSeq.apply(out, group, w).reshape(t, hq, d)
