"""qlfast.ops.shared_prefix_attention: attention for prompt-shared packing, where a group's responses share ONE copy
of its prompt.

GRPO samples G responses per prompt, and in long-document RL the prompt dominates: QwenLong-L1 trains 60K-token
prompts with responses of at most 10K, G = 8. Packing every (prompt, response) pair separately runs the prompt's
forward and backward G times over; packing the group as [prompt | r_1 | ... | r_G] runs it once, with the same
log-probs and the same gradient (the prompt's activations are identical in the G copies, and their gradients add).
At QwenLong-L1's shapes that is 8 x 70K = 560K tokens per group down to 60K + 80K = 140K.

    layout = SharedPrefix.build(group_bounds=[0, 530, 950], prefix_lens=[190, 150])
    out, lse = shared_prefix_attention(q, k, v, cu_seqlens, layout)

Semantics: the packed tokens are cut into groups [group_bounds[g], group_bounds[g+1]); group g's first
prefix_lens[g] tokens are its prompt. cu_seqlens cuts the tokens into segments (each prompt is one segment, each
response another) and every segment attends causally to itself; in addition every token after a group's prompt
attends to ALL of that prompt. (Position ids are the caller's business: a response's continue from its prompt.)

Computed as two attentions merged by their log-sum-exp (qlfast.ops.attn_merge, the step ring attention uses):
    self:  causal varlen attention over the segments                       (flash_attn_varlen_fwd, causal)
    cross: each group's response tokens against its prompt, no mask        (flash_attn_varlen_fwd, non-causal)
Backward runs both blocks' backward kernels with the FINAL merged out and lse (each block's P = exp(S - lse) is its
share of the final softmax) and adds the cross block's dq/dk/dv into the self block's at their rows. No (L, L) mask,
no score matrix beyond what the kernels keep; extra memory is the gathered q of the responses and k/v of the prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qlfast.ops.attn_merge import merge_attn_
from qlfast.ops.flash_attention import _bwd_impl, _fwd_impl, _resolve, _validate


@dataclass(frozen=True)
class SharedPrefix:
    """Where the shared prompts and their responses are in a packed batch (see the module docstring)."""

    q_rows: torch.Tensor
    """(Nq,) int64: the rows of every group's response tokens, group by group."""
    kv_rows: torch.Tensor
    """(Nk,) int64: the rows of every group's prompt tokens, group by group."""
    cu_q: torch.Tensor
    """(G+1,) int32: group g's response tokens are q_rows[cu_q[g]:cu_q[g+1]]."""
    cu_kv: torch.Tensor
    """(G+1,) int32: group g's prompt tokens are kv_rows[cu_kv[g]:cu_kv[g+1]]."""
    max_q: int
    max_kv: int
    boundaries: tuple[int, ...]
    """Every group start, prompt end and group end: each must also be a segment boundary in cu_seqlens."""

    @classmethod
    def build(cls, group_bounds: Sequence[int], prefix_lens: Sequence[int], device=None) -> SharedPrefix:
        gb, pl = [int(x) for x in group_bounds], [int(x) for x in prefix_lens]
        if len(gb) != len(pl) + 1 or gb[0] != 0 or any(b < a for a, b in zip(gb, gb[1:])):
            raise ValueError(f"SharedPrefix: group_bounds must rise from 0 with one more entry than prefix_lens "
                             f"({len(pl)}), got {gb[:8]}")
        for g, p in enumerate(pl):
            if not 0 < p <= gb[g + 1] - gb[g]:
                raise ValueError(f"SharedPrefix: group {g} has {gb[g + 1] - gb[g]} tokens and a prompt of {p}; need "
                                 "0 < prompt <= group")
        q_rows = [torch.arange(gb[g] + p, gb[g + 1]) for g, p in enumerate(pl)]
        kv_rows = [torch.arange(gb[g], gb[g] + p) for g, p in enumerate(pl)]
        nq = [len(r) for r in q_rows]
        cu = lambda n: torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
        bounds = tuple(sorted(set(gb) | {gb[g] + p for g, p in enumerate(pl)}))
        return cls(torch.cat(q_rows).to(device), torch.cat(kv_rows).to(device), cu(nq).to(device), cu(pl).to(device),
                   max(nq), max(pl), bounds)

    def to(self, device) -> SharedPrefix:
        return SharedPrefix(self.q_rows.to(device), self.kv_rows.to(device), self.cu_q.to(device),
                            self.cu_kv.to(device), self.max_q, self.max_kv, self.boundaries)


