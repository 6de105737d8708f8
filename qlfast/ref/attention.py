"""Pure-torch varlen attention with GQA and log-sum-exp: the `torch` backend of qlfast.ops.flash_attention and the
tests' float64 yardstick.

Semantics (flash-attn's varlen functions): q (Tq, Hq, D), k and v (Tk, Hkv, D) hold packed sequences delimited by
int32 cu_seqlens_q (S+1,) and cu_seqlens_k (S+1,); sequence s attends q[cu_q[s]:cu_q[s+1]] to k/v[cu_k[s]:cu_k[s+1]].
Query head h reads kv head h // (Hq // Hkv). The causal mask is bottom-right aligned: with Lq queries and Lk keys,
query i sees key j iff j <= i + (Lk - Lq). A query row that sees no key gives out 0 and lse -inf.

Memory contract: per sequence, queries are processed in chunks of `_CHUNK_ROWS`, so the extra memory is
O(Hq x chunk x Lk) scores, never the full (Hq, Lq, Lk) matrix of a long sequence.
Precision: fp64 inputs compute in fp64 (lse fp64); every other dtype computes in fp32 (lse fp32) and casts the
outputs back to the input dtype. `naive_attention(..., upcast=False)` instead computes in the input dtype: the
"same-dtype eager" baseline of the tests.

Backward (Dao, FlashAttention-2, Alg. 2), with P recomputed from the given lse, so that out and lse may be the
final merged ones of a ring (each block's P = exp(S - lse_final) is then that block's share of the final softmax):
    P = exp(scale * Q K^T - lse),  D_i = rowsum(dO * O)
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = scale dS K,  dK = scale dS^T Q
"""

from __future__ import annotations

import math

import torch

_CHUNK_ROWS = 1024


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _bounds(cu_seqlens: torch.Tensor) -> list[int]:
    return [int(x) for x in cu_seqlens.tolist()]


def _visible(lq: int, lk: int, r0: int, r1: int, causal: bool, device) -> torch.Tensor | None:
    """(r1 - r0, lk) bool mask of the keys each query row in [r0, r1) sees, or None when it sees all of them."""
    if not causal:
        return None
    rows = torch.arange(r0, r1, device=device)[:, None]
    cols = torch.arange(lk, device=device)[None, :]
    return cols <= rows + (lk - lq)


def _scores(q, k, scale, mask):
    # q (C, Hq, D), k (Lk, Hq, D) -> (Hq, C, Lk) scaled scores, -inf where masked
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask[None], float("-inf"))
    return s


