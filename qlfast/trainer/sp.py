"""Sequence parallelism in the trainer (`--model.sp=N`, `--model.sp_attention=ring|ulysses|hybrid`).

Ranks form groups of N consecutive ranks (dp = world / N groups). Rollouts stay per rank; for an update, a group
all-gathers its ranks' shares (`union`), so its N ranks pack the same micro-batches in the same order, and each runs
the model on 1/N of every micro-batch's tokens (`sharded`):

    n_tok = tokens(own)                          # normalisers count each rank's own share: once over all ranks
    for b in micro_batches(sp.union(own, env)):  # the same micro-batches (and collectives) on the group's N ranks
        with sp.sharded(model, b, env) as b:     # local tokens and loss rows; attention over the sp group
            hidden = model(b.input_ids, b.position_ids, b.cu_seqlens).index_select(0, b.rows)
            loss(hidden, b.targets, ..., global normaliser).backward()
    comm.all_reduce_grads(model, env)            # the sum over ALL ranks is the full-batch gradient

A loss row (a token whose hidden state predicts a response token, qlfast/trainer/packing.py) is computed on the rank
that holds its token (`local_rows`), so each row is counted once per group: the local loss is the sum over local rows
with the global normaliser, and losses, summed metrics and gradients add up over ranks exactly as under dp. The
gradient of a token's keys and values reaches the rank that holds it through the attention's backward.

Plans (qlfast/parallel/sharding.py, hybrid.py): zigzag for ring attention, contiguous for Ulysses, hybrid_plan for
Ulysses inside groups of sp_ulysses ranks and ring across them. Prompt-shared packing (one copy of a GRPO group's
prompt, qlfast/ops/shared_prefix.py) runs under Ulysses: after its all-to-all a rank holds every token of its heads,
so the shared-prompt attention runs there on the global layout; ring and hybrid split a group's prompt and responses
across ranks, so under them every sequence is packed with its own prompt. With --model.fsdp=true the
policy is sharded over the flat world (sp ranks included); FSDP2's average times Env.loss_scale is the same sum.

Memory: every sp rank holds the whole micro-batch's token ids and loss-row bookkeeping (O(T) ints, on the host), and
the activations of its T/N tokens only.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from qlfast.ops.shared_prefix import check_layout
from qlfast.parallel import (
    ShardPlan,
    check_ulysses_heads,
    contiguous_plan,
    hybrid_attention,
    hybrid_plan,
    ring_attention,
    shard,
    ulysses_attention,
    zigzag_plan,
)
from qlfast.trainer import comm
from qlfast.trainer.packing import PackedBatch


def setup(model, env, share_prompts: bool) -> str | None:
    """Check that the model fits the sp attention; -> the line to log once (None when sp == 1)."""
    if env.sp == 1:
        return None
    if env.sp_attention in ("ulysses", "hybrid"):  # the heads are split over the (inner) Ulysses group
        cfg = model.config
        check_ulysses_heads(cfg.num_attention_heads, cfg.num_key_value_heads,
                            env.sp if env.sp_attention == "ulysses" else env.sp_ulysses)
    off = share_prompts and not shares_prompts(env)
    note = f"; prompt-shared packing is off under {env.sp_attention} sp (each sequence packed with its own prompt)" \
        if off else ""
    how = (f"hybrid attention: Ulysses over {env.sp_ulysses} x ring over {env.sp // env.sp_ulysses}"
           if env.sp_attention == "hybrid" else f"{env.sp_attention} attention")
    return f"sequence parallel: sp={env.sp} ({how}) x dp={env.world // env.sp}{note}"


def shares_prompts(env) -> bool:
    """Whether prompt-shared packing can run: alone, or under Ulysses (all tokens of a head on one rank); ring and
    hybrid split a group's prompt and responses over ranks, which the shared-prompt attention does not handle."""
    return env.sp == 1 or env.sp_attention == "ulysses"


def union(items: list, env) -> list:
    """The sp group's items: every sp rank's list, concatenated in rank order (the same list on the group's ranks)."""
    if env.sp == 1:
        return list(items)
    return [x for part in comm.all_gather_objects(list(items), group=env.sp_group) for x in part]


