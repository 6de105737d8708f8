"""qlfast.rollout.tp: one vLLM engine over a tensor-parallel group of consecutive torchrun ranks.

    --rollout.tp=2 on 4 ranks:   ranks [0, 1] -> engine 0,  ranks [2, 3] -> engine 1   (vLLM's own TP layout)

Under vLLM's `external_launcher` executor every rank of a TP group runs its own scheduler over its shard of the
model, and the ranks stay in step only if each is given the same requests in the same order (vLLM's torchrun
example relies on this). The trainer's ranks, though, each hold their own prompts (data parallel). So a generate call
on a TP group is a collective of the group:

  1. all-gather every rank's requests (prompts, n, SamplingConfig) over the group, in TP-rank order;
  2. submit them all as one vLLM call, one SamplingParams per prompt: each prompt keeps its own rank's seed, so a
     seeded sample does not depend on which other prompts shared the batch;
  3. return each rank its own slice, in its own order.

Every rank of a group must therefore make the same sequence of generate / prompt_logprobs calls (one with an empty
prompt list joins a call it has nothing for). Training sees the same batch as with one engine per rank: each rank
gets back exactly the samples of its own prompts.
"""

from __future__ import annotations

from collections.abc import Sequence


def tp_layout(world: int, rank: int, tp: int) -> tuple[int, int]:
    """(engine index, rank within the TP group) of `rank`; groups are tp consecutive ranks, as vLLM builds them."""
    if tp < 1 or world % tp:
        raise ValueError(f"--rollout.tp={tp} must divide the number of ranks ({world}): each engine spans tp "
                         "consecutive ranks")
    return rank // tp, rank % tp


def gather(obj, group) -> list:
    """Every group member's `obj`, in group-rank order (all_gather_object over the group's CPU/gloo group)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def concat(parts: Sequence[Sequence]) -> tuple[list, list[int]]:
    """The parts joined in order, and the offset where each part starts (plus the end)."""
    flat, offsets = [], [0]
    for p in parts:
        flat.extend(p)
        offsets.append(len(flat))
    return flat, offsets


def my_slice(results: Sequence, offsets: Sequence[int], index: int) -> list:
    """The results of part `index` of a concat(): what one rank gets back."""
    return list(results[offsets[index]:offsets[index + 1]])
