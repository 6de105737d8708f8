"""qlfast.ops.policy_loss: the GRPO/DAPO policy loss straight from hidden states and the LM head.

    loss, metrics = policy_loss(hidden, lm_head_weight, targets, advantages, mask, cu_seqlens=cu,
                                old_logprob=old, ref_logprob=ref, config=PolicyLossConfig(kl_coef=1e-3))
    loss.backward()

Memory contract: no (N, V) tensor. One fused forward of the linear log-prob kernels gives per-token logp (and
entropy when it is needed) plus the fp32 LSE; everything else is an O(N) epilogue of a few dozen element-wise ops.
Its autograd turns d loss / d logp and d loss / d entropy into per-token weights, and ONE fused backward of the
linear log-prob kernels (recomputing logit tiles from the LSE) turns those into dhidden and dweight. The entropy
gradient is passed as None (not zeros) when the loss does not use entropy, so the backward skips that term.

Per loss token t (mask != 0 and target != -100), with r_t = exp(clamp(logp_t - old_t, -20, 20)) and A_t the advantage
(the clamp keeps one far off-policy token from overflowing the loss; its gradient through r is then zero):
    pg_t   = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))          GRPO eq. 3, DAPO eq. 8 (clip-higher)
             min(pg_t, -c A) for A < 0 when dual_clip = c                  Ye et al. 2020 (arXiv 1912.09729)
             times w_t = min(exp(old_t - rollout_t), tis_cap), detached    TIS, Yao et al. 2025
    kl_t   = k1 | k2 | k3 of (logp_t - ref_t)                             Schulman, "Approximating KL divergence"
    l_t    = pg_t + kl_coef kl_t - entropy_coef H_t
    loss   = sum_t coef_t l_t, coef_t from loss_agg (see _agg_coef): every mode is linear in l, so
             loss = policy_loss + kl_coef kl_loss - entropy_coef entropy_loss holds for the metrics too.
old_logprob=None is on-policy: old_t = logp_t.detach(), r = 1 with the gradient of the policy term.

Global normalisation: with config.global_tokens (token-mean) or config.global_seqs (seq-* modes) set to the count
over the whole global batch, each micro-batch loss is its sum divided by that global count, so SUMMING the gradients
of all micro-batches and data-parallel ranks gives the full-batch gradient (when the data-parallel wrapper averages
gradients, as FSDP2 does, multiply the loss by the world size). Sequences must not be split across micro-batches
in the seq-* modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# (not `from qlfast.ops import linear_logprob`: the package re-exports the function under that name)
from qlfast.ops.linear_logprob import IGNORE_INDEX, TABLE, _LinearLogprob, bad_targets, raise_bad_target
from qlfast.ops.linear_logprob import _validate as _validate_fused

LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0  # |log r| <= 20 before r = exp(log r): r <= 4.9e8, finite in fp32 (verl's clamp)

# How to all-reduce each metric across micro-batches and ranks. "sum" is exact when config.global_tokens (token
# metrics, and the loss parts under token-mean) / config.global_seqs (loss parts under seq-* modes) are set to the
# global counts; without them every "sum" metric is a micro-batch mean (average it over equal-sized shards).
METRIC_REDUCE = {
    "policy_loss": "sum", "kl_loss": "sum", "entropy_loss": "sum", "clip_frac_low": "sum", "clip_frac_high": "sum",
    "clip_frac_dual": "sum", "ratio_mean": "sum", "ratio_max": "max", "approx_kl": "sum", "entropy_mean": "sum",
    "rollout_logprob_diff": "sum", "num_tokens": "sum",
}


@dataclass(frozen=True)
class PolicyLossConfig:
    """Loss-variant choices of the GRPO/DAPO policy loss (the kernels see none of them)."""

    clip_low: float = 0.2
    """Lower clip range eps_low: the ratio is clipped at 1 - clip_low (PPO/GRPO; DAPO eq. 8)."""
    clip_high: float = 0.28
    """Upper clip range eps_high: the ratio is clipped at 1 + clip_high (DAPO eq. 8, sec. Clip-Higher)."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 for negative advantages (Ye et al. 2020): pg <= -c A; None disables."""
    loss_agg: str = "token-mean"
    """token-mean (DAPO) | seq-mean-token-mean (GRPO) | seq-mean-token-sum | seq-mean-token-sum-norm (Dr. GRPO)."""
    loss_agg_norm: float | None = None
    """The constant normaliser of seq-mean-token-sum-norm (Dr. GRPO), e.g. the max response length."""
    kl_coef: float = 0.0
    """Weight of the KL penalty against the reference policy (needs ref_logprob when non-zero)."""
    kl_type: str = "k3"
    """KL estimator of log(pi/pi_ref): k1 | k2 | k3 (low-variance, GRPO eq. 4), after Schulman (2020)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus: the loss subtracts entropy_coef x the aggregated per-token entropy."""
    entropy_metric: bool = True
    """Compute per-token entropy for the metrics even when entropy_coef == 0 (forward only; no backward cost)."""
    temperature: float = 1.0
    """Sampling temperature: logits are divided by it, as the rollout engine did when sampling."""
    tis_cap: float | None = None
    """Truncated importance sampling cap C (Yao et al. 2025): pg x min(pi_old/pi_rollout, C); None disables."""
    global_tokens: float | None = None
    """Loss tokens in the whole global batch (all micro-batches, all ranks): the token-mean denominator."""
    global_seqs: float | None = None
    """Sequences with loss tokens in the whole global batch: the denominator of the seq-* modes."""

    def __post_init__(self):
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"PolicyLossConfig: loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"PolicyLossConfig: kl_type must be one of {KL_TYPES}, got {self.kl_type!r}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"PolicyLossConfig: need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, "
                             f"{self.clip_high}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"PolicyLossConfig: dual_clip must be None or > 1, got {self.dual_clip}")
        if self.loss_agg == "seq-mean-token-sum-norm" and not (self.loss_agg_norm or 0) > 0:
            raise ValueError("PolicyLossConfig: loss_agg='seq-mean-token-sum-norm' needs loss_agg_norm > 0 (e.g. the "
                             f"max response length), got {self.loss_agg_norm}")
        if not self.temperature > 0:
            raise ValueError(f"PolicyLossConfig: temperature must be > 0, got {self.temperature}")
        for name in ("tis_cap", "global_tokens", "global_seqs"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"PolicyLossConfig: {name} must be None or > 0, got {v}")