def _expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    # (L, Hkv, D) -> (L, Hq, D): query head h reads kv head h // group
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _check_scale(softmax_scale, d):
    return 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool = True, softmax_scale: float | None = None):
    """-> out (Tq, Hq, D) in q's dtype, lse (Hq, Tq) fp32 (fp64 for fp64 inputs)."""
    tq, hq, d = q.shape
    group = hq // k.shape[1]
    scale = _check_scale(softmax_scale, d)
    acc = _acc_dtype(q)
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((hq, tq), float("-inf"), dtype=acc, device=q.device)
    bq, bk = _bounds(cu_seqlens_q), _bounds(cu_seqlens_k)
    for s in range(len(bq) - 1):
        q0, q1, k0, k1 = bq[s], bq[s + 1], bk[s], bk[s + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        ks = _expand_kv(k[k0:k1].to(acc), group)  # (Lk, Hq, D)
        vs = _expand_kv(v[k0:k1].to(acc), group)
        for r0 in range(0, lq, _CHUNK_ROWS):
            r1 = min(lq, r0 + _CHUNK_ROWS)
            sc = _scores(q[q0 + r0:q0 + r1].to(acc), ks, scale, _visible(lq, lk, r0, r1, causal, q.device))
            m = torch.logsumexp(sc, dim=-1)  # (Hq, C); -inf for rows that see nothing
            p = torch.exp(sc - torch.where(torch.isinf(m), 0.0, m)[..., None])  # exact zeros on empty rows
            out[q0 + r0:q0 + r1] = torch.einsum("hqk,khd->qhd", p, vs).to(q.dtype)
            lse[:, q0 + r0:q0 + r1] = m
    return out, lse


def backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal: bool = True,
             softmax_scale: float | None = None):
    """-> dq, dk, dv in q/k/v's dtypes (accumulated in fp32, fp64 for fp64 inputs)."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = _check_scale(softmax_scale, d)
    acc = _acc_dtype(q)
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    bq, bk = _bounds(cu_seqlens_q), _bounds(cu_seqlens_k)
    for s in range(len(bq) - 1):
        q0, q1, k0, k1 = bq[s], bq[s + 1], bk[s], bk[s + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0 or lk == 0:
            continue
        ks = _expand_kv(k[k0:k1].to(acc), group)  # (Lk, Hq, D)
        vs = _expand_kv(v[k0:k1].to(acc), group)
        dks = torch.zeros(lk, hq, d, dtype=acc, device=q.device)
        dvs = torch.zeros(lk, hq, d, dtype=acc, device=q.device)
        for r0 in range(0, lq, _CHUNK_ROWS):
            r1 = min(lq, r0 + _CHUNK_ROWS)
            qc = q[q0 + r0:q0 + r1].to(acc)  # (C, Hq, D)
            doc = dout[q0 + r0:q0 + r1].to(acc)
            sc = _scores(qc, ks, scale, _visible(lq, lk, r0, r1, causal, q.device))  # (Hq, C, Lk)
            lc = lse[:, q0 + r0:q0 + r1].to(acc)
            # rows with lse = -inf saw no key: their P is 0 (exp(-inf - +inf)), not NaN
            p = torch.exp(sc - torch.where(torch.isinf(lc), float("inf"), lc)[..., None])
            delta = (doc * out[q0 + r0:q0 + r1].to(acc)).sum(-1).T  # (Hq, C)
            dvs += torch.einsum("hqk,qhd->khd", p, doc)
            dp = torch.einsum("qhd,khd->hqk", doc, vs)
            ds = p * (dp - delta[..., None])
            dq[q0 + r0:q0 + r1] = (torch.einsum("hqk,khd->qhd", ds, ks) * scale).to(q.dtype)
            dks += torch.einsum("hqk,qhd->khd", ds, qc) * scale
        dk[k0:k1] = dks.view(lk, hkv, group, d).sum(2)
        dv[k0:k1] = dvs.view(lk, hkv, group, d).sum(2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def naive_attention(q, k, v, cu_seqlens_q, cu_seqlens_k=None, causal: bool = True,
                    softmax_scale: float | None = None, upcast: bool = True):
    """Differentiable per-sequence attention by autograd -> (out (Tq, Hq, D), lse (Hq, Tq)).

    upcast=True computes in fp32 (fp64 for fp64 inputs): the reference. upcast=False computes the scores, softmax
    and output in the input dtype: the 'same-dtype eager' baseline whose error bounds a kernel's error in tests.
    """
    cu_seqlens_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    hq, d = q.shape[1], q.shape[2]
    group = hq // k.shape[1]
    scale = _check_scale(softmax_scale, d)
    dt = _acc_dtype(q) if upcast else q.dtype
    bq, bk = _bounds(cu_seqlens_q), _bounds(cu_seqlens_k)
    outs, lses = [], []
    for s in range(len(bq) - 1):
        q0, q1, k0, k1 = bq[s], bq[s + 1], bk[s], bk[s + 1]
        lq, lk = q1 - q0, k1 - k0
        ks, vs = _expand_kv(k[k0:k1].to(dt), group), _expand_kv(v[k0:k1].to(dt), group)
        sc = _scores(q[q0:q1].to(dt), ks, scale, _visible(lq, lk, 0, lq, causal, q.device))  # (Hq, Lq, Lk)
        m = torch.logsumexp(sc, dim=-1) if lk else sc.new_full((hq, lq), float("-inf"))
        p = torch.softmax(sc, dim=-1) if lk else sc
        p = torch.nan_to_num(p, nan=0.0)  # rows that see no key
        outs.append(torch.einsum("hqk,khd->qhd", p, vs).to(q.dtype))
        lses.append(m)
    return torch.cat(outs, 0), torch.cat(lses, 1)
