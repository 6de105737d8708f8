"""qlfast.parallel: sequence-parallel attention (zigzag ring, Ulysses) and the sharding of packed batches for it.

    plan = zigzag_plan(cu_seqlens, world_size=W, rank=r, group=sp_group)     # once per batch
    q_l, k_l, v_l = (shard(x, plan) for x in (q, k, v))
    out_l = ring_attention(q_l, k_l, v_l, plan.cu_seqlens_local, plan.max_seqlen_local, group=sp_group)

    plan = contiguous_plan(cu_seqlens, world_size=W, rank=r, group=sp_group)
    out_l = ulysses_attention(shard(q, plan), shard(k, plan), shard(v, plan), plan.cu_seqlens, plan.max_seqlen,
                              group=sp_group)

The device mesh and FSDP wrapping live in qlfast.parallel.mesh / qlfast.parallel.fsdp (imported on their own).
"""

from qlfast.parallel.merge import merge_attn_
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
    "ShardPlan", "check_same_across_ranks", "check_ulysses_heads", "contiguous_plan", "gather_unshard", "merge_attn_",
    "ring_attention", "shard", "ulysses_attention", "unshard", "zigzag_plan",
]
