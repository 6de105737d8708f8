"""Difficulty-aware retrospective sampling (QwenLong-L1 section 3.3). No public implementation exists; this is the
exact rule qlfast uses.

Difficulty table. Every RL step records, for each prompt uid, the correctness rewards of its G rollouts under the
current phase index p: sum[uid, p] += sum(rewards), count[uid, p] += G (rewards are clipped to [0, 1], so pass the
answer reward, not the overlong-shaped one). For a later phase q, an example's mean reward is
    m(uid | q) = sum_{p<q} sum[uid, p] / sum_{p<q} count[uid, p]          (only earlier phases count)
and its difficulty is
    one_minus: d = 1 - m                      (in [0, 1])
    inverse:   d = min(1 / m, cap), d = cap when m = 0   (the paper's "inverse mean reward", capped)
The pool for phase q holds the examples seen in some phase p < q whose mean reward is below `hard_threshold`
(default 1: anything not solved by every rollout) and whose difficulty is > 0, sorted by uid.

Batch composition. In phase q, a batch of B prompts has n_retro = round(fraction * B) prompts drawn from the pool
(0 when the pool is empty or q == 0) and B - n_retro fresh prompts from the phase's own bin (curriculum sampler).
The n_retro draws are independent, with replacement, each picking uid with probability
    P(uid) = d(uid) / sum_{u in pool} d(u)
from `random.Random(f"{seed}/{q}/{step}")`: a batch depends only on (seed, phase, step, table), so resuming from a
checkpointed table reproduces it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class RetrospectiveConfig:
    """Difficulty-aware retrospective sampling settings."""

    fraction: float = 0.25  # share of each later-phase batch drawn from earlier phases' hard examples
    mode: str = "inverse"  # "inverse" (1 / mean reward, capped; the paper) or "one_minus" (1 - mean reward)
    cap: float = 10.0  # upper bound of the inverse difficulty (and its value for mean reward 0)
    hard_threshold: float = 1.0  # an example is hard when its mean reward is strictly below this
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if self.mode not in ("inverse", "one_minus"):
            raise ValueError(f"mode must be 'inverse' or 'one_minus', got {self.mode!r}")
        if self.cap < 1.0:
            raise ValueError(f"cap must be >= 1 (1 / mean reward is >= 1), got {self.cap}")


class DifficultyTable:
    """Per-example reward sums and counts per phase; see the module docstring for the rule."""

    def __init__(self, cfg: RetrospectiveConfig = RetrospectiveConfig()):
        self.cfg = cfg
        self.records: dict[str, dict[int, list[float]]] = {}  # uid -> phase -> [reward sum, count]

    def record(self, uid: str, phase: int, rewards: Sequence[float]) -> None:
        if not rewards:
            return
        r = [min(1.0, max(0.0, float(x))) for x in rewards]
        slot = self.records.setdefault(str(uid), {}).setdefault(int(phase), [0.0, 0])
        slot[0] += sum(r)
        slot[1] += len(r)

    def mean_reward(self, uid: str, before_phase: int) -> float | None:
        s = n = 0.0
        for p, (rs, rn) in self.records.get(str(uid), {}).items():
            if p < before_phase:
                s, n = s + rs, n + rn
        return s / n if n else None

    def difficulty(self, mean: float) -> float:
        if self.cfg.mode == "one_minus":
            return 1.0 - mean
        return self.cfg.cap if mean <= 0.0 else min(1.0 / mean, self.cfg.cap)

    def pool(self, phase: int) -> tuple[list[str], list[float]]:
        """(uids, difficulties) of the hard examples from phases before `phase`, sorted by uid."""
        uids, weights = [], []
        for uid in sorted(self.records):
            m = self.mean_reward(uid, phase)
            if m is None or m >= self.cfg.hard_threshold:
                continue
            d = self.difficulty(m)
            if d > 0.0:
                uids.append(uid)
                weights.append(d)
        return uids, weights

    def state_dict(self) -> dict:
        return {"config": asdict(self.cfg),
                "records": {u: {str(p): list(v) for p, v in ph.items()} for u, ph in self.records.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.cfg = RetrospectiveConfig(**state["config"])
        self.records = {u: {int(p): [float(v[0]), int(v[1])] for p, v in ph.items()}
                        for u, ph in state["records"].items()}


class RetrospectiveSampler:
    """Draws the retrospective part of each later-phase batch from a DifficultyTable."""

    def __init__(self, table: DifficultyTable):
        self.table = table

    def num_retro(self, phase: int, batch_size: int) -> int:
        if phase == 0 or not self.table.pool(phase)[0]:
            return 0
        return min(batch_size, round(self.table.cfg.fraction * batch_size))

    def draw(self, phase: int, step: int, n: int) -> list[str]:
        """`n` uids, i.i.d. with probability proportional to difficulty (empty list when the pool is empty)."""
        uids, weights = self.table.pool(phase)
        if n <= 0 or not uids:
            return []
        rng = random.Random(f"{self.table.cfg.seed}/{phase}/{step}")
        return rng.choices(uids, weights=weights, k=n)

    def compose(self, phase: int, step: int, batch_size: int, next_fresh) -> tuple[list, list[str]]:
        """(fresh items from `next_fresh(n)`, retrospective uids) for one batch of `batch_size` prompts."""
        n_retro = self.num_retro(phase, batch_size)
        retro = self.draw(phase, step, n_retro)
        fresh = list(next_fresh(batch_size - len(retro))) if batch_size > len(retro) else []
        return fresh, retro
