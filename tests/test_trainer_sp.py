"""Sequence parallel in the trainer, single process: every loss row lands on the rank that holds its token, the ranks'
rows together are all rows once, and the per-rank losses over those rows (global normalisers) add up to the whole
batch's loss and gradient in every loss_agg mode. The multi-process run is tests/dist/test_train_sp.py."""

import pytest
import torch

from qlfast.ops.policy_loss import LOSS_AGGS, PolicyLossConfig, policy_loss
from qlfast.parallel.sharding import contiguous_plan, zigzag_plan
from qlfast.trainer.packing import pack
from qlfast.trainer.sp import local_rows, shard_batch

PLANS = {"zigzag": zigzag_plan, "contiguous": contiguous_plan}


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # awkward lengths: a 1-token response, a prompt shorter than 2W, a long sequence
    lens = [(5, 1), (2, 9), (13, 4), (31, 17), (3, 2)]
    prompts = [torch.randint(1, 50, (p,), generator=gen).tolist() for p, _ in lens]
    responses = [torch.randint(1, 50, (r,), generator=gen).tolist() for _, r in lens]
    adv = torch.randn(len(lens), generator=gen).tolist()
    lps = [(-torch.rand(r, generator=gen)).tolist() for _, r in lens]
    return pack(prompts, responses, advantages=adv, rollout_logprobs=lps)


@pytest.mark.parametrize("kind", sorted(PLANS))
@pytest.mark.parametrize("world", [2, 3, 4])
def test_rows_land_where_their_token_lives(kind, world):
    b = _batch()
    sels = []
    for rank in range(world):
        plan = PLANS[kind](b.cu_seqlens, world, rank)
        sel, local = local_rows(b.rows, plan)
        assert torch.equal(plan.index[local], b.rows[sel])  # the row's token is this rank's local token
        assert torch.all(sel.diff() > 0)  # rows keep their order
        sels.append(sel)
    # every row exactly once over the ranks: their rows concatenated are all the rows
    assert torch.equal(torch.cat(sels).sort().values, torch.arange(b.rows.numel()))


@pytest.mark.parametrize("kind", sorted(PLANS))
def test_shard_batch_keeps_each_row_with_its_data(kind):
    b, world = _batch(1), 3
    resp_len = b.cu_rows.diff().long()
    parts = []
    for rank in range(world):
        plan = PLANS[kind](b.cu_seqlens, world, rank)
        sel, _ = local_rows(b.rows, plan)
        lb = shard_batch(b, plan)
        assert torch.equal(lb.input_ids, torch.where(plan.valid, b.input_ids[plan.index.clamp_min(0)], 0))
        assert torch.equal(lb.input_ids[lb.rows], b.input_ids[b.rows[sel]])
        assert torch.equal(lb.targets, b.targets[sel]) and torch.equal(lb.advantages, b.advantages[sel])
        assert torch.equal(lb.rollout_logprob, b.rollout_logprob[sel])
        response = torch.bucketize(sel, b.cu_rows[1:].long(), right=True)
        assert torch.equal(lb.seq_tokens, resp_len[response])
        assert torch.equal(lb.cu_rows.diff().long(), torch.bincount(response, minlength=resp_len.numel()))
        parts.append(lb)
    assert sum(p.rows.numel() for p in parts) == b.rows.numel()


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_rank_losses_add_up_to_the_batch_loss(loss_agg):
    """What the trainer relies on: sum over ranks of (local rows' loss, global normalisers) == the whole batch's."""
    b, world = _batch(2), 3
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    hidden = torch.randn(b.rows.numel(), 16, generator=gen, dtype=torch.float64, requires_grad=True)
    old = b.rollout_logprob.double() + 0.1 * torch.randn(b.rows.numel(), generator=gen, dtype=torch.float64)
    cfg = PolicyLossConfig(loss_agg=loss_agg, loss_agg_norm=24.0, global_tokens=float(b.rows.numel()),
                           global_seqs=float(b.cu_rows.numel() - 1), tis_cap=2.0)

    def loss(h, lb, sel=None, seq_tokens=None):
        pick = (lambda t: t) if sel is None else (lambda t: t[sel])
        return policy_loss(h, weight, lb.targets, lb.advantages, torch.ones_like(lb.advantages), cu_seqlens=lb.cu_rows,
                           old_logprob=pick(old), rollout_logprob=lb.rollout_logprob, seq_tokens=seq_tokens,
                           config=cfg, backend="torch")

    ref, ref_m = loss(hidden, b)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    total, parts = 0.0, {}
    for rank in range(world):
        plan = zigzag_plan(b.cu_seqlens, world, rank)
        sel, _ = local_rows(b.rows, plan)
        lb = shard_batch(b, plan)
        h = hidden.detach()[sel].requires_grad_()
        part, m = loss(h, lb, sel, lb.seq_tokens)
        total = total + part.detach()
        parts[rank] = (sel, torch.autograd.grad(part, h)[0], m)
    assert float(total) == pytest.approx(float(ref.detach()), rel=1e-12, abs=1e-15)
    g = torch.zeros_like(g_ref)
    for sel, gh, _ in parts.values():
        g[sel] = gh
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-15)
    for name in ("policy_loss", "clip_frac_high", "num_tokens"):  # summed metrics add up too
        assert sum(float(m[name]) for *_, m in parts.values()) == pytest.approx(float(ref_m[name]), rel=1e-6)
