"""Ring attention with zigzag placement over a torch.distributed group (Liu et al. 2023 "Ring Attention"; the
zigzag schedule of zhuzilin/ring-flash-attention).

    out = ring_attention(q, k, v, plan.cu_seqlens_local, plan.max_seqlen_local, group=sp_group)

Placement (qlfast.parallel.sharding.zigzag_plan): every sequence is cut into 2W chunks; rank i holds chunks i and
2W-1-i of every sequence, packed as a varlen batch, so the local length of each sequence is even and its "first
half" is chunk i, its "second half" chunk 2W-1-i. K and V travel around the ring (rank i sends to i+1): at step s
rank i holds the kv of rank j = i - s (mod W), and under a causal mask:
    s = 0     local q vs local kv, causal (chunk i sees itself; chunk 2W-1-i sees chunk i and itself)
    j < i     all local q vs the first half of kv (chunk j), no mask (chunk 2W-1-j is after both of ours)
    j > i     the second half of local q (chunk 2W-1-i) vs all of kv, no mask (chunk i is before both of theirs)
so every step after the first costs the same half-block of work on every rank. Each step's (out, lse) merges into
fp32 accumulators in log-sigmoid form (qlfast.ops.attn_merge). The next kv block is posted with batch_isend_irecv
BEFORE the current block's compute, so the transfer overlaps it (on NCCL the p2p runs on its own stream).

Backward (ring-flash-attention's zigzag backward): k, v rotate as in forward and the dk/dv accumulators (fp32)
rotate with them, one step behind, so that after W hops each rank's accumulator has collected every rank's
contribution to its own kv. Every block calls flash_attn_varlen_bwd with the FINAL out and lse, which makes each
block's recomputed P its exact share of the final softmax (FlashAttention-2, Alg. 2).

Non-causal attention uses the same ring with full blocks at every step (no zigzag saving); its plan must not pad
(pad keys would be visible), see sharding.py.

Memory contract: per rank, besides q/k/v/out, the fp32 out and lse accumulators (T_l x Hq x (D+1)), two kv buffers
(the one computed on and the one arriving), and in backward fp32 dq and two fp32 dk/dv buffers; nothing of size
(T_l x T_l). Communication per rank per layer: forward (W-1) kv blocks; backward (W-1) kv blocks plus W fp32 dk/dv
blocks (bench/comm_model.py turns this into bytes and seconds).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from qlfast.ops.attn_merge import merge_attn_
from qlfast.ops.flash_attention import flash_attn_varlen_bwd, flash_attn_varlen_fwd
from qlfast.parallel.sharding import check_same_across_ranks


class _RingComm:
    """Send a tensor to the next rank and receive the previous rank's, asynchronously."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.send_to = self._global((self.rank + 1) % self.world)
        self.recv_from = self._global((self.rank - 1) % self.world)

    def _global(self, r: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return r
        return dist.get_global_rank(self.group, r)

    def send_recv(self, x: torch.Tensor):
        """Post send(x -> next) and recv(prev -> buffer); returns (buffer, works). Do not modify x before wait()."""
        buf = torch.empty_like(x, memory_format=torch.contiguous_format)
        ops = [dist.P2POp(dist.isend, x, self.send_to, self.group), dist.P2POp(dist.irecv, buf, self.recv_from,
                                                                                 self.group)]
        return buf, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works):
        for w in works:
            w.wait()


def _halves(cu: torch.Tensor, total: int):
    """Half-sequence layout of a zigzag-local packing with even sequence lengths.

    -> (cu_half int32 (S+1,), first (T/2,) int64 rows of every sequence's first half, second (T/2,) its second half).
    Built without a host sync (repeat_interleave with output_size).
    """
    cu_half = torch.div(cu, 2, rounding_mode="floor")
    lens = (cu_half[1:] - cu_half[:-1]).long()
    n = total // 2
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=cu.device), lens, output_size=n)
    first = cu[:-1].long()[seq] + (torch.arange(n, device=cu.device) - cu_half[:-1].long()[seq])
    return cu_half.to(torch.int32), first, first + lens[seq]


def _acc_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _ring_fwd(ring, q, k, v, cu, max_len, causal, scale, backend):
    t = q.shape[0]
    w, r = ring.world, ring.rank
    acc = _acc_dtype(q)
    cu_half, first, second = _halves(cu, t)
    kv = torch.stack([k, v])  # (2, T_l, Hkv, D): one message per step
    out = lse = None
    for step in range(w):
        if step + 1 < w:
            next_kv, works = ring.send_recv(kv)  # overlap: the next block travels while this one computes
        if step == 0:
            bo, bl = flash_attn_varlen_fwd(q, kv[0], kv[1], cu, cu, max_len, max_len, causal, scale, backend)
            out, lse = bo.to(acc), bl.to(acc)
        elif not causal:
            bo, bl = flash_attn_varlen_fwd(q, kv[0], kv[1], cu, cu, max_len, max_len, False, scale, backend)
            merge_attn_(out, lse, bo, bl)
        elif step <= r:  # kv from rank j = r - step < r: only its first chunk precedes ours
            kv0 = kv.index_select(1, first)
            bo, bl = flash_attn_varlen_fwd(q, kv0[0], kv0[1], cu, cu_half, max_len, max_len // 2, False, scale,
                                           backend)
            merge_attn_(out, lse, bo, bl)
        else:  # kv from rank j > r: all of it precedes our second chunk, none of it our first
            bo, bl = flash_attn_varlen_fwd(q.index_select(0, second), kv[0], kv[1], cu_half, cu, max_len // 2,
                                           max_len, False, scale, backend)
            merge_attn_(out, lse, bo, bl, rows=second)
        if step + 1 < w:
            ring.wait(works)
            kv = next_kv
    return out.to(q.dtype), lse


