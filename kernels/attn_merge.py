"""Triton twin of the LSE merge of partial attention results (ring attention's per-block update), in place.

    o = o - sigmoid(l_b - l) * (o - o_b),   l = hi - logsigmoid(hi - lo),  hi = max(l, l_b), lo = min(l, l_b)

(ring-flash-attention's log-sigmoid form; see qlfast/ops/attn_merge.py for the derivation and the -inf rules).
Layouts: out (T, H, D) fp32 and lse (H, T) fp32 accumulators; block_out (n, H, D) any float dtype, block_lse (H, n);
optional rows (n,) int64 maps block row i to accumulator row rows[i]. One program per (BLOCK_T rows, head): it
reads each element once and writes it once; arithmetic in fp32. Pointer offsets are int64 so that 1M-token
accumulators (T x H x D > 2^31) address correctly.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _attn_merge_kernel(OUT, LSE, BOUT, BLSE, ROWS, N, D,
                       stride_ot, stride_oh, stride_lh, stride_bt, stride_bh, stride_blh,
                       HAS_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs < N
    offs = offs.to(tl.int64)
    if HAS_ROWS:
        rows = tl.load(ROWS + offs, mask=mask_t, other=0).to(tl.int64)
    else:
        rows = offs
    neg_inf = float("-inf")
    lse = tl.load(LSE + h * stride_lh + rows, mask=mask_t, other=neg_inf)
    blse = tl.load(BLSE + h * stride_blh + offs, mask=mask_t, other=neg_inf).to(tl.float32)
    both_empty = (lse == neg_inf) & (blse == neg_inf)
    w = tl.sigmoid(tl.where(both_empty, neg_inf, blse - lse))  # (BLOCK_T,)
    hi = tl.maximum(lse, blse)
    gap = tl.where(both_empty, 0.0, hi - tl.minimum(lse, blse))  # >= 0, +inf when one side is empty
    # -logsigmoid(gap) = log(1 + exp(-gap)); exp(-gap) <= 1 so this never overflows
    new_lse = tl.where(hi == neg_inf, neg_inf, hi + tl.log(1.0 + tl.exp(-gap)))
    tl.store(LSE + h * stride_lh + rows, new_lse, mask=mask_t)

    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_t[:, None] & (offs_d < D)[None, :]
    o_ptrs = OUT + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :]
    b_ptrs = BOUT + offs[:, None] * stride_bt + h * stride_bh + offs_d[None, :]
    o = tl.load(o_ptrs, mask=mask, other=0.0)
    b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, o - w[:, None] * (o - b), mask=mask)


def launch_args(out, lse, block_out, block_lse, rows=None):
    """(args, constexprs) of _attn_merge_kernel; tensors may be shape-only stand-ins (warm-up)."""
    n, h, d = block_out.shape
    rows_arg = rows if rows is not None else block_lse  # dummy pointer when HAS_ROWS is False
    block_d = triton.next_power_of_2(d)
    args = (out, lse, block_out, block_lse, rows_arg, n, d, out.stride(0), out.stride(1), lse.stride(0),
            block_out.stride(0), block_out.stride(1), block_lse.stride(0))
    return args, dict(HAS_ROWS=rows is not None, BLOCK_T=max(1, min(64, 8192 // block_d)), BLOCK_D=block_d)


def attn_merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor,
                rows: torch.Tensor | None = None) -> None:
    """In place: merge (block_out (n, H, D), block_lse (H, n)) into out (T, H, D) fp32, lse (H, T) fp32."""
    n, h, d = block_out.shape
    if n == 0:
        return
    if out.stride(-1) != 1 or lse.stride(-1) != 1:
        raise ValueError("attn_merge_: out and lse must be contiguous in their last dimension")
    block_out = block_out if block_out.stride(-1) == 1 else block_out.contiguous()
    args, consts = launch_args(out, lse, block_out, block_lse.contiguous(),
                               rows.contiguous() if rows is not None else None)
    _attn_merge_kernel[(triton.cdiv(n, consts["BLOCK_T"]), h)](*args, **consts)