def local_rows(rows: torch.Tensor, plan: ShardPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """rows (N,) token indices of a packed batch -> (sel (N_l,), local (N_l,)) int64: which rows (indices into `rows`,
    increasing) this rank computes, namely those whose token it holds, and that token's position in its shard."""
    idx = plan.index_all.cpu()  # (W, T_l) original token of every local token, -1 for padding
    real = idx >= 0
    owner = torch.empty(plan.num_tokens, dtype=torch.int64)
    where = torch.empty(plan.num_tokens, dtype=torch.int64)
    owner[idx[real]] = torch.arange(plan.world_size).view(-1, 1).expand_as(idx)[real]
    where[idx[real]] = torch.arange(idx.shape[1]).view(1, -1).expand_as(idx)[real]
    rows = rows.cpu()
    sel = (owner[rows] == plan.rank).nonzero().view(-1)
    return sel, where[rows[sel]]


def shard_batch(b: PackedBatch, plan: ShardPlan) -> PackedBatch:
    """This rank's piece of a packed batch: its tokens and their position ids, and the loss rows computed here with
    their targets, advantages and rollout log-probs. cu_rows bounds each response's LOCAL rows (possibly none);
    seq_tokens keeps every row's whole response length (GRPO's seq-mean-token-mean needs it). A shared-prompt
    layout (b.prefix) stays with the attention (Ulysses), not with the local batch."""
    sel, local = local_rows(b.rows, plan)
    per_response = b.cu_rows.long().diff()  # (R,) rows of each response
    response = torch.repeat_interleave(torch.arange(per_response.numel()), per_response)  # (N,) each row's response
    cu_rows = torch.zeros(per_response.numel() + 1, dtype=torch.int64)
    cu_rows[1:] = torch.bincount(response[sel], minlength=per_response.numel()).cumsum(0)
    return PackedBatch(
        input_ids=shard(b.input_ids, plan),
        # the batch's own positions (a shared group's responses continue from its prompt); pads get 0
        position_ids=shard(b.position_ids, plan) if b.prefix is not None else plan.position_ids.cpu(),
        cu_seqlens=plan.cu_seqlens_local.cpu(), prefix=None, rows=local, targets=b.targets[sel],
        cu_rows=cu_rows.to(torch.int32), advantages=b.advantages[sel],
        rollout_logprob=None if b.rollout_logprob is None else b.rollout_logprob[sel], seq_index=b.seq_index,
        seq_tokens=per_response[response[sel]])


def _attention_fn(plan: ShardPlan, env, backend: str, prefix=None):
    # the model's backend, which flash_attention takes too ("sdpa": ATen's CPU flash kernel, any head dim, with LSE)
    if env.sp_attention == "ring":  # the model passes the plan's local packing (the batch's cu_seqlens)
        return functools.partial(ring_attention, group=env.sp_group, backend=backend, check=False)
    if env.sp_attention == "hybrid":  # the batch's cu_seqlens: the Ulysses group's packing (hybrid_plan)
        uly, ring = env.hybrid_groups
        return functools.partial(hybrid_attention, ulysses_group=uly, ring_group=ring, backend=backend, check=False)
    cu = plan.cu_seqlens.to(env.device)  # Ulysses attends over the global (padded) packing after its all-to-all
    return lambda q, k, v, _cu, _max: ulysses_attention(q, k, v, cu, plan.max_seqlen, group=env.sp_group,
                                                        backend=backend, check=False, prefix=prefix)


@contextlib.contextmanager
def sharded(model, b: PackedBatch, env):
    """Yield `b` on env.device as this rank runs it: whole when sp == 1; else its shard (`shard_batch`) with the
    model's attention over the sp group, for the forward AND the backward (checkpointed layers recompute there).
    Every rank of the group must enter with the same batch (the plan checks the packing across the group)."""
    if env.sp == 1:
        yield b.to(env.device)
        return
    if b.prefix is not None and not shares_prompts(env):
        raise ValueError(f"sequence parallel: prompt-shared packing has no {env.sp_attention} attention (Ulysses "
                         "only); pack one by one")
    if env.sp_attention == "hybrid":
        plan = hybrid_plan(b.cu_seqlens, env.sp_ulysses, env.sp // env.sp_ulysses, env.sp_rank, group=env.sp_group)
    else:
        make_plan = zigzag_plan if env.sp_attention == "ring" else contiguous_plan
        plan = make_plan(b.cu_seqlens, env.sp, env.sp_rank, group=env.sp_group)
    prefix = None
    if b.prefix is not None:  # checked once here against the global packing (plus the plan's pad sequence)
        check_layout(plan.cu_seqlens.cpu(), b.prefix, int(plan.cu_seqlens[-1]))
        prefix = b.prefix.to(env.device)
    model.set_options(attention_fn=_attention_fn(plan, env, model.options.attn_backend, prefix))
    try:
        yield shard_batch(b, plan).to(env.device)
    finally:
        model.set_options(attention_fn=None)
