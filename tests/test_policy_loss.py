"""qlfast.ops.policy_loss against the float64 full-logits reference (qlfast.ref.policy_loss).

Inputs are built so that every branch is live: old log-probs put ratios on both sides of the clip range (and past
the dual-clip bound), advantages of both signs plus a zero-advantage group, a one-token sequence, a fully masked
sequence, ignore-index targets inside the responses, temperature != 1, awkward sizes (N=97, H=72, V=1000).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from qlfast.ops._dispatch import has_cuda_op
from qlfast.ops.policy_loss import LOSS_AGGS, METRIC_REDUCE, PolicyLossConfig, policy_loss
from qlfast.ref.linear_logprob import naive_linear_logprob
from qlfast.ref.policy_loss import policy_loss_reference
from qlfast.testing import assert_close_vs_ref, one_triton_config

_one_config = one_triton_config()  # one autotune config per kernel on a GPU

SEQ_LENS = (20, 1, 30, 17, 29)  # N = 97; sequence 1 has one token, sequence 3 is fully masked
SEQ_ADV = (1.3, -0.7, -1.1, 0.9, 0.0)  # sequence 4: a zero-advantage group (all rewards equal)
# log(pi / pi_old) per token, cycled: past 1 + clip_high (0.5), below 1 - clip_low (-0.6), inside (+-0.1, 0),
# past the dual-clip bound 3 (1.5). Every value is >= 0.1 away from log(1.28), log(0.8) and log(3).
LOG_RATIOS = (0.5, -0.6, -0.1, 0.0, 0.1, 1.5)
FULL = PolicyLossConfig(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01,
                        temperature=0.7, tis_cap=1.5, loss_agg_norm=40.0)


def make_case(seed=0, seq_lens=SEQ_LENS, h=72, v=1000, temperature=0.7, device="cpu"):
    """fp64 inputs; old/ref/rollout log-probs are built from the exact fp64 log-probs so ratios are controlled."""
    g = torch.Generator().manual_seed(seed)
    n = sum(seq_lens)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(h))
    targets = torch.randint(0, v, (n,), generator=g)
    cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32)
    mask = torch.zeros(n, dtype=torch.bool)
    advantages = torch.empty(n, dtype=torch.float64)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        mask[s + (e - s) // 3:e] = i != 3  # a prompt prefix outside the loss; sequence 3 entirely masked
        advantages[s:e] = SEQ_ADV[i % len(SEQ_ADV)]
    targets[[n // 9, 5 * n // 6]] = -100  # ignore-index tokens inside responses drop out of the loss
    advantages[~mask] = float("nan")  # garbage outside the loss must not leak into it
    lp = naive_linear_logprob(hidden, weight, targets, temperature).detach()
    lr = torch.tensor(LOG_RATIOS, dtype=torch.float64).repeat(n // len(LOG_RATIOS) + 1)[:n]
    lr = lr + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.06
    old = lp - lr
    ref = lp + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
    rollout = old + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    old[~mask] = float("inf")
    case = dict(hidden=hidden, weight=weight, targets=targets, advantages=advantages, mask=mask, cu_seqlens=cu,
                old_logprob=old, ref_logprob=ref, rollout_logprob=rollout)
    return {k: t.to(device) for k, t in case.items()}


def cast(case, dtype):
    return {k: (t.to(dtype) if k in ("hidden", "weight") else t) for k, t in case.items()}


def run(fn, case, **kw):
    """-> loss, metrics, dhidden, dweight."""
    hidden = case["hidden"].detach().clone().requires_grad_()
    weight = case["weight"].detach().clone().requires_grad_()
    rest = {k: v for k, v in case.items() if k not in ("hidden", "weight")}
    loss, metrics = fn(hidden, weight, rest.pop("targets"), rest.pop("advantages"), rest.pop("mask"), **rest, **kw)
    loss.backward()
    return loss.detach(), metrics, hidden.grad, weight.grad


def drop(case, *names):
    return {k: v for k, v in case.items() if k not in names}


def compare(case, cfg, *, backend="torch", dtype=torch.float32, mult=4.0):
    """Kernel (dtype) vs the float64 reference, with the same-dtype reference as the eager yardstick."""
    got = run(policy_loss, cast(case, dtype), config=cfg, backend=backend)
    ref = run(policy_loss_reference, case, config=cfg)
    eager = run(policy_loss_reference, cast(case, dtype), config=cfg)
    assert got[1].keys() == ref[1].keys(), got[1].keys() ^ ref[1].keys()
    # A scalar's eager error can be luckily tiny; scalars get a floor of a few ulps of the dtype instead (ratios
    # amplify the log-prob's absolute error, which is ~10 ulps for log-probs of magnitude ~log V).
    scalar_floor = torch.finfo(dtype).eps * (16 if dtype == torch.float32 else 1)
    for name, i in (("loss", 0), ("dhidden", 2), ("dweight", 3)):
        assert got[i].dtype == (torch.float32 if name == "loss" else dtype), (name, got[i].dtype)
        assert_close_vs_ref(name, got[i], ref[i], eager[i], mult=mult, floor=scalar_floor if i == 0 else None)
    for k in ref[1]:
        assert got[1][k].dtype == torch.float32 and got[1][k].shape == (), k
        assert_close_vs_ref(f"metric {k}", got[1][k], ref[1][k], eager[1][k], mult=mult, floor=scalar_floor)
    return got, ref


@pytest.mark.parametrize("kl_type", ["k1", "k2", "k3"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_matches_reference_all_terms(loss_agg, kl_type):
    cfg = dataclasses.replace(FULL, loss_agg=loss_agg, kl_type=kl_type)
    got, ref = compare(make_case(seed=1), cfg)
    m = ref[1]
    # the inputs exercise every branch
    assert m["clip_frac_low"] > 0.05 and m["clip_frac_high"] > 0.05 and m["clip_frac_dual"] > 0.02
    assert m["kl_loss"] != 0 and m["entropy_loss"] > 0 and m["rollout_logprob_diff"] > 0
    # loss = policy + kl_coef kl - entropy_coef entropy (every aggregation is linear)
    parts = got[1]["policy_loss"] + cfg.kl_coef * got[1]["kl_loss"] - cfg.entropy_coef * got[1]["entropy_loss"]
    torch.testing.assert_close(got[0], parts, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_on_policy_without_optional_inputs(loss_agg):
    cfg = PolicyLossConfig(loss_agg=loss_agg, loss_agg_norm=64.0, temperature=1.3)
    case = drop(make_case(seed=2, temperature=1.3), "old_logprob", "ref_logprob", "rollout_logprob")
    got, _ = compare(case, cfg)
    m = got[1]
    assert set(m) == {"policy_loss", "clip_frac_low", "clip_frac_high", "ratio_mean", "ratio_max", "approx_kl",
                      "num_tokens", "entropy_loss", "entropy_mean"}
    assert m["ratio_mean"] == 1 and m["ratio_max"] == 1 and m["approx_kl"] == 0
    assert m["clip_frac_low"] == 0 and m["clip_frac_high"] == 0
    assert got[2].abs().sum() > 0  # on-policy ratio exp(logp - logp.detach()) still carries the gradient


@pytest.mark.parametrize("with_old", [True, False])
@pytest.mark.parametrize("with_ref", [True, False])
def test_optional_inputs_combinations(with_old, with_ref):
    case = make_case(seed=3, temperature=1.0)
    names = [n for n, keep in (("old_logprob", with_old), ("ref_logprob", with_ref)) if not keep]
    cfg = PolicyLossConfig(loss_agg="seq-mean-token-mean", kl_coef=0.1 if with_ref else 0.0, kl_type="k3",
                           entropy_coef=-0.02)
    got, _ = compare(drop(case, *names, "rollout_logprob"), cfg)
    assert ("kl_loss" in got[1]) == with_ref and "rollout_logprob_diff" not in got[1]


def test_on_policy_with_truncated_importance_sampling():
    """old_logprob=None with TIS: the weight min(pi/pi_rollout, C) uses the detached logp and carries no gradient."""
    case = drop(make_case(seed=13), "old_logprob", "ref_logprob")
    cfg = PolicyLossConfig(loss_agg="seq-mean-token-sum", tis_cap=1.2, temperature=0.7)
    got, _ = compare(case, cfg)
    assert got[1]["rollout_logprob_diff"] > 0.1


def test_clip_fractions_counted_by_construction():
    """Clip fractions from the constructed log-ratios, independently of the reference's definitions."""
    case = make_case(seed=4)
    _, m, _, _ = run(policy_loss, cast(case, torch.float32), config=FULL, backend="torch")
    valid = case["mask"] & (case["targets"] != -100)
    lr = torch.tensor(LOG_RATIOS).repeat(len(case["mask"]) // len(LOG_RATIOS) + 1)[:len(case["mask"])]
    adv = case["advantages"]
    n = valid.sum()
    high = (valid & (adv > 0) & (lr > 0.3)).sum() / n  # lr 0.5 and 1.5 > log(1.28)
    low = (valid & (adv < 0) & (lr < -0.3)).sum() / n  # lr -0.6 < log(0.8)
    dual = (valid & (adv < 0) & (lr > 1.2)).sum() / n  # lr 1.5 > log(3)
    assert high > 0 and low > 0 and dual > 0
    torch.testing.assert_close(m["clip_frac_high"], high.float())
    torch.testing.assert_close(m["clip_frac_low"], low.float())
    torch.testing.assert_close(m["clip_frac_dual"], dual.float())
    assert m["num_tokens"] == n


def test_float64_agrees_to_roundoff():
    """In float64 the fused path and the reference must agree to ~1e-12: catches formula slips hidden by fp32."""
    case = make_case(seed=5)
    for loss_agg in LOSS_AGGS:
        cfg = dataclasses.replace(FULL, loss_agg=loss_agg, kl_type="k2")
        got = run(policy_loss, case, config=cfg, backend="torch")
        ref = run(policy_loss_reference, case, config=cfg)
        assert got[0].dtype == torch.float64
        for a, b in zip(got[:1] + got[2:], ref[:1] + ref[2:]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for k in ref[1]:
            torch.testing.assert_close(got[1][k], ref[1][k], rtol=1e-6, atol=1e-7, msg=k)


def test_entropy_metric_off_skips_entropy():
    cfg = dataclasses.replace(FULL, entropy_coef=0.0, entropy_metric=False)
    got, _ = compare(make_case(seed=6), cfg)
    assert "entropy_mean" not in got[1] and "entropy_loss" not in got[1]


def test_k3_clamps_extreme_reference():
    """A reference policy far away (log-ratio 30) must give finite k3 values and gradients, as in the reference."""
    case = make_case(seed=7)
    case["ref_logprob"] = case["ref_logprob"] - 30.0 * (torch.arange(97) % 2)
    cfg = dataclasses.replace(FULL, kl_coef=0.5, kl_type="k3")
    got, _ = compare(case, cfg)
    assert all(torch.isfinite(t).all() for t in got[:1] + got[2:])


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_far_off_policy_token_cannot_overflow_the_loss(dual_clip):
    """One token with log(pi / pi_old) = 1000 (a stale or corrupt old log-prob): exp overflows to inf in fp32 and the
    loss would be inf or NaN; the log-ratio is clamped to [-20, 20] first (op and reference alike), so the loss, its
    gradients and the metrics stay finite and the op still matches the reference."""
    case = make_case(seed=13)
    bad = int(case["mask"].nonzero()[5, 0])
    case["old_logprob"][bad] -= 1000.0  # ratio exp(~1000) at a loss token
    case["advantages"][case["mask"]] = -case["advantages"][case["mask"]].abs() - 0.5  # A < 0: pg = -A r, unclipped
    cfg = dataclasses.replace(FULL, dual_clip=dual_clip, tis_cap=None, kl_coef=0.0)
    got, ref = compare(case, cfg)
    for t in (got[0], got[2], got[3], *got[1].values()):
        assert torch.isfinite(t).all()
    assert got[1]["ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-5)  # the clamp, not inf
    # without the clamp, fp32 exp of the same log-ratio is inf: the test cannot pass by luck
    assert torch.isinf(torch.exp(torch.tensor(1000.0)))


def test_value_checks_cost_one_host_sync_and_none_when_off(monkeypatch):
    """policy_loss checks targets, cu_seqlens and finiteness with ONE host read per call (check=True), none with
    check=False; shapes are checked either way."""
    case = cast(make_case(seed=14), torch.float32)
    cfg = dataclasses.replace(FULL, tis_cap=None)
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        orig = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=orig, _name=name, **k):
            reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    rest = {k: v for k, v in case.items() if k not in ("hidden", "weight", "targets", "advantages", "mask")}
    args = (case["hidden"], case["weight"], case["targets"], case["advantages"], case["mask"])
    policy_loss(*args, **rest, config=cfg, backend="torch")
    checked = len(reads)
    reads.clear()
    policy_loss(*args, **rest, config=cfg, backend="torch", check=False)
    unchecked = len(reads)
    assert checked - unchecked == 1, (checked, unchecked)
    assert unchecked == 0, reads
    with pytest.raises(ValueError, match=r"advantages must be \(N,\)"):
        policy_loss(case["hidden"], case["weight"], case["targets"], case["advantages"][:5], case["mask"],
                    config=cfg, backend="torch", check=False)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_no_loss_tokens_gives_zero_loss_and_grads(loss_agg):
    case = make_case(seed=8)
    case["mask"] = torch.zeros_like(case["mask"])
    cfg = dataclasses.replace(FULL, loss_agg=loss_agg)
    loss, metrics, dh, dw = run(policy_loss, cast(case, torch.float32), config=cfg, backend="torch")
    assert loss == 0 and dh.abs().max() == 0 and dw.abs().max() == 0
    assert all(torch.isfinite(v) for v in metrics.values()) and metrics["num_tokens"] == 0
    # an empty batch (N = 0) works too
    empty = {k: (v[:0] if k not in ("weight", "cu_seqlens") else v) for k, v in case.items()}
    empty["cu_seqlens"] = torch.zeros(2, dtype=torch.int32)
    loss, metrics, dh, dw = run(policy_loss, cast(empty, torch.float32), config=cfg, backend="torch")
    assert loss == 0 and dh.shape == (0, 72) and dw.abs().max() == 0


def test_bad_input_errors():
    c = cast(make_case(seed=9), torch.float32)
    args = lambda d: (d["hidden"], d["weight"], d["targets"], d["advantages"], d["mask"])  # noqa: E731
    opt = {k: c[k] for k in ("cu_seqlens", "old_logprob", "ref_logprob", "rollout_logprob")}

    def call(**over):
        d = {**c, **opt, **over}
        return policy_loss(*args(d), **{k: d[k] for k in opt}, config=over.get("config", FULL), backend="torch")

    with pytest.raises(ValueError, match=r"advantages must be \(N,\) = \(97,\)"):
        call(advantages=c["advantages"][:96])
    with pytest.raises(ValueError, match=r"old_logprob must be \(N,\)"):
        call(old_logprob=c["old_logprob"][:, None])
    with pytest.raises(ValueError, match=r"mask must be \(N,\)"):
        call(mask=c["mask"][:50])
    bad_adv = c["advantages"].clone()
    bad_adv[40] = float("nan")  # token 40 is a loss token
    with pytest.raises(ValueError, match=r"advantages\[40\] = nan is not finite"):
        call(advantages=bad_adv)
    bad_adv[40] = float("inf")
    with pytest.raises(ValueError, match=r"advantages\[40\] = inf"):
        call(advantages=bad_adv)
    bad_ref = c["ref_logprob"].clone()
    bad_ref[40] = -float("inf")
    with pytest.raises(ValueError, match=r"ref_logprob\[40\]"):
        call(ref_logprob=bad_ref)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to N=97"):
        call(cu_seqlens=torch.tensor([0, 20, 90], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to N=97"):
        call(cu_seqlens=torch.tensor([0, 50, 40, 97], dtype=torch.int32))
    with pytest.raises(ValueError, match="needs cu_seqlens"):
        call(cu_seqlens=None, config=dataclasses.replace(FULL, loss_agg="seq-mean-token-mean"))
    with pytest.raises(ValueError, match="needs ref_logprob"):
        call(ref_logprob=None)
    with pytest.raises(ValueError, match="needs rollout_logprob"):
        call(rollout_logprob=None)
    with pytest.raises(ValueError, match="weight must be"):
        call(weight=c["weight"][:, :50])
    for bad in (dict(loss_agg="mean"), dict(kl_type="k4"), dict(dual_clip=0.5), dict(clip_low=1.0),
                dict(loss_agg="seq-mean-token-sum-norm", loss_agg_norm=None), dict(temperature=0.0),
                dict(global_tokens=0)):
        with pytest.raises(ValueError, match="PolicyLossConfig"):
            PolicyLossConfig(**bad)


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_micro_batches_with_global_normalisers_sum_to_full_batch(loss_agg):
    """Split into 3 micro-batches (on sequence bounds): summed grads and reduced metrics equal the full batch's."""
    case = make_case(seed=10)
    cfg = dataclasses.replace(FULL, loss_agg=loss_agg)
    full = run(policy_loss, case, config=cfg, backend="torch")
    valid = case["mask"] & (case["targets"] != -100)
    cu = case["cu_seqlens"].tolist()
    n_seqs = sum(int(valid[s:e].any()) for s, e in zip(cu[:-1], cu[1:]))
    gcfg = dataclasses.replace(cfg, global_tokens=float(valid.sum()), global_seqs=float(n_seqs))
    dh, dw, loss, metrics = torch.zeros_like(full[2]), torch.zeros_like(full[3]), 0.0, {}
    for s_lo, s_hi in ((0, 2), (2, 3), (3, 5)):  # sequences per micro-batch
        t0, t1 = cu[s_lo], cu[s_hi]
        part = {k: (v[t0:t1] if k not in ("weight", "cu_seqlens") else v) for k, v in case.items()}
        part["cu_seqlens"] = case["cu_seqlens"][s_lo:s_hi + 1] - t0
        lm, mm, dhm, dwm = run(policy_loss, part, config=gcfg, backend="torch")
        dh[t0:t1] += dhm
        dw += dwm
        loss = loss + lm
        for k, v in mm.items():
            metrics[k] = v if k not in metrics else (metrics[k] + v if METRIC_REDUCE[k] == "sum" else
                                                     torch.maximum(metrics[k], v))
    torch.testing.assert_close(loss, full[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dh, full[2], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dw, full[3], rtol=1e-10, atol=1e-12)
    assert metrics.keys() == full[1].keys()
    for k in metrics:
        torch.testing.assert_close(metrics[k], full[1][k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("loss_agg,entropy_coef", [("seq-mean-token-mean", 0.01), ("token-mean", 0.0)])
def test_triton_backend_matches_reference(loss_agg, entropy_coef):
    """Through Triton's interpreter on CPU (fp32: the interpreter's bf16 tl.dot is broken), on the GPU for real."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = dataclasses.replace(FULL, loss_agg=loss_agg, entropy_coef=entropy_coef)
    compare(make_case(seed=11, seq_lens=(9, 1, 14, 6, 11), v=300, device=device), cfg, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
def test_gpu_bf16_matches_reference(backend):
    if backend == "cuda" and not has_cuda_op("linear_logprob_fwd"):
        pytest.skip("qlfast._C has no linear_logprob_fwd")
    lens = (300, 1, 517, 211, 400, 129)  # N = 1558
    case = make_case(seed=12, seq_lens=lens, h=264, v=5003, device="cuda")
    cfg = dataclasses.replace(FULL, loss_agg="seq-mean-token-mean")
    compare(case, cfg, backend=backend, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_gpu_never_builds_logits(backend):
    """Peak extra memory of fwd+bwd stays well under one fp32 (N, V) logits tensor."""
    n, h, v = 8192, 256, 32768
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    adv = torch.randn(n, device="cuda", generator=g)
    mask = torch.ones(n, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, _ = policy_loss(hidden, weight, targets, adv, mask, config=PolicyLossConfig(entropy_coef=0.01),
                          backend=backend)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < n * v * 4 / 2, f"peak {peak / 2**20:.0f} MiB vs fp32 logits {n * v * 4 / 2**20:.0f} MiB"
