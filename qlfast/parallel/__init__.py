"""qlfast.parallel: sequence-parallel attention (zigzag ring, Ulysses) and the sharding of packed batches for it.

    plan = zigzag_plan(cu_seqlens, world_size=W, rank=r, group=sp_group)     # once per batch
    q_l, k_l, v_l = (shard(x, plan) for x in (q, k, v))
    out_l = ring_attention(q_l, k_l, v_l, plan.cu_seqlens_local, plan.max_seqlen_local, group=sp_group)

    plan = contiguous_plan(cu_seqlens, world_size=W, rank=r, group=sp_group)
    out_l = ulysses_attention(shard(q, plan), shard(k, plan), shard(v, plan), plan.cu_seqlens, plan.max_seqlen,
                              group=sp_group)

    ulysses_group, ring_group = hybrid_groups(U)                             # Ulysses inside, ring across
    plan = hybrid_plan(cu_seqlens, U, R, rank=r)
    out_l = hybrid_attention(shard(q, plan), ..., plan.cu_seqlens_local, plan.max_seqlen_local,
                             ulysses_group=ulysses_group, ring_group=ring_group)

FSDP2 wrapping lives in qlfast.parallel.fsdp (imported on its own); the trainer builds its process groups in
qlfast.trainer.comm.
"""

from qlfast.parallel.hybrid import HybridPlan, hybrid_attention, hybrid_groups, hybrid_plan
from qlfast.parallel.ring import ring_attention
from qlfast.parallel.sharding import (
    ShardPlan,
    check_same_across_ranks,
    check_ulysses_heads,
    contiguous_plan,
    gather_unshard,
    shard,
    unshard,
    zigzag_plan,
)
from qlfast.parallel.ulysses import ulysses_attention

__all__ = [
    "HybridPlan", "ShardPlan", "check_same_across_ranks", "check_ulysses_heads", "contiguous_plan", "gather_unshard",
    "hybrid_attention", "hybrid_groups", "hybrid_plan", "ring_attention", "shard", "ulysses_attention",
    "unshard", "zigzag_plan",
]
