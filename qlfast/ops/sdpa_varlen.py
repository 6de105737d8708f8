"""The `sdpa` backend of qlfast.ops.flash_attention: varlen attention with log-sum-exp on PyTorch's CPU flash kernels.

    out, lse = sdpa_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)    # q (Tq, Hq, D), lse (Hq, Tq)
    dq, dk, dv = sdpa_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale)

Why: the Triton kernels run on CPU only through the interpreter, and the `torch` reference materialises score
chunks, so on CPU (CI, the tiny preset) the fast attention is ATen's flash kernel for CPU
(`_scaled_dot_product_flash_attention_for_cpu`, blocked, any head dim). It returns the LSE, and its backward takes
(out, lse) as inputs and recomputes P = exp(S - lse), so, as with the flash kernels, a backward may be given the
FINAL out and lse of a merged attention (ring blocks, shared-prompt attention) and returns that block's share.

Varlen on a padded kernel: sequences are sorted by length and cut into buckets whose padding costs at most
`_PAD_SLACK` of their tokens; each bucket is one (B, H, L, D) call. Padding is on the right. Causal sequences must
have Lq == Lk (with right padding a real query then never sees a pad key); non-causal ones mask pad keys. A real query
row must see at least one key (Lk > 0): rows that see nothing are the `torch` backend's business.

Memory contract: per bucket, the padded copies of q/k/v/out (and of dout/dq/dk/dv in backward); the kernel itself
keeps O(block) scores.
"""

from __future__ import annotations

import torch

_PAD_SLACK = 1.25  # a bucket's padded tokens <= 1.25 x its real tokens (a single sequence is its own bucket)


def _buckets(lq: list[int], lk: list[int]) -> list[list[int]]:
    """Sequence indices grouped so that count x max length stays within _PAD_SLACK x the sum (q and kv)."""
    order = sorted((s for s in range(len(lq)) if lq[s] > 0), key=lambda s: (-lq[s], -lk[s]))
    out: list[list[int]] = []
    cur: list[int] = []
    mq = mk = sq = sk = 0
    for s in order:
        nq, nk, tq, tk = max(mq, lq[s]), max(mk, lk[s]), sq + lq[s], sk + lk[s]
        if cur and ((len(cur) + 1) * nq > _PAD_SLACK * tq or (len(cur) + 1) * nk > _PAD_SLACK * tk):
            out.append(cur)
            cur, nq, nk, tq, tk = [], lq[s], lk[s], lq[s], lk[s]
        cur.append(s)
        mq, mk, sq, sk = nq, nk, tq, tk
    if cur:
        out.append(cur)
    return out


class _Bucket:
    """Index plumbing between packed (T, H, D) rows and one padded (B, H, L, D) batch of sequences."""

    def __init__(self, seqs: list[int], bq: list[int], bk: list[int], causal: bool, device):
        lq = [bq[s + 1] - bq[s] for s in seqs]
        lk = [bk[s + 1] - bk[s] for s in seqs]
        self.b, self.lq, self.lk = len(seqs), max(lq), max(lk)
        self.q_rows, self.q_slots = self._index(seqs, bq, lq, self.lq, device)
        self.k_rows, self.k_slots = self._index(seqs, bk, lk, self.lk, device)
        self.keep = None
        if not causal and any(n != self.lk for n in lk):  # hide pad keys from real queries
            self.keep = torch.arange(self.lk, device=device)[None, :] < torch.tensor(lk, device=device)[:, None]

    def mask(self, dtype) -> torch.Tensor | None:
        """(B, 1, 1, Lk) additive mask in the query dtype (what the kernel takes): -inf on pad keys."""
        if self.keep is None:
            return None
        return torch.zeros(self.keep.shape, dtype=dtype).masked_fill_(~self.keep, float("-inf"))[:, None, None, :]

    @staticmethod
    def _index(seqs, bounds, lengths, lmax, device):
        rows = torch.cat([torch.arange(bounds[s], bounds[s] + n) for s, n in zip(seqs, lengths)])
        slots = torch.cat([torch.arange(i * lmax, i * lmax + n) for i, n in enumerate(lengths)])
        return rows.to(device), slots.to(device)

    def pad(self, x: torch.Tensor, rows, slots, lmax: int, dtype=None) -> torch.Tensor:
        """(T, H, D) packed -> (B, H, L, D) padded (zeros in the pads)."""
        h, d = x.shape[1], x.shape[2]
        buf = x.new_zeros(self.b * lmax, h, d, dtype=dtype or x.dtype)
        buf.index_copy_(0, slots, x.index_select(0, rows).to(buf.dtype))
        return buf.view(self.b, lmax, h, d).transpose(1, 2)

    @staticmethod
    def unpad(xp: torch.Tensor, slots) -> torch.Tensor:
        """(B, H, L, D) -> (n, H, D) rows at `slots`."""
        b, h, lmax, d = xp.shape
        return xp.transpose(1, 2).reshape(b * lmax, h, d).index_select(0, slots)

    def pad_lse(self, lse: torch.Tensor) -> torch.Tensor:
        """(Hq, Tq) -> (B, Hq, Lq); pad rows get 0 (their dout is 0, so they contribute nothing in backward)."""
        buf = lse.new_zeros(lse.shape[0], self.b * self.lq)
        buf[:, self.q_slots] = lse[:, self.q_rows]
        return buf.view(lse.shape[0], self.b, self.lq).transpose(0, 1)


