"""Pack (prompt, response) token sequences into varlen micro-batches: no padding anywhere.

A packed micro-batch is the concatenation of sequences with int32 cu_seqlens boundaries; position ids restart at 0
per sequence; targets are the next token within the same sequence (-100 at each sequence's last position); the loss
mask marks positions whose target is a response token. Per-sequence values (advantages) and per-response-token
values (rollout log-probs) are laid out on the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (T,) int64
    position_ids: torch.Tensor  # (T,) int64
    cu_seqlens: torch.Tensor  # (S+1,) int32
    targets: torch.Tensor  # (T,) int64, -100 where no target
    mask: torch.Tensor  # (T,) float32, 1 where the target is a response token
    advantages: torch.Tensor  # (T,) float32, the sequence's advantage on its response positions
    rollout_logprob: torch.Tensor | None  # (T,) float32, the engine's log-prob of each response target
    seq_index: list[int]  # which input sequences this batch holds, in order

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device) -> PackedBatch:
        move = lambda t: t.to(device) if t is not None else None  # noqa: E731
        return PackedBatch(move(self.input_ids), move(self.position_ids), move(self.cu_seqlens), move(self.targets),
                           move(self.mask), move(self.advantages), move(self.rollout_logprob), self.seq_index)


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], *,
         advantages: Sequence[float] | None = None, rollout_logprobs: Sequence[Sequence[float]] | None = None,
         indices: Sequence[int] | None = None) -> PackedBatch:
    """Pack the given sequences (all of them) into one PackedBatch."""
    ids, pos, tgt, msk, adv, rlp, cu = [], [], [], [], [], [], [0]
    idx = list(indices) if indices is not None else list(range(len(prompts)))
    for i in idx:
        p, r = list(prompts[i]), list(responses[i])
        seq = p + r
        if len(seq) < 2:
            raise ValueError(f"pack: sequence {i} has {len(seq)} tokens; need a prompt and a response")
        n = len(seq)
        ids += seq
        pos += range(n)
        tgt += seq[1:] + [IGNORE]
        # position t predicts token t+1; it is a response target when t+1 >= len(p)
        m = [0.0] * (len(p) - 1) + [1.0] * len(r) + [0.0]
        msk += m
        a = advantages[i] if advantages is not None else 0.0
        adv += [a * x for x in m]
        if rollout_logprobs is not None:
            lp = list(rollout_logprobs[i])
            if len(lp) != len(r):
                raise ValueError(f"pack: sequence {i} has {len(r)} response tokens but {len(lp)} rollout log-probs")
            rlp += [0.0] * (len(p) - 1) + lp + [0.0]
        cu.append(cu[-1] + n)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        targets=torch.tensor(tgt, dtype=torch.long),
        mask=torch.tensor(msk, dtype=torch.float32),
        advantages=torch.tensor(adv, dtype=torch.float32),
        rollout_logprob=torch.tensor(rlp, dtype=torch.float32) if rollout_logprobs is not None else None,
        seq_index=idx,
    )


def split_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Greedy in-order split of sequence indices into groups of at most max_tokens tokens (a longer one goes alone)."""
    groups, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if cur and used + n > max_tokens:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups
