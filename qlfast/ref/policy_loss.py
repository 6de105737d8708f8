"""Reference GRPO/DAPO policy loss, written straight from the equations with the full logits (float64-capable).

This is the tests' yardstick and the "naive eager" benchmark baseline, not a backend: it materialises the (N, V)
logits and log-softmax and lets autograd differentiate everything. It shares no code with qlfast.ops.policy_loss
(which fuses the LM head and never builds (N, V)); both follow the definitions in that module's docstring. It works
in the dtype of `hidden` (bf16/fp16 logits are promoted to fp32), so float64 inputs give a float64 reference.

`config` is read by attribute (a qlfast.ops.policy_loss.PolicyLossConfig), so this module does not import ops.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _kl(log_ratio_ref: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Schulman, "Approximating KL divergence" (2020): estimators of KL(pi || pi_ref) from samples of pi."""
    if kl_type == "k1":
        return log_ratio_ref  # log pi - log pi_ref
    if kl_type == "k2":
        return 0.5 * log_ratio_ref**2
    # k3, the low-variance estimator GRPO uses (DeepSeekMath eq. 4): pi_ref/pi - log(pi_ref/pi) - 1, with verl's
    # clamps (log-ratio to [-20, 20] before exp, value to [-10, 10]) for numerical safety.
    x = (-log_ratio_ref).clamp(-20.0, 20.0)  # log(pi_ref / pi)
    return (torch.exp(x) - x - 1.0).clamp(-10.0, 10.0)


def policy_loss_reference(hidden, weight, targets, advantages, mask, *, cu_seqlens=None, old_logprob=None,
                          ref_logprob=None, rollout_logprob=None, config):
    """-> (loss, metrics): same contract as qlfast.ops.policy_loss, computed the slow, obvious way."""
    cfg = config
    n = hidden.shape[0]
    z = hidden @ weight.T  # (N, V)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    z = z / cfg.temperature
    logp_all = torch.log_softmax(z, dim=-1)  # (N, V)
    valid = (mask != 0) & (targets != IGNORE_INDEX)
    logp = logp_all.gather(1, targets.clamp_min(0).long().unsqueeze(1)).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    f = logp.dtype
    adv = torch.where(valid, advantages.to(f), 0.0)

    old = old_logprob.to(f) if old_logprob is not None else logp.detach()
    # positions outside the loss are replaced by harmless values before any exp (they may hold garbage); the
    # log-ratio is clamped to [-20, 20] so that one far off-policy token cannot overflow exp (verl's clamp)
    ratio = torch.exp(torch.where(valid, logp - old, 0.0).clamp(-20.0, 20.0))
    # PPO clipped surrogate as GRPO writes it (DeepSeekMath arXiv 2402.03300 eq. 3) with DAPO's decoupled
    # clip-higher bounds (arXiv 2503.14476 eq. 8): objective = min(r A, clip(r, 1 - eps_low, 1 + eps_high) A).
    objective = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high) * adv)
    if cfg.dual_clip is not None:
        # dual clip (Ye et al. 2020, arXiv 1912.09729): for A < 0 the objective is bounded below by c A
        objective = torch.where(adv < 0, torch.maximum(objective, cfg.dual_clip * adv), objective)
    pg = -objective
    if cfg.tis_cap is not None:
        # truncated importance sampling against the rollout engine (Yao et al. 2025): min(pi_old/pi_rollout, C)
        w = torch.exp(torch.where(valid, old - rollout_logprob.to(f), 0.0)).clamp(max=cfg.tis_cap)
        pg = pg * w.detach()

    kl = _kl(torch.where(valid, logp - ref_logprob.to(f), 0.0), cfg.kl_type) if ref_logprob is not None else None
    token_loss = pg
    if kl is not None and cfg.kl_coef != 0:
        token_loss = token_loss + cfg.kl_coef * kl
    if cfg.entropy_coef != 0:
        token_loss = token_loss - cfg.entropy_coef * entropy

    # sequences: one per cu_seqlens span, or all tokens as one sequence for token-mean without cu_seqlens
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, n]
    spans = list(zip(bounds[:-1], bounds[1:]))
    counts = [int(valid[s:e].sum()) for s, e in spans]
    nonempty = sum(c > 0 for c in counts)

    def aggregate(x):
        if cfg.loss_agg == "token-mean":  # DAPO eq. 8: every token of the batch weighs the same
            denom = cfg.global_tokens if cfg.global_tokens is not None else max(1, int(valid.sum()))
            return x[valid].sum() / denom
        denom = cfg.global_seqs if cfg.global_seqs is not None else max(1, nonempty)
        total = x.new_zeros(())
        for (s, e), c in zip(spans, counts):
            if c == 0:
                continue
            seq_sum = x[s:e][valid[s:e]].sum()
            if cfg.loss_agg == "seq-mean-token-mean":  # GRPO eq. 3: 1/G sum_i 1/|o_i| sum_t
                total = total + seq_sum / c
            elif cfg.loss_agg == "seq-mean-token-sum":
                total = total + seq_sum
            else:  # Dr. GRPO (arXiv 2503.20783): a constant normaliser in place of 1/|o_i|
                total = total + seq_sum / cfg.loss_agg_norm
        return total / denom

    loss = aggregate(token_loss)
    with torch.no_grad():
        n_tok = int(valid.sum())
        tok_denom = cfg.global_tokens if cfg.global_tokens is not None else max(1, n_tok)
        adv_v, r_v = adv[valid], ratio[valid]

        def tok_mean(x):
            return x[valid].to(f).sum() / tok_denom

        metrics = {
            "policy_loss": aggregate(pg),
            "clip_frac_high": ((adv_v > 0) & (r_v > 1 + cfg.clip_high)).to(f).sum() / tok_denom,
            "clip_frac_low": ((adv_v < 0) & (r_v < 1 - cfg.clip_low)).to(f).sum() / tok_denom,
            "ratio_mean": r_v.sum() / tok_denom,
            "ratio_max": r_v.max() if n_tok else ratio.new_zeros(()),
            "approx_kl": tok_mean(ratio - 1 - torch.log(ratio)),
            "num_tokens": torch.tensor(float(n_tok)),
        }
        if cfg.dual_clip is not None:
            metrics["clip_frac_dual"] = ((adv_v < 0) & (r_v > cfg.dual_clip)).to(f).sum() / tok_denom
        if kl is not None:
            metrics["kl_loss"] = aggregate(kl)
        if cfg.entropy_coef != 0 or cfg.entropy_metric:
            metrics["entropy_loss"] = aggregate(entropy)
            metrics["entropy_mean"] = tok_mean(entropy)
        if rollout_logprob is not None:
            metrics["rollout_logprob_diff"] = tok_mean((logp - rollout_logprob.to(f)).abs())
        metrics = {k: v.detach().float().reshape(()).to(hidden.device) for k, v in metrics.items()}
    return loss, metrics
