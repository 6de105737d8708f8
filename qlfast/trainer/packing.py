"""Pack (prompt, response) token sequences into varlen micro-batches: no padding anywhere.

A packed micro-batch is a concatenation of segments with int32 cu_seqlens boundaries. Two layouts:
- one by one: [p_1 r_1][p_2 r_2]..., each pair one segment, position ids restarting at 0;
- prompt-shared (`share_prompts=True`, GRPO groups): consecutive sequences with the same prompt become one group
  [p | r_1 | r_2 | ...] with the prompt stored once; p and every r_i are segments, r_i's positions continue from
  len(p), and `prefix` (qlfast.ops.SharedPrefix) lets every r_i attend to all of p. Same log-probs and gradients as
  one by one, with the prompt's forward and backward done once instead of G times.

The loss lives on `rows`: the token rows whose hidden state predicts a response token, response by response
(`cu_rows` bounds each response's rows). In the shared layout the prompt's last row predicts the first token of
every response, so that row appears G times. Only these rows go through the LM head, never the prompt's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qlfast.ops.shared_prefix import SharedPrefix


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (T,) int64
    cu_seqlens: torch.Tensor  # (S+1,) int32 segment bounds
    prefix: SharedPrefix | None  # the shared-prompt attention layout, None when packed one by one
    rows: torch.Tensor  # (N,) int64 token rows that predict the response tokens
    targets: torch.Tensor  # (N,) int64 the response tokens
    cu_rows: torch.Tensor  # (R+1,) int32: response j's loss rows are rows[cu_rows[j]:cu_rows[j+1]]
    advantages: torch.Tensor  # (N,) float32 each response's advantage on its rows
    rollout_logprob: torch.Tensor | None  # (N,) float32 the engine's log-prob of each response token
    seq_index: list[int]  # which input sequences this batch holds, in order
    # (N,) int64 loss rows of each row's WHOLE response, set when sequence parallel splits a response's rows across
    # ranks (qlfast/trainer/sp.py); None: cu_rows bounds whole responses
    seq_tokens: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device) -> PackedBatch:
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return PackedBatch(move(self.input_ids), move(self.position_ids), move(self.cu_seqlens),
                           self.prefix.to(device) if self.prefix is not None else None, move(self.rows),
                           move(self.targets), move(self.cu_rows), move(self.advantages), move(self.rollout_logprob),
                           self.seq_index, move(self.seq_tokens))


def _same(a, b) -> bool:
    return a is b or list(a) == list(b)


def _runs(prompts, idx: list[int], share: bool) -> list[list[int]]:
    """Consecutive indices with the same prompt (one run per index when not sharing)."""
    runs: list[list[int]] = []
    for i in idx:
        if share and runs and _same(prompts[runs[-1][0]], prompts[i]):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
         advantages: Sequence[float] | None = None, rollout_logprobs: Sequence[Sequence[float]] | None = None,
         indices: Sequence[int] | None = None, share_prompts: bool = False) -> PackedBatch:
    """Pack the given sequences (all of them, in order) into one PackedBatch."""
    idx = list(indices) if indices is not None else list(range(len(prompts)))
    ids, pos, cu, rows, tgt, cu_rows, adv, rlp = [], [], [0], [], [], [0], [], []
    group_bounds, prefix_lens = [0], []
    for run in _runs(prompts, idx, share_prompts):
        p = list(prompts[run[0]])
        if not p:
            raise ValueError(f"pack: sequence {run[0]} has an empty prompt")
        start = len(ids)
        if share_prompts:  # the prompt once, as its own segment
            ids += p
            pos += range(len(p))
            cu.append(len(ids))
        for i in run:
            r = list(responses[i])
            if not r:
                raise ValueError(f"pack: sequence {i} has an empty response")
            if share_prompts:
                last_prompt_row = start + len(p) - 1
            else:
                ids += p
                pos += range(len(p))
                last_prompt_row = len(ids) - 1
            first = len(ids)
            ids += r
            pos += range(len(p), len(p) + len(r))
            cu.append(len(ids))
            # r[0] is predicted by the prompt's last row, r[j] by the row of r[j-1]
            rows += [last_prompt_row] + list(range(first, first + len(r) - 1))
            tgt += r
            cu_rows.append(len(rows))
            adv += [advantages[i] if advantages is not None else 0.0] * len(r)
            if rollout_logprobs is not None:
                if len(rollout_logprobs[i]) != len(r):
                    raise ValueError(f"pack: sequence {i} has {len(r)} response tokens but {len(rollout_logprobs[i])} "
                                     "rollout log-probs")
                rlp += list(rollout_logprobs[i])
        group_bounds.append(len(ids))
        prefix_lens.append(len(p))
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        prefix=SharedPrefix.build(group_bounds, prefix_lens) if share_prompts else None,
        rows=torch.tensor(rows, dtype=torch.long),
        targets=torch.tensor(tgt, dtype=torch.long),
        cu_rows=torch.tensor(cu_rows, dtype=torch.int32),
        advantages=torch.tensor(adv, dtype=torch.float32),
        rollout_logprob=torch.tensor(rlp, dtype=torch.float32) if rollout_logprobs is not None else None,
        seq_index=idx,
    )


def split_by_tokens(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], max_tokens: int, *,
                    share_prompts: bool = False) -> list[list[int]]:
    """Greedy in-order split of sequence indices into micro-batches of at most max_tokens packed tokens (a longer
    sequence goes alone). With share_prompts a prompt costs its tokens once per run of equal prompts in a batch."""
    batches: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in range(len(prompts)):
        shares = share_prompts and cur and _same(prompts[cur[-1]], prompts[i])
        n = len(responses[i]) + (0 if shares else len(prompts[i]))
        if cur and used + n > max_tokens:
            batches.append(cur)
            cur, used, n = [], 0, len(prompts[i]) + len(responses[i])
        cur.append(i)
        used += n
    if cur:
        batches.append(cur)
    return batches


def empty_batch() -> PackedBatch:
    """Two tokens and no loss row: lets a rank with less data join a collective forward/backward (FSDP2); the loss
    over its zero rows is 0 with a graph that reaches every parameter, so the backward's collectives run too."""
    b = pack([[0]], [[0]], advantages=[0.0], rollout_logprobs=[[0.0]])
    none = slice(0, 0)
    b.rows, b.targets, b.advantages, b.rollout_logprob = b.rows[none], b.targets[none], b.advantages[none], \
        b.rollout_logprob[none]
    b.cu_rows = torch.zeros(2, dtype=torch.int32)  # one response with no rows
    b.seq_index = []
    return b
