"""qlfast.ops.attn_merge: merge partial attention results by their log-sum-exp, the step that ring attention repeats
for every kv block (and shared-prompt attention does once).

Two attentions of the same query rows over disjoint key sets K1 and K2, (o1, l1) and (o2, l2), combine exactly into
the attention over K1 u K2:
    l = log(e^l1 + e^l2),   o = (e^l1 o1 + e^l2 o2) / e^l = o1 - sigmoid(l2 - l1) (o1 - o2)
Computed in the log-sigmoid form of ring-flash-attention (zhuzilin/ring-flash-attention, `update_out_and_lse`),
which never exponentiates a raw lse and so cannot overflow:
    o = o1 - sigmoid(l2 - l1) * (o1 - o2),   l = hi - logsigmoid(hi - lo)  with hi = max(l1, l2), lo = min(l1, l2)
(l1 - logsigmoid(l1 - l2) is the same value; ordering the arguments keeps it finite when l1 is -inf.)
A row that has seen no key yet has lse -inf and out 0 (flash-attn's varlen convention); merging two such rows
leaves them -inf and 0, never NaN.

Layouts (those of qlfast.ops.flash_attention): out (T, H, D) accumulator in fp32 (fp64 for fp64 inputs), lse
(H, T) in the same dtype, updated in place; block_out (n, H, D) in any float dtype, block_lse (H, n) fp32.
With `rows` (n,) int64 the block covers only those rows of the accumulator (ring attention's zigzag steps that
update only the second half of each sequence); without it n == T.

Memory contract: in place; the triton and cuda backends read and write each element once with no temporaries;
the torch backend makes O(n x H x D) temporaries.
"""

from __future__ import annotations

import torch

from qlfast.ops import _dispatch

_NEG_INF = float("-inf")


def _validate(out, lse, block_out, block_lse, rows):
    if out.dim() != 3 or lse.shape != (out.shape[1], out.shape[0]):
        raise ValueError(f"merge_attn_: out must be (T, H, D) and lse (H, T); got out {tuple(out.shape)}, "
                         f"lse {tuple(lse.shape)}")
    n = out.shape[0] if rows is None else rows.shape[0]
    if rows is not None and (rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32)):
        raise ValueError(f"merge_attn_: rows must be a 1-D int64 index tensor, got {rows.dtype} {tuple(rows.shape)}")
    if block_out.shape != (n, out.shape[1], out.shape[2]) or block_lse.shape != (out.shape[1], n):
        raise ValueError(f"merge_attn_: block_out must be (n, H, D) = {(n, *out.shape[1:])} and block_lse (H, n) = "
                         f"{(out.shape[1], n)}; got {tuple(block_out.shape)}, {tuple(block_lse.shape)}")
    if out.dtype not in (torch.float32, torch.float64) or lse.dtype != out.dtype:
        raise ValueError(f"merge_attn_: the accumulators out and lse must both be fp32 (or fp64), got {out.dtype}, "
                         f"{lse.dtype}")


def merge_attn_torch_(out, lse, block_out, block_lse, rows=None):
    """The torch backend of merge_attn_ (any device, fp64-capable)."""
    o = out if rows is None else out.index_select(0, rows)  # (n, H, D)
    l_ = lse if rows is None else lse.index_select(1, rows)  # (H, n)
    bl = block_lse.to(l_.dtype)
    both_empty = torch.isneginf(l_) & torch.isneginf(bl)
    # sigmoid(l2 - l1): 1 when only the block has seen keys, 0 when only the accumulator has, 0 when neither has
    w = torch.sigmoid(torch.where(both_empty, _NEG_INF, bl - l_))
    o_new = o - w.T.unsqueeze(-1) * (o - block_out.to(o.dtype))
    hi, lo = torch.maximum(l_, bl), torch.minimum(l_, bl)
    gap = torch.where(both_empty, 0.0, hi - lo)  # >= 0, +inf when one side is empty
    l_new = torch.where(torch.isneginf(hi), _NEG_INF, hi - torch.nn.functional.logsigmoid(gap))
    if rows is None:
        out.copy_(o_new)
        lse.copy_(l_new)
    else:
        out.index_copy_(0, rows, o_new)
        lse.index_copy_(1, rows, l_new)
    return out, lse


def _fp32_only(dtype=None, **_) -> str | None:
    return None if dtype in (None, torch.float32) else f"it needs fp32 accumulators, got {dtype}"


def _cuda_supports(dtype=None, rows=None, **_) -> str | None:
    if rows is not None:
        return "it merges whole blocks only (rows=None)"
    return _fp32_only(dtype)


# Backends fastest first. Neither GPU backend has been timed against the other (both read and write each element
# once: memory bound, same arithmetic in fp32): triton, which also takes `rows`, goes first until a row under
# bench/results/ (scripts/gpu_proof.sh times both) shows the cuda op faster. CPU: the torch version.
TABLE = _dispatch.Table(
    "merge_attn_",
    [_dispatch.triton_backend("cpu", "cuda", supports=_fp32_only),
     _dispatch.cuda_backend("attn_merge_", supports=_cuda_supports), _dispatch.TORCH],
    order={"cuda": ("triton", "cuda", "torch"), "cpu": ("torch", "triton")},
)


def merge_attn_(out, lse, block_out, block_lse, rows=None, *, backend="auto"):
    """In-place merge of a block's (block_out, block_lse) into the accumulators (out, lse); returns (out, lse).

    out (T, H, D) fp32/fp64, lse (H, T) same dtype; block_out (n, H, D), block_lse (H, n); rows (n,) int64 selects
    the accumulator rows the block covers (all T rows when None). backend: "auto" (as TABLE orders them: triton on
    CUDA, torch on CPU) | "cuda" (rows=None only) | "triton" | "torch". triton and cuda need fp32 accumulators.
    """
    _validate(out, lse, block_out, block_lse, rows)
    if rows is not None:
        rows = rows.long()
    backend = TABLE.resolve(backend, out.device, dtype=out.dtype, rows=rows)
    if backend == "torch":
        return merge_attn_torch_(out, lse, block_out, block_lse, rows)
    if backend == "cuda":
        from qlfast.ops import _cuda

        _cuda.attn_merge_(out, lse, block_out.contiguous(), block_lse.float().contiguous())
        return out, lse
    from qlfast.kernels import attn_merge as _tri

    _tri.attn_merge_(out, lse, block_out, block_lse, rows)
    return out, lse
