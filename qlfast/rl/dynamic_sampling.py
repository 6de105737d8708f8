"""DAPO dynamic sampling (Yu et al. 2025, "DAPO", section 3.2, eq. 11's constraint 0 < |{correct}| < G).

A group whose G rewards are all equal has zero advantage for every response (GRPO normalises within the group),
so it contributes no gradient and only dilutes the batch. Dynamic sampling drops such groups and generates more
prompts until the batch holds `target` groups with reward variance:

    kept = []
    for round in 1..max_rounds:
        groups = generate(round)                    # a fresh batch of prompts, G rollouts each, with rewards
        kept += [g for g in groups if max(g.rewards) - min(g.rewards) > tol]
        if enough(kept): break                      # default len(kept) >= target
    return kept[:target]                            # surplus groups are discarded (DAPO trains on exactly `target`)

Which rewards: the answer rewards (`group.rewards`: rule, judge, their max; each 0 or 1), not the overlong-shaped
ones, with tol = 0. Eq. 11 constrains the number of *correct* responses: a group all right or all wrong is dropped,
as in the DAPO recipe (verl's `filter_groups.metric=acc`). Shaped rewards can differ inside such a group only
through the overlong penalty, so filtering on them would keep all-wrong groups and train them on response length
alone, and a sampling rule that depends on the length budget would change which prompts train with it.

Data parallel: each rank generates its share of every round; `enough` is then a collective (every rank calls it
once per round) so that all ranks stop after the same round.

If `max_rounds` rounds do not reach `target`, the driver returns what it has (possibly nothing) with
`complete=False` and a message saying so; the trainer logs it and trains on the smaller batch (or skips the step
when it is empty) instead of stalling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


def group_has_variance(rewards: torch.Tensor, group_size: int, tol: float = 0.0) -> torch.Tensor:
    """rewards (B*G,) or (B, G) -> (B,) bool: True where the group's rewards are not all equal (max - min > tol)."""
    if rewards.numel() % group_size or group_size <= 0:
        raise ValueError(f"rewards with {rewards.numel()} entries do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size)
    return (r.max(dim=1).values - r.min(dim=1).values) > tol


@dataclass
class DynamicSamplingResult:
    groups: list[Any]  # kept groups, at most `target`, in generation order
    target: int
    rounds: int  # generation rounds used
    generated: int  # groups generated in all rounds
    dropped: int  # groups dropped for zero reward variance
    surplus: int  # groups with variance beyond `target`, discarded
    complete: bool  # whether `target` was reached
    per_round: list[int] = field(default_factory=list)  # groups kept in each round

    @property
    def message(self) -> str:
        head = (f"dynamic sampling: {len(self.groups)}/{self.target} groups with reward variance after "
                f"{self.rounds} round(s) ({self.generated} generated, {self.dropped} dropped as zero-variance")
        if self.complete:
            return head + f", {self.surplus} surplus)"
        return head + f"); max rounds reached, training on {len(self.groups)} group(s)"


def _rewards_attr(group: Any) -> Sequence[float]:
    return group.rewards


def dynamic_sample(generate: Callable[[int], Sequence[Any]], target: int, max_rounds: int, *,
                   rewards_of: Callable[[Any], Sequence[float]] = _rewards_attr, tol: float = 0.0,
                   enough: Callable[[list[Any]], bool] | None = None) -> DynamicSamplingResult:
    """Call `generate(round)` (round = 0, 1, ...) until `enough(kept)` (default: `target` groups with reward
    variance) or `max_rounds` rounds; -> the first `target` kept groups and the counts."""
    if target <= 0 or max_rounds <= 0:
        raise ValueError(f"target and max_rounds must be positive, got target={target} max_rounds={max_rounds}")
    kept: list[Any] = []
    generated = dropped = rounds = 0
    per_round = []
    while rounds < max_rounds:
        groups = list(generate(rounds))
        rounds += 1
        generated += len(groups)
        n_before = len(kept)
        for g in groups:
            r = [float(x) for x in rewards_of(g)]
            if r and max(r) - min(r) > tol:
                kept.append(g)
            else:
                dropped += 1
        per_round.append(len(kept) - n_before)
        if enough(kept) if enough is not None else len(kept) >= target:
            break
    surplus = max(0, len(kept) - target)
    return DynamicSamplingResult(groups=kept[:target], target=target, rounds=rounds, generated=generated,
                                 dropped=dropped, surplus=surplus, complete=len(kept) >= target, per_round=per_round)