def _bounds(cu: torch.Tensor) -> list[int]:
    return [int(x) for x in cu.tolist()]


def _plan(cu_q, cu_k, causal, device) -> list[_Bucket]:
    bq, bk = _bounds(cu_q), _bounds(cu_k)
    lq = [bq[s + 1] - bq[s] for s in range(len(bq) - 1)]
    lk = [bk[s + 1] - bk[s] for s in range(len(bk) - 1)]
    for s, (a, b) in enumerate(zip(lq, lk)):
        if a and (b == 0 or (causal and a != b)):
            raise ValueError(f"flash_attention(backend='sdpa'): sequence {s} has {a} queries and {b} keys; the sdpa "
                             "backend needs Lk > 0, and Lq == Lk when causal (use backend='torch')")
    return [_Bucket(seqs, bq, bk, causal, device) for seqs in _buckets(lq, lk)]


def _check_device(q):
    if q.device.type != "cpu":
        raise ValueError(f"flash_attention(backend='sdpa'): ATen's flash kernel for CPU needs CPU tensors, got "
                         f"{q.device}; use backend='triton' or 'flash_attn' on CUDA")


def sdpa_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal: bool, scale: float):
    """-> out (Tq, Hq, D) in q's dtype, lse (Hq, Tq) fp32 (fp64 for fp64 inputs). max_q/max_k are unused (the
    buckets know their lengths); they keep the signature of the other backends."""
    _check_device(q)
    group = q.shape[1] // k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(q.shape)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc)
    for bk in _plan(cu_q, cu_k, causal, q.device):
        qp = bk.pad(q, bk.q_rows, bk.q_slots, bk.lq)
        kp = bk.pad(k, bk.k_rows, bk.k_slots, bk.lk).repeat_interleave(group, dim=1)
        vp = bk.pad(v, bk.k_rows, bk.k_slots, bk.lk).repeat_interleave(group, dim=1)
        op, lp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qp, kp, vp, 0.0, causal, attn_mask=bk.mask(qp.dtype), scale=scale)
        out.index_copy_(0, bk.q_rows, bk.unpad(op, bk.q_slots))
        lse[:, bk.q_rows] = lp.transpose(0, 1).reshape(lp.shape[1], -1)[:, bk.q_slots].to(acc)
    return out, lse


def sdpa_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal: bool, scale: float):
    """-> dq, dk, dv in q/k/v's dtypes. out and lse may be the final ones of a merged attention."""
    _check_device(q)
    hkv, group, d = k.shape[1], q.shape[1] // k.shape[1], q.shape[2]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for bk in _plan(cu_q, cu_k, causal, q.device):
        qp = bk.pad(q, bk.q_rows, bk.q_slots, bk.lq)
        kp = bk.pad(k, bk.k_rows, bk.k_slots, bk.lk).repeat_interleave(group, dim=1)
        vp = bk.pad(v, bk.k_rows, bk.k_slots, bk.lk).repeat_interleave(group, dim=1)
        op = bk.pad(out, bk.q_rows, bk.q_slots, bk.lq)
        dop = bk.pad(dout, bk.q_rows, bk.q_slots, bk.lq)
        lp = bk.pad_lse(lse).to(qp.dtype if qp.dtype == torch.float64 else torch.float32).contiguous()
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dop, qp, kp, vp, op, lp, 0.0, causal, attn_mask=bk.mask(qp.dtype), scale=scale)
        dq.index_copy_(0, bk.q_rows, bk.unpad(gq, bk.q_slots))
        # GQA: the query heads that share a kv head add their gradients
        gk = gk.view(bk.b, hkv, group, bk.lk, d).sum(2)
        gv = gv.view(bk.b, hkv, group, bk.lk, d).sum(2)
        dk.index_copy_(0, bk.k_rows, bk.unpad(gk, bk.k_slots))
        dv.index_copy_(0, bk.k_rows, bk.unpad(gv, bk.k_slots))
    return dq, dk, dv
