"""Curriculum-guided phased RL (QwenLong-L1 section 3.2): phases, length bins and a resumable per-phase sampler.

A phase is (max prompt tokens, max response tokens, steps or epochs). Phase k draws only prompts in its length bin:

- disjoint bins (default, the paper's rule): bin k holds prompts with L_{k-1} < length <= L_k (L_{-1} = -inf),
  so each phase brings longer documents; easier material from earlier phases re-enters only through
  retrospective sampling (qlfast.rl.retrospective).
- cumulative bins: bin k holds every prompt with length <= L_k.

Prompts longer than every phase's limit are returned in `LengthBins.too_long` and reported, never dropped silently.

`PhaseSampler` walks a seeded permutation of its bin, epoch after epoch (a fresh permutation per epoch, from
`random.Random((seed, epoch))`), so a batch depends only on (seed, epoch, position): `state_dict()` is those two
integers and `load_state_dict()` resumes exactly where a killed run stopped.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Phase:
    """One curriculum phase (the one definition: qlfast.config's presets and `--rl.phases` build these)."""

    max_prompt_tokens: int
    """Longest prompt this phase draws."""
    max_response_tokens: int
    """Longest response generated in this phase (also the overlong-shaping max length)."""
    steps: int | None = None
    """RL steps in this phase; exactly one of steps / epochs."""
    epochs: float | None = None
    """Passes over the phase's bin instead (steps = ceil(epochs * len(bin) / batch_size))."""

    def __post_init__(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(f"Phase needs exactly one of steps or epochs, got steps={self.steps} epochs={self.epochs}")
        if self.max_prompt_tokens <= 0 or self.max_response_tokens <= 0:
            raise ValueError(f"Phase token limits must be positive, got {self}")
        if (self.steps is not None and self.steps < 0) or (self.epochs is not None and self.epochs < 0):
            raise ValueError(f"Phase steps/epochs must be >= 0, got {self}")

    def num_steps(self, bin_size: int, batch_size: int) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.epochs * bin_size / batch_size) if bin_size else 0


@dataclass
class LengthBins:
    bins: list[list[int]]  # example indices per phase
    too_long: list[int]  # indices longer than every phase's max_prompt_tokens
    lengths: list[int]
    limits: list[int]

    def report(self) -> str:
        sizes = ", ".join(f"phase {i} (<= {lim} tokens): {len(b)}"
                          for i, (lim, b) in enumerate(zip(self.limits, self.bins)))
        msg = f"length bins: {sizes}"
        if self.too_long:
            longest = max(self.lengths[i] for i in self.too_long)
            msg += (f"; {len(self.too_long)} prompt(s) longer than every phase (max {max(self.limits)} tokens, "
                    f"longest {longest}) are not used")
        return msg


def assign_bins(lengths: Sequence[int], max_prompt_tokens: Sequence[int], *, cumulative: bool = False) -> LengthBins:
    """Assign each length to phase bins (see module docstring). Limits must be non-decreasing."""
    limits = list(max_prompt_tokens)
    if not limits:
        raise ValueError("assign_bins needs at least one phase limit")
    if any(b < a for a, b in zip(limits, limits[1:])):
        raise ValueError(f"phase max_prompt_tokens must be non-decreasing, got {limits}")
    bins: list[list[int]] = [[] for _ in limits]
    too_long = []
    for i, n in enumerate(lengths):
        placed = False
        for k, lim in enumerate(limits):
            if n <= lim and (cumulative or k == 0 or n > limits[k - 1]):
                bins[k].append(i)
                placed = True
                if not cumulative:
                    break
        if not placed:
            too_long.append(i)
    return LengthBins(bins=bins, too_long=too_long, lengths=list(lengths), limits=limits)


class PhaseSampler:
    """Deterministic, resumable batches of indices from one phase's bin (without replacement within an epoch)."""

    def __init__(self, indices: Sequence[int], batch_size: int, seed: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not indices:
            raise ValueError("PhaseSampler needs a non-empty bin")
        self.indices = list(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        perm = list(self.indices)
        random.Random(f"{self.seed}/{epoch}").shuffle(perm)
        return perm

    def next_batch(self, n: int | None = None) -> list[int]:
        """The next `n` (default batch_size) indices; an epoch boundary inside a batch continues into the next
        permutation."""
        n = self.batch_size if n is None else n
        out = []
        while len(out) < n:
            if self.pos >= len(self._perm):
                self.epoch += 1
                self.pos = 0
                self._perm = self._permutation(self.epoch)
            take = min(n - len(out), len(self._perm) - self.pos)
            out.extend(self._perm[self.pos : self.pos + take])
            self.pos += take
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "pos": self.pos, "n": len(self.indices)}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != len(self.indices):
            raise ValueError(f"sampler state is for a bin of {state['n']} examples, this bin has {len(self.indices)}")
        self.seed, self.epoch, self.pos = state["seed"], state["epoch"], state["pos"]
        self._perm = self._permutation(self.epoch)


class Curriculum:
    """Phases plus their bins: which phase a global step is in, and one sampler per phase."""

    def __init__(self, phases: Sequence[Phase], bins: LengthBins, batch_size: int, seed: int = 0):
        if len(phases) != len(bins.bins):
            raise ValueError(f"{len(phases)} phases but {len(bins.bins)} bins")
        self.phases = list(phases)
        self.bins = bins
        self.batch_size = batch_size
        self.seed = seed
        self.steps = [p.num_steps(len(b), batch_size) for p, b in zip(self.phases, bins.bins)]
        for k, (n, b) in enumerate(zip(self.steps, bins.bins)):
            if n > 0 and not b:
                raise ValueError(f"phase {k} has {n} steps but no prompt fits its bin ({bins.report()})")
        self.samplers = [PhaseSampler(b, batch_size, seed=seed * 1009 + k) if b else None
                         for k, b in enumerate(bins.bins)]

    @property
    def total_steps(self) -> int:
        return sum(self.steps)

    def phase_of(self, step: int) -> int:
        """Phase index of a global step (0-based); the last phase for steps past the end."""
        for k, n in enumerate(self.steps):
            if step < n:
                return k
            step -= n
        return len(self.steps) - 1

    def phase_start(self, phase: int) -> int:
        return sum(self.steps[:phase])

    def next_batch(self, phase: int, n: int | None = None) -> list[int]:
        """The next `n` (default batch_size) example indices of `phase`'s bin."""
        sampler = self.samplers[phase]
        if sampler is None:
            raise ValueError(f"phase {phase} has an empty bin")
        return sampler.next_batch(n)

    def state_dict(self) -> dict:
        return {"samplers": [s.state_dict() if s is not None else None for s in self.samplers]}

    def load_state_dict(self, state: dict) -> None:
        for s, st in zip(self.samplers, state["samplers"]):
            if s is not None:
                s.load_state_dict(st)