def _kl(log_ratio: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Schulman (2020) estimators of KL(pi || pi_ref) from log_ratio = log pi - log pi_ref at samples of pi."""
    if kl_type == "k1":
        return log_ratio
    if kl_type == "k2":
        return 0.5 * log_ratio * log_ratio
    # k3 = pi_ref/pi - log(pi_ref/pi) - 1 >= 0 (DeepSeekMath eq. 4), clamped as verl's low_var_kl for safety
    x = (-log_ratio).clamp(-20.0, 20.0)
    return (torch.exp(x) - x - 1.0).clamp(max=10.0)


def _agg_coef(m: torch.Tensor, cu_seqlens: torch.Tensor | None, cfg: PolicyLossConfig, dtype,
              seq_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) weights with loss = sum_t coef_t l_t for cfg.loss_agg; zero outside the loss mask. No host sync."""
    mf = m.to(dtype)
    if cfg.loss_agg == "token-mean":
        # DAPO eq. 8 (sec. Token-Level Policy Gradient Loss): every loss token of the (global) batch weighs the same
        denom = cfg.global_tokens if cfg.global_tokens is not None else mf.sum().clamp_min(1.0)
        return mf / denom
    n, nseq = m.shape[0], cu_seqlens.shape[0] - 1
    seq_id = torch.bucketize(torch.arange(n, device=m.device), cu_seqlens[1:].to(torch.int64), right=True)  # (N,)
    counts = torch.zeros(nseq, dtype=dtype, device=m.device).index_add_(0, seq_id, mf)  # (S,)
    if cfg.global_seqs is not None:
        denom = cfg.global_seqs
    else:  # sequences with no loss token (filtered or fully masked) do not count
        denom = (counts > 0).sum().to(dtype).clamp_min(1.0)
    if cfg.loss_agg == "seq-mean-token-mean":
        # GRPO (DeepSeekMath eq. 3): 1/G sum_i 1/|o_i| sum_t; |o_i| from the caller when o_i's tokens are split
        o_len = counts[seq_id] if seq_tokens is None else seq_tokens.to(dtype)
        return mf / o_len.clamp_min(1.0) / denom
    if cfg.loss_agg == "seq-mean-token-sum":
        return mf / denom
    # Dr. GRPO (arXiv 2503.20783): the length normaliser 1/|o_i| is replaced by a constant (the max response length)
    return mf / (denom * cfg.loss_agg_norm)


def _epilogue(logp, ent, m, advantages, old_logprob, ref_logprob, rollout_logprob, cu_seqlens, cfg, seq_tokens=None):
    """The O(N) part: per-token terms, aggregation and metrics. Differentiable in logp and ent only."""
    f = logp.dtype
    coef = _agg_coef(m, cu_seqlens, cfg, f, seq_tokens)  # (N,)
    a = torch.where(m, advantages.to(f), 0.0)
    old = old_logprob.to(f) if old_logprob is not None else logp.detach()
    # outside the loss mask old/ref/rollout may hold anything: zero the log-ratios before any exp; inside it, clamp
    # the log-ratio (as verl does) so that one token far off-policy cannot overflow exp into an inf / NaN loss
    log_ratio = torch.where(m, logp - old, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    lo, hi = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    # PPO clipped surrogate, GRPO (DeepSeekMath eq. 3) with DAPO's decoupled clip-higher (arXiv 2503.14476 eq. 8)
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(lo, hi))
    if cfg.dual_clip is not None:
        # dual clip (Ye et al. 2020): for A < 0 the loss is bounded by -c A, so a huge ratio cannot blow it up
        pg = torch.where(a < 0, torch.minimum(pg, -cfg.dual_clip * a), pg)
    if cfg.tis_cap is not None:
        # truncated importance sampling (Yao et al. 2025): reweight by min(pi_old / pi_rollout, C), no gradient
        w = torch.exp(torch.where(m, old.detach() - rollout_logprob.to(f), 0.0)).clamp(max=cfg.tis_cap)
        pg = pg * w
    token_loss = pg
    kl = None
    if ref_logprob is not None:
        kl = _kl(torch.where(m, logp - ref_logprob.to(f), 0.0), cfg.kl_type)
        if cfg.kl_coef != 0:
            token_loss = token_loss + cfg.kl_coef * kl
    if ent is not None and cfg.entropy_coef != 0:
        token_loss = token_loss - cfg.entropy_coef * ent
    loss = (coef * token_loss).sum()

    with torch.no_grad():
        mf = m.to(f)
        n_tok = mf.sum()
        tok_denom = cfg.global_tokens if cfg.global_tokens is not None else n_tok.clamp_min(1.0)
        metrics = {
            "policy_loss": (coef * pg).sum(),
            "clip_frac_high": ((a > 0) & (ratio > hi)).to(f).sum() / tok_denom,
            "clip_frac_low": ((a < 0) & (ratio < lo)).to(f).sum() / tok_denom,
            "ratio_mean": (ratio * mf).sum() / tok_denom,
            # outside the mask ratio is 1 but must not count towards the max: ratio > 0, so 0 is neutral
            "ratio_max": (ratio * mf).amax() if ratio.numel() else n_tok * 0,
            # k3 estimate of KL(pi_old || pi) over the loss tokens (Schulman 2020): r - 1 - log r >= 0
            "approx_kl": (ratio - 1.0 - log_ratio).sum() / tok_denom,
            "num_tokens": n_tok,
        }
        if cfg.dual_clip is not None:
            metrics["clip_frac_dual"] = ((a < 0) & (ratio > cfg.dual_clip)).to(f).sum() / tok_denom
        if kl is not None:
            metrics["kl_loss"] = (coef * kl).sum()
        if ent is not None:
            metrics["entropy_loss"] = (coef * ent).sum()
            metrics["entropy_mean"] = (ent * mf).sum() / tok_denom
        if rollout_logprob is not None:
            metrics["rollout_logprob_diff"] = torch.where(m, logp - rollout_logprob.to(f), 0.0).abs().sum() / tok_denom
        metrics = {k: v.float() for k, v in metrics.items()}
    return loss, metrics


def _check_token_tensor(name, t, n, device, *, floating):
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.shape != (n,):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"policy_loss: {name} must be (N,) = ({n},) like targets, got {shape}")
    if floating and not t.is_floating_point():
        raise ValueError(f"policy_loss: {name} must be a floating tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"policy_loss: {name} is on {t.device}, hidden on {device}")


def _validate(hidden, weight, targets, advantages, mask, cu_seqlens, old_logprob, ref_logprob, rollout_logprob,
              cfg, seq_tokens=None, check=True):
    if not isinstance(cfg, PolicyLossConfig):
        raise ValueError(f"policy_loss: config must be a PolicyLossConfig, got {type(cfg).__name__}")
    _validate_fused(hidden, weight, targets, cfg.temperature)
    n, dev = hidden.shape[0], hidden.device
    _check_token_tensor("advantages", advantages, n, dev, floating=True)
    _check_token_tensor("mask", mask, n, dev, floating=False)
    for name, t in (("old_logprob", old_logprob), ("ref_logprob", ref_logprob), ("rollout_logprob", rollout_logprob)):
        _check_token_tensor(name, t, n, dev, floating=True)
    _check_token_tensor("seq_tokens", seq_tokens, n, dev, floating=False)
    if cfg.kl_coef != 0 and ref_logprob is None:
        raise ValueError(f"policy_loss: kl_coef={cfg.kl_coef} needs ref_logprob (N,)")
    if cfg.tis_cap is not None and rollout_logprob is None:
        raise ValueError(f"policy_loss: tis_cap={cfg.tis_cap} needs rollout_logprob (N,)")
    if cfg.loss_agg != "token-mean" and cu_seqlens is None:
        raise ValueError(f"policy_loss: loss_agg={cfg.loss_agg!r} needs cu_seqlens (S+1,) int32 sequence bounds")
    if cu_seqlens is not None and (cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point()):
        raise ValueError(f"policy_loss: cu_seqlens must be an integer (S+1,) tensor with S >= 1, got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    m = (mask != 0) & (targets != IGNORE_INDEX)
    if check:
        _check_values(targets, weight.shape[0], m, cu_seqlens, n, advantages, old_logprob, ref_logprob,
                      rollout_logprob)
    return m


def _check_values(targets, vocab, m, cu_seqlens, n, advantages, old_logprob, ref_logprob, rollout_logprob):
    """Target ids in range, cu_seqlens rising from 0 to N, finite inputs at loss tokens: ONE device sync for all."""
    named = [("advantages", advantages), ("old_logprob", old_logprob), ("ref_logprob", ref_logprob),
             ("rollout_logprob", rollout_logprob)]
    named = [(k, t) for k, t in named if t is not None]
    if not n:
        return
    bad_t = bad_targets(targets, vocab)
    flags = [bad_t.any()] + [(m & ~torch.isfinite(t)).any() for _, t in named]
    if cu_seqlens is not None:
        c = cu_seqlens.long()
        flags.append((c[0] != 0) | (c[-1] != n) | (c.diff() < 0).any())
    bad = torch.stack(flags).tolist()
    if bad[0]:
        raise_bad_target(targets, bad_t, vocab)
    for (name, t), b in zip(named, bad[1:]):
        if b:
            i = int((m & ~torch.isfinite(t)).nonzero()[0, 0])
            raise ValueError(f"policy_loss: {name}[{i}] = {t[i].item()} is not finite (at a loss token)")
    if cu_seqlens is not None and bad[-1]:
        bounds = cu_seqlens.tolist()
        raise ValueError(f"policy_loss: cu_seqlens must rise from 0 to N={n} (cover every token), got "
                         f"{bounds if len(bounds) <= 8 else bounds[:4] + ['...'] + bounds[-2:]}")


def policy_loss(hidden, weight, targets, advantages, mask, *, cu_seqlens=None, old_logprob=None, ref_logprob=None,
                rollout_logprob=None, seq_tokens=None, config=PolicyLossConfig(), backend="auto", check=True):
    """GRPO/DAPO clipped policy loss (+ KL, entropy, TIS) from hidden (N, H) and the LM head weight (V, H).

    targets (N,) int64 (-100 = no token), advantages (N,) per-token, mask (N,) loss mask (response tokens; nonzero
    = in the loss), cu_seqlens (S+1,) int32 sequence bounds (needed by the seq-* modes), old/ref/rollout_logprob
    (N,) log-probs of the targets under the behaviour, reference and rollout-engine policies (at the same
    temperature). seq_tokens (N,) integer: the loss tokens of each token's WHOLE sequence, for seq-mean-token-mean
    when a sequence's tokens are split across calls (sequence parallel); default: counted within cu_seqlens.
    Returns (loss 0-dim fp32, or fp64 for fp64 inputs; metrics: dict of fp32 0-dim tensors, see
    METRIC_REDUCE for how to all-reduce them). A mask with no tokens gives loss 0 and zero gradients.
    backend: "auto" | "triton" | "cuda" | "torch" (the fused linear log-prob kernels underneath; auto as
    qlfast.ops.linear_logprob.TABLE orders them). check=False skips the value checks (target ids, cu_seqlens bounds,
    finite inputs), which cost one device sync per call; shapes are always checked.
    """
    cfg = config
    m = _validate(hidden, weight, targets, advantages, mask, cu_seqlens, old_logprob, ref_logprob, rollout_logprob,
                  cfg, seq_tokens, check)
    backend = TABLE.resolve(backend, hidden.device)
    with_entropy = cfg.entropy_coef != 0 or cfg.entropy_metric
    # tokens outside the loss get the ignore index: logp = entropy = 0 there and the backward skips them
    tgt = torch.where(m, targets.long(), IGNORE_INDEX)
    if hidden.shape[0] == 0:
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        zero = (hidden.sum() + weight.sum()).to(acc) * 0.0  # keeps the graph so .backward() gives zero grads
        logp = hidden.new_zeros(0, dtype=acc) + zero
        ent = logp.clone() if with_entropy else None
    else:
        # the shared fused Function leaves the grad of an unused output (entropy when entropy_coef == 0) as None,
        # so its backward skips that term
        logp, ent, _ = _LinearLogprob.apply(hidden.contiguous(), weight.contiguous(), tgt,
                                            1.0 / float(cfg.temperature), with_entropy, backend)
    return _epilogue(logp, ent, m, advantages, old_logprob, ref_logprob, rollout_logprob, cu_seqlens, cfg, seq_tokens)
