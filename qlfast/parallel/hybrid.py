"""Hybrid sequence parallelism: Ulysses inside groups of U ranks, zigzag ring across R such groups, W = U x R (USP,
Fang & Zhao 2024, "USP: A Unified Sequence Parallelism Approach", arXiv 2405.07719; LoongTrain's 2-D attention,
Gu et al. 2024, arXiv 2406.18485).

    uly, ring = hybrid_groups(ulysses_size=U)                                  # once; sp = W = U x R
    plan = hybrid_plan(cu_seqlens, U, R, rank=sp_rank, group=sp_group)        # once per batch
    out_l = hybrid_attention(shard(q, plan), shard(k, plan), shard(v, plan), plan.cu_seqlens_local,
                             plan.max_seqlen_local, ulysses_group=uly, ring_group=ring)

Ranks: sp rank j = ring_rank * U + ulysses_rank, so a Ulysses group is U consecutive ranks (one NVLink node when U is
the GPUs per node) and a ring links the same Ulysses position of every group (the hops that cross nodes).

Placement: lay the packed batch out for a zigzag ring of R ranks (sharding.zigzag_plan: every sequence padded to a
multiple of 2R, ring rank r holds chunks r and 2R-1-r of each), append one pad sequence to ring rank r's packing so
that its length is a multiple of U (and even: the ring cuts every sequence in two halves), and cut it into U
contiguous pieces: rank (r, u) holds piece u. The Ulysses all-to-all concatenates the pieces of group r in rank
order, so afterwards every rank of group r holds exactly ring rank r's zigzag packing, on Hq/U heads, with no
permutation. `plan.cu_seqlens_local` is that packing (U T_l tokens), the same on all W ranks. (Splitting every
zigzag chunk over U instead would interleave the sequences after the all-to-all and cost a gather per layer.) The
pad sequence is a sequence of its own, so no real token attends to it, causal or not; zigzag padding is exact for
causal attention when the loss ignores padding (plan.valid), as in sharding.py.

Forward: one all-to-all of q, k, v (seq -> head) in the Ulysses group, ring_attention over the ring group on
(U T_l, Hq/U, D), one all-to-all of out back; backward is the same path reversed (Ulysses' all-to-all Functions,
the ring's own backward). GQA as in Ulysses: U divides Hkv, or Hkv divides U and kv heads are replicated U/Hkv
times before the all-to-all (the ring then carries the copies; repeat_interleave's backward sums their gradients).

Memory contract: per rank, the head-sharded q/k/v (U T_l, (Hq + 2 Hkv')/U, D) with Hkv' = max(Hkv, U), and ring
attention's buffers for U T_l tokens on Hq/U heads (fp32 out/lse accumulators, two kv blocks, in backward fp32
dq/dk/dv); nothing of size (T_l x T_l).
Communication per rank per layer (T_l = N/W tokens, b bytes per element):
    Ulysses part, fwd and bwd each:   (U-1)/U * T_l (2 Hq + 2 Hkv') D b          (inside the group)
    ring part, fwd:                   (R-1) * 2 T_l Hkv' D b                      (across groups)
               bwd:                   (R-1) * 2 T_l Hkv' D b + R * 2 T_l Hkv' D 4  (fp32 dk/dv)
A ring hop carries as many bytes as in a W-rank ring (for U <= Hkv) but U times the compute, so it hides behind the
compute U times more easily (docs/perf/hybrid_sp.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from qlfast.parallel.ring import ring_attention
from qlfast.parallel.sharding import ShardPlan, check_same_across_ranks, check_ulysses_heads, zigzag_plan
from qlfast.parallel.ulysses import head_to_seq, seq_to_head


@dataclass(frozen=True)
class HybridPlan(ShardPlan):
    """A ShardPlan (kind "hybrid") for W = U x R ranks; shard / unshard / gather_unshard take it as they are.

    Unlike the zigzag plan, cu_seqlens_local / max_seqlen_local describe the packing of the Ulysses group's U T_l
    tokens (ring rank r's zigzag packing plus a pad sequence), which is what hybrid_attention runs on; it is the same
    on every rank. A rank's own T_l tokens are a contiguous piece of it; position_ids gives their positions.
    """

    ulysses_size: int  # U, ranks per Ulysses group (all-to-all over heads)
    ring_size: int  # R, Ulysses groups around the ring

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.ulysses_size

    @property
    def ring_rank(self) -> int:
        return self.rank // self.ulysses_size


def _cu(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def hybrid_plan(cu_seqlens, ulysses_size: int, ring_size: int, rank: int, *, pad: bool = True, group=None,
                device=None) -> HybridPlan:
    """Plan for hybrid_attention on W = ulysses_size x ring_size ranks; rank = ring_rank * U + ulysses_rank.

    cu_seqlens: the global packing (S+1,) (tensor or list). pad=False raises on a sequence whose length is not a
    multiple of 2R (needed for non-causal attention). group: when given (the W-rank sp group), checks that every rank
    passes the same U, R and cu_seqlens. device: where the plan's tensors live.
    """
    u, r_n = int(ulysses_size), int(ring_size)
    err = None
    if u < 1 or r_n < 1 or not 0 <= rank < u * r_n:
        err = (f"hybrid_plan: need ulysses_size U >= 1, ring_size R >= 1 and 0 <= rank < U x R, got U={u}, R={r_n}, "
               f"rank={rank}")
    if group is not None:
        check_same_across_ranks(torch.tensor([u, r_n]), group, what="hybrid_plan: (U, R)", local_error=err)
    elif err:
        raise ValueError(err)
    try:
        zz = zigzag_plan(cu_seqlens, r_n, rank // u, pad=pad, group=group, device=device)  # the ring's layout
    except ValueError as e:
        raise ValueError(f"hybrid_plan: {e} (here W is the ring size R={r_n})") from None
    t_ring = zz.local_tokens
    tail = (-t_ring) % u
    tail += u if tail % 2 else 0  # t_ring is even, so this only happens for odd U, and t_ring + tail stays % U == 0
    t_l = (t_ring + tail) // u
    dev = zz.index_all.device
    index_all = torch.cat([zz.index_all, torch.full((r_n, tail), -1, dtype=torch.int64, device=dev)], dim=1)
    pos_all = torch.cat([zz.position_ids_all, torch.arange(tail, device=dev).expand(r_n, tail)], dim=1)
    ring_lens = (zz.cu_seqlens_local[1:] - zz.cu_seqlens_local[:-1]).tolist() + ([tail] if tail else [])
    padded = list(zz.padded_seqlens) + ([r_n * tail] if tail else [])
    return HybridPlan(
        kind="hybrid", world_size=u * r_n, rank=rank, seqlens=zz.seqlens, padded_seqlens=tuple(padded),
        cu_seqlens=_cu(padded, dev), max_seqlen=max(padded), cu_seqlens_local=_cu(ring_lens, dev),
        max_seqlen_local=max(ring_lens), index_all=index_all.reshape(u * r_n, t_l),
        position_ids_all=pos_all.reshape(u * r_n, t_l), ulysses_size=u, ring_size=r_n)


def hybrid_groups(ulysses_size: int, sp_size: int | None = None):
    """-> (ulysses_group, ring_group) of this rank. Collective: every rank of the world calls it with the same sizes.

    The world is dp x sp with sp inner (as in trainer.comm.init), sp_size W defaulting to the world size. Inside each
    block of W ranks, sp rank j is (ring_rank j // U, ulysses_rank j % U): a Ulysses group is U consecutive ranks, a
    ring joins ranks U apart. U must divide W.
    """
    if not dist.is_initialized():
        raise ValueError("hybrid_groups: torch.distributed is not initialised (launch with torchrun)")
    world = dist.get_world_size()
    w = world if sp_size is None else int(sp_size)
    if w < 1 or world % w:
        raise ValueError(f"hybrid_groups: sp_size W={w} must be >= 1 and divide the world size {world}")
    u = int(ulysses_size)
    if u < 1 or w % u:
        raise ValueError(f"hybrid_groups: the Ulysses group size U={u} must be >= 1 and divide the sequence-parallel "
                         f"size W={w} (W = U x R, R ring steps)")
    r_n = w // u
    blocks = range(0, world, w)
    uly, _ = dist.new_subgroups_by_enumeration([[b + r * u + i for i in range(u)] for b in blocks for r in range(r_n)],
                                               group_desc="hybrid_ulysses")
    ring, _ = dist.new_subgroups_by_enumeration([[b + r * u + i for r in range(r_n)] for b in blocks for i in range(u)],
                                                group_desc="hybrid_ring")
    return uly, ring


def _validate(q, k, v, cu, max_len, u, ulysses_group, ring_group, check):
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"hybrid_attention: q must be (T_local, Hq, D) and k, v (T_local, Hkv, D) on the same "
                         f"tokens; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"hybrid_attention: cu_seqlens_local must be int32 (S+1,), got {cu.dtype} {tuple(cu.shape)}")
    try:
        rep = check_ulysses_heads(q.shape[1], k.shape[1], u)
    except ValueError as e:
        raise ValueError(f"hybrid_attention: {e} (here W is the Ulysses group size U={u})") from None
    if not check:
        return rep
    b = cu.tolist()
    lens = [b[i + 1] - b[i] for i in range(len(b) - 1)]
    err = None
    if b[0] != 0 or b[-1] != u * q.shape[0] or any(n < 0 or n % 2 for n in lens) or max(lens) > int(max_len):
        err = (f"hybrid_attention: cu_seqlens_local must be the Ulysses group's packing (hybrid_plan(...)."
               f"cu_seqlens_local): from 0 to U x T_local = {u} x {q.shape[0]} in even steps no longer than "
               f"max_seqlen_local={max_len}, got {b if len(b) <= 8 else b[:4] + ['...'] + b[-3:]}")
    # two checks cover the W ranks (every ring meets every Ulysses group); the first one's error rides into the
    # second, so all W ranks raise together and none waits in a collective
    try:
        check_same_across_ranks(cu, ulysses_group, what="hybrid_attention: cu_seqlens_local", local_error=err)
    except ValueError as e:
        err = str(e)
    check_same_across_ranks(cu, ring_group, what="hybrid_attention: cu_seqlens_local", local_error=err)
    return rep


def hybrid_attention(q, k, v, cu_seqlens_local, max_seqlen_local, *, ulysses_group, ring_group, causal=True,
                     softmax_scale=None, backend="auto", check=True):
    """Ulysses-in-ring attention, differentiable in q, k, v -> out (T_l, Hq, D) in q's dtype.

    q (T_l, Hq, D), k and v (T_l, Hkv, D): this rank's shard (hybrid_plan + shard) of a packed batch;
    cu_seqlens_local int32 (S+1,) and max_seqlen_local: the plan's packing of the Ulysses group's U T_l tokens.
    ulysses_group, ring_group: from hybrid_groups. Hq must be divisible by U; U must divide Hkv or Hkv divide U.
    backend selects the single-device attention. check=True validates cu_seqlens_local and compares it across the W
    ranks (one host sync, two tiny all_gathers); pass check=False in the per-layer hot path.
    """
    if not dist.is_initialized():
        raise ValueError("hybrid_attention: torch.distributed is not initialised (launch with torchrun)")
    u = dist.get_world_size(ulysses_group)
    rep = _validate(q, k, v, cu_seqlens_local, max_seqlen_local, u, ulysses_group, ring_group, check)
    t, hq, d = q.shape
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    hq_l, hk_l = hq // u, k.shape[1] // u
    # one all-to-all for q, k, v: per destination rank p, its q heads then its k heads then its v heads
    qkv = torch.cat([q.reshape(t, u, hq_l, d), k.reshape(t, u, hk_l, d), v.reshape(t, u, hk_l, d)], dim=2)
    qkv = seq_to_head(qkv, ulysses_group)  # (U T_l, hq_l + 2 hk_l, D): ring rank r's zigzag packing
    qh, kh, vh = qkv.split([hq_l, hk_l, hk_l], dim=1)
    out = ring_attention(qh, kh, vh, cu_seqlens_local, max_seqlen_local, group=ring_group, causal=causal,
                         softmax_scale=softmax_scale, backend=backend, check=False)  # (U T_l, hq_l, D)
    return head_to_seq(out, ulysses_group, u).reshape(t, hq, d)