def _ring_bwd(ring, dout, q, k, v, out, lse, cu, max_len, causal, scale, backend):
    t = q.shape[0]
    w, r = ring.world, ring.rank
    acc = _acc_dtype(q)
    cu_half, first, second = _halves(cu, t)
    kv = torch.stack([k, v])
    if causal:
        dout1, q1, out1 = dout.index_select(0, second), q.index_select(0, second), out.index_select(0, second)
        lse1 = lse.index_select(1, second)
    dq = dkv = next_dkv = dkv_works = None
    for step in range(w):
        if step + 1 < w:
            next_kv, kv_works = ring.send_recv(kv)
        if step == 0:
            dq_b, dk_b, dv_b = flash_attn_varlen_bwd(dout, q, kv[0], kv[1], out, lse, cu, cu, max_len, max_len,
                                                     causal, scale, backend)
            dq, dkv = dq_b.to(acc), torch.stack([dk_b, dv_b]).to(acc)
        else:
            if not causal:
                dq_b, dk_b, dv_b = flash_attn_varlen_bwd(dout, q, kv[0], kv[1], out, lse, cu, cu, max_len, max_len,
                                                         False, scale, backend)
                dq += dq_b
            elif step <= r:
                kv0 = kv.index_select(1, first)
                dq_b, dk_b, dv_b = flash_attn_varlen_bwd(dout, q, kv0[0], kv0[1], out, lse, cu, cu_half, max_len,
                                                         max_len // 2, False, scale, backend)
                dq += dq_b
            else:
                dq_b, dk_b, dv_b = flash_attn_varlen_bwd(dout1, q1, kv[0], kv[1], out1, lse1, cu_half, cu,
                                                         max_len // 2, max_len, False, scale, backend)
                dq.index_add_(0, second, dq_b.to(acc))
            # the accumulator of the kv block we hold now arrives from the previous rank
            ring.wait(dkv_works)
            dkv = next_dkv
            if causal and step <= r:
                dkv[0].index_add_(0, first, dk_b.to(acc))
                dkv[1].index_add_(0, first, dv_b.to(acc))
            else:
                dkv[0] += dk_b
                dkv[1] += dv_b
        if step + 1 < w:
            ring.wait(kv_works)
            kv = next_kv
        if w > 1:
            next_dkv, dkv_works = ring.send_recv(dkv)
    if w > 1:
        ring.wait(dkv_works)
        dkv = next_dkv  # after W hops: our own kv's gradient, with every rank's contribution
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, causal, scale, backend, group):
        ring = _RingComm(group)
        out, lse = _ring_fwd(ring, q, k, v, cu, max_len, causal, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse, cu)
        ctx.args = (max_len, causal, scale, backend, group)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu = ctx.saved_tensors
        max_len, causal, scale, backend, group = ctx.args
        dq, dk, dv = _ring_bwd(_RingComm(group), dout.contiguous(), q, k, v, out, lse, cu, max_len, causal, scale,
                               backend)
        return dq, dk, dv, None, None, None, None, None, None


def _validate(q, k, v, cu, max_len, group, check):
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"ring_attention: q must be (T_local, Hq, D) and k, v (T_local, Hkv, D) on the same tokens; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"ring_attention: cu_seqlens_local must be int32 (S+1,), got {cu.dtype} {tuple(cu.shape)}")
    if q.shape[0] % 2 or int(max_len) % 2:
        raise ValueError(f"ring_attention: zigzag-local sequences have even lengths (two chunks each), got T_local="
                         f"{q.shape[0]} and max_seqlen_local={max_len}; shard with qlfast.parallel.zigzag_plan")
    if not check:
        return
    b = cu.tolist()
    lens = [b[i + 1] - b[i] for i in range(len(b) - 1)]
    err = None
    if b[0] != 0 or b[-1] != q.shape[0] or any(n < 0 or n % 2 for n in lens) or max(lens) > int(max_len):
        err = (f"ring_attention: cu_seqlens_local must go from 0 to T_local={q.shape[0]} in even steps (two zigzag "
               f"chunks per sequence) no longer than max_seqlen_local={max_len}, got "
               f"{b if len(b) <= 8 else b[:4] + ['...'] + b[-3:]}")
    check_same_across_ranks(cu, group, what="ring_attention: cu_seqlens_local", local_error=err)


def ring_attention(q, k, v, cu_seqlens_local, max_seqlen_local, *, group=None, causal=True, softmax_scale=None,
                   backend="auto", return_lse=False, check=True):
    """Zigzag ring attention over `group` (default: the world), differentiable in q, k, v.

    q (T_l, Hq, D), k and v (T_l, Hkv, D): this rank's zigzag shard (see sharding.zigzag_plan) of a packed batch;
    cu_seqlens_local int32 (S+1,) and max_seqlen_local: the local packing, identical on every rank. Returns out
    (T_l, Hq, D) in q's dtype (and lse (Hq, T_l) fp32 when return_lse). backend selects the single-device
    attention (qlfast.ops.flash_attention's). check=True validates cu_seqlens_local and compares it across ranks
    (one host sync and a tiny all_gather); pass check=False in the per-layer hot path once the plan is validated.
    """
    if not dist.is_initialized():
        raise ValueError("ring_attention: torch.distributed is not initialised (launch with torchrun)")
    _validate(q, k, v, cu_seqlens_local, max_seqlen_local, group, check)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, lse = _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_local,
                                    int(max_seqlen_local), bool(causal), scale, backend, group)
    return (out, lse) if return_lse else out
