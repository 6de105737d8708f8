"""torchrun worker for tests/dist/test_policy_loss_dist.py: with global normalisers (token and sequence counts
all-reduced across ranks), the SUM over 2 data-parallel ranks of the policy-loss gradients, and the metrics reduced
as METRIC_REDUCE says, equal the single-process full-batch ones. Every rank builds the same global batch from one
seed and keeps its half of the sequences; gloo on CPU, torch backend, float64 so the check is to round-off.

    torchrun --standalone --nproc_per_node=2 tests/dist/_worker_policy_loss.py
"""

import dataclasses

import torch
import torch.distributed as dist

from qlfast.ops.policy_loss import LOSS_AGGS, METRIC_REDUCE, PolicyLossConfig, policy_loss

SEQ_LENS = (13, 7, 20, 1, 16, 9)
SEQ_ADV = (1.1, -0.6, 0.0, -1.4, 0.8, -0.3)


def global_batch(h=40, v=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(SEQ_LENS)
    cu = torch.tensor([0, *torch.tensor(SEQ_LENS).cumsum(0).tolist()], dtype=torch.int32)
    mask = torch.zeros(n, dtype=torch.bool)
    adv = torch.empty(n, dtype=torch.float64)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        mask[s + (e - s) // 4:e] = i != 4  # prompt prefix outside the loss; sequence 4 fully masked
        adv[s:e] = SEQ_ADV[i]
    return dict(hidden=torch.randn(n, h, generator=g, dtype=torch.float64),
                weight=torch.randn(v, h, generator=g, dtype=torch.float64) * 0.3,
                targets=torch.randint(0, v, (n,), generator=g), advantages=adv, mask=mask, cu_seqlens=cu,
                old_logprob=-5.5 + 0.6 * torch.randn(n, generator=g, dtype=torch.float64),
                ref_logprob=-5.5 + 0.6 * torch.randn(n, generator=g, dtype=torch.float64),
                rollout_logprob=-5.5 + 0.6 * torch.randn(n, generator=g, dtype=torch.float64))


def run(batch, cfg):
    hidden = batch["hidden"].clone().requires_grad_()
    weight = batch["weight"].clone().requires_grad_()
    rest = {k: v for k, v in batch.items() if k not in ("hidden", "weight", "targets", "advantages", "mask")}
    loss, metrics = policy_loss(hidden, weight, batch["targets"], batch["advantages"], batch["mask"], **rest,
                                config=cfg, backend="torch")
    loss.backward()
    return loss.detach(), metrics, hidden.grad, weight.grad


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    full = global_batch()
    cu = full["cu_seqlens"].tolist()
    per = len(SEQ_LENS) // world
    s_lo, s_hi = rank * per, (rank + 1) * per
    t0, t1 = cu[s_lo], cu[s_hi]
    local = {k: (v[t0:t1] if k not in ("weight", "cu_seqlens") else v) for k, v in full.items()}
    local["cu_seqlens"] = full["cu_seqlens"][s_lo:s_hi + 1] - t0

    # the global normalisers, as a trainer gets them: all-reduce the local counts
    valid = local["mask"] & (local["targets"] != -100)
    lcu = local["cu_seqlens"].tolist()
    counts = torch.tensor([float(valid.sum()), float(sum(bool(valid[s:e].any()) for s, e in zip(lcu, lcu[1:])))],
                          dtype=torch.float64)
    dist.all_reduce(counts)
    for loss_agg in LOSS_AGGS:
        cfg = PolicyLossConfig(loss_agg=loss_agg, loss_agg_norm=24.0, dual_clip=3.0, kl_coef=0.1, kl_type="k3",
                               entropy_coef=0.02, temperature=0.8, tis_cap=2.0)
        ref_loss, ref_metrics, ref_dh, ref_dw = run(full, cfg)
        gcfg = dataclasses.replace(cfg, global_tokens=counts[0].item(), global_seqs=counts[1].item())
        loss, metrics, dh, dw = run(local, gcfg)
        dh_full = torch.zeros_like(ref_dh)
        dh_full[t0:t1] = dh
        for t in (loss, dh_full, dw):
            dist.all_reduce(t)  # SUM: the gradient of the global-batch loss
        for k, v in metrics.items():
            dist.all_reduce(v, op=dist.ReduceOp.SUM if METRIC_REDUCE[k] == "sum" else dist.ReduceOp.MAX)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12, msg=f"{loss_agg} loss")
        torch.testing.assert_close(dh_full, ref_dh, rtol=1e-10, atol=1e-12, msg=f"{loss_agg} dhidden")
        torch.testing.assert_close(dw, ref_dw, rtol=1e-10, atol=1e-12, msg=f"{loss_agg} dweight")
        assert metrics.keys() == ref_metrics.keys()
        for k in metrics:
            torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, msg=f"{loss_agg} {k}")
        assert ref_metrics["clip_frac_low"] > 0 and ref_metrics["clip_frac_high"] > 0, ref_metrics
    print(f"rank {rank}: policy_loss dist OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
