"""Pure-torch linear log-prob: the `torch` backend of qlfast.ops.linear_logprob and the tests' yardstick.

Memory contract: never materialises the (N, V) logits. Rows are processed in chunks of `chunk_rows(V)`, so the
extra memory is O(chunk x V) (32 MiB of fp32 logits per chunk, at most three such arrays live) plus O(N) for the
saved log-sum-exp.
The LSE, the entropy and dW accumulate in fp32 whatever the input dtype.

Math (z = h W^T / T, p = softmax(z), t = target):
    logprob = z_t - lse,    entropy = lse - sum_j p_j z_j
    d logprob / dz_j = [j = t] - p_j
    d entropy / dz_j = -p_j (z_j - lse + entropy)
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
_CHUNK_BYTES = 32 * 2**20


def chunk_rows(vocab: int) -> int:
    return max(16, _CHUNK_BYTES // (4 * max(vocab, 1)))


def _logits(h: torch.Tensor, w: torch.Tensor, inv_temp: float) -> torch.Tensor:
    # (C, V) in fp32; inputs that are already fp32/fp64 keep their precision.
    z = h @ w.T
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    return z.mul_(inv_temp) if inv_temp != 1.0 else z


def forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temp: float,
            with_entropy: bool):
    """-> logprob (N,), entropy (N,) or None, lse (N,); fp32 (fp64 for fp64 inputs)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logprob = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    entropy = torch.empty(n, dtype=acc, device=hidden.device) if with_entropy else None
    step = chunk_rows(vocab)
    for s in range(0, n, step):
        e = min(n, s + step)
        z = _logits(hidden[s:e], weight, inv_temp)  # (C, V)
        t = targets[s:e]
        valid = t != IGNORE_INDEX
        m = torch.logsumexp(z, dim=-1)
        lse[s:e] = m
        zt = z.gather(1, t.clamp_min(0).unsqueeze(1)).squeeze(1)
        logprob[s:e] = torch.where(valid, zt - m, 0.0)
        if with_entropy:
            p = torch.sub(z, m[:, None]).exp_()  # in place: at most two (C, V) arrays live
            ent = m - p.mul_(z).sum(-1)
            entropy[s:e] = torch.where(valid, ent, 0.0)
    return logprob, entropy, lse


def backward(hidden, weight, targets, lse, entropy, grad_logprob, grad_entropy, inv_temp: float):
    """-> dhidden (N, H) in hidden's dtype, dweight (V, H) in weight's dtype (accumulated in fp32)."""
    n, vocab = hidden.shape[0], weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if grad_logprob is None and grad_entropy is None:
        return torch.zeros_like(hidden), torch.zeros_like(weight)
    dhidden = torch.empty_like(hidden)
    dweight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    w_acc = weight if weight.dtype == acc else None
    step = chunk_rows(vocab)
    for s in range(0, n, step):
        e = min(n, s + step)
        h = hidden[s:e]
        z = _logits(h, weight, inv_temp)  # (C, V)
        t = targets[s:e]
        valid = (t != IGNORE_INDEX).to(acc)
        m = lse[s:e, None].to(acc)
        p = torch.sub(z, m).exp_()  # (C, V)
        g_lp = (grad_logprob[s:e].to(acc) * valid) if grad_logprob is not None else None
        # dz is built in place in z's (then p's) storage: at most two (C, V) arrays live at once
        if grad_entropy is not None:
            g_en = grad_entropy[s:e].to(acc) * valid
            dz = z.sub_(m).add_(entropy[s:e, None].to(acc)).mul_(p).mul_(-g_en[:, None])
            if g_lp is not None:
                dz.addcmul_(p, g_lp[:, None], value=-1.0)
            del p
        else:
            dz = p.mul_(-g_lp[:, None])
        if g_lp is not None:
            dz.scatter_add_(1, t.clamp_min(0).unsqueeze(1), g_lp.unsqueeze(1))
        if inv_temp != 1.0:
            dz *= inv_temp
        if w_acc is not None:
            dhidden[s:e] = (dz @ w_acc).to(hidden.dtype)
            dweight += dz.T @ h.to(acc)
        else:
            dzc = dz.to(weight.dtype)
            dhidden[s:e] = (dzc @ weight).to(hidden.dtype)
            dweight += (dzc.T @ h).to(acc)
    return dhidden, dweight.to(weight.dtype)


def naive_linear_logprob(hidden, weight, targets, temperature: float = 1.0, return_entropy: bool = False):
    """Full-logits eager version (materialises (N, V)): the 'naive eager' baseline, differentiable by autograd."""
    z = hidden @ weight.T
    z = (z.float() if z.dtype in (torch.float16, torch.bfloat16) else z) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != IGNORE_INDEX
    logprob = logp_all.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1) * valid
    if not return_entropy:
        return logprob
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    return logprob, entropy