class _SharedPrefixAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, max_len, layout: SharedPrefix, scale, backend):
        out, lse = _fwd_impl(backend, q, k, v, cu, cu, max_len, max_len, True, scale)
        qx, kx, vx = q.index_select(0, layout.q_rows), k.index_select(0, layout.kv_rows), v.index_select(0,
                                                                                                          layout.kv_rows)
        ox, lx = _fwd_impl(backend, qx, kx, vx, layout.cu_q, layout.cu_kv, layout.max_q, layout.max_kv, False, scale)
        acc = out.to(lse.dtype)  # fp32 accumulator (fp64 for fp64 inputs)
        merge_attn_(acc, lse, ox, lx, rows=layout.q_rows)
        out = acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, cu)
        ctx.layout, ctx.max_len, ctx.scale, ctx.backend = layout, max_len, scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu = ctx.saved_tensors
        lay, dout = ctx.layout, dout.contiguous()
        dq, dk, dv = _bwd_impl(ctx.backend, dout, q, k, v, out, lse, cu, cu, ctx.max_len, ctx.max_len, True,
                               ctx.scale)
        rq, rk = lay.q_rows, lay.kv_rows
        dqx, dkx, dvx = _bwd_impl(ctx.backend, dout.index_select(0, rq), q.index_select(0, rq),
                                  k.index_select(0, rk), v.index_select(0, rk), out.index_select(0, rq),
                                  lse.index_select(1, rq).contiguous(), lay.cu_q, lay.cu_kv, lay.max_q, lay.max_kv,
                                  False, ctx.scale)
        dq.index_add_(0, rq, dqx.to(dq.dtype))
        dk.index_add_(0, rk, dkx.to(dk.dtype))
        dv.index_add_(0, rk, dvx.to(dv.dtype))
        return dq, dk, dv, None, None, None, None, None


def check_layout(cu_seqlens: torch.Tensor, layout: SharedPrefix, total: int) -> None:
    """Every group start, prompt end and group end must be a segment boundary within the T tokens (segments after the
    last group, e.g. a sequence-parallel plan's pad sequence, are plain causal segments). Reads cu_seqlens on the
    host: call once per batch, not per layer."""
    seg = set(int(x) for x in cu_seqlens.tolist())
    missing = [b for b in layout.boundaries if b not in seg]
    if missing or layout.boundaries[-1] > total:
        raise ValueError(f"shared_prefix_attention: every group start, prompt end and group end must be a segment "
                         f"boundary in cu_seqlens, within the T={total} tokens; missing {missing[:8]}, groups end at "
                         f"{layout.boundaries[-1]}")


def shared_prefix_attention(q, k, v, cu_seqlens, layout: SharedPrefix, *, max_seqlen=None, softmax_scale=None,
                            backend="auto", check=True):
    """Causal attention within segments plus each group's responses to its whole prompt -> (out, lse (Hq, T)).

    q (T, Hq, D), k/v (T, Hkv, D) (GQA), cu_seqlens int32 (S+1,) segment bounds that include every boundary of
    `layout`. backend: "auto" or any backend of qlfast.ops.flash_attention (auto as its TABLE orders them: triton on
    CUDA, sdpa on CPU).
    check=False skips the checks that read cu_seqlens on the host (a model checks once per batch, not per layer).
    Differentiable in q, k, v.
    """
    _validate(q, k, v, cu_seqlens, cu_seqlens, check_values=check)
    # the self block is causal over cu_seqlens, the cross block non-causal with every group's prompt as keys
    backend = _resolve(backend, q, causal=True)
    if check:
        check_layout(cu_seqlens, layout, q.shape[0])
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return _SharedPrefixAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, int(max_seqlen),
                                        layout.to(q.device), scale, backend)
