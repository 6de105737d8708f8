"""Where a training run is: the typed state that `qlfast.train` advances and checkpoints save (torchtitan's Stateful
habit: `state_dict()` / `load_state_dict()`, so the checkpointer treats it like the curriculum and the optimizers).

    state = TrainState()                 # a fresh run: stage "sft", nothing done
    state.load_state_dict(saved)         # a resumed one (a missing field keeps its default)
    state.rl_step = step + 1             # each stage records what it finished
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainState:
    """Progress of one run, stored in a checkpoint's state.json (qlfast/trainer/checkpoint.py)."""

    stage: str = "sft"
    """"sft" until the warm-up SFT is done, then "rl"."""
    sft_step: int = 0
    """SFT optimizer steps done."""
    rl_step: int = 0
    """RL steps done."""
    weight_version: int = 0
    """Version of the weights last pushed into the rollout engine (every sample carries the version it came from)."""
    bad_steps: int = 0
    """Consecutive RL steps whose loss or gradient was not finite (their updates were skipped)."""
    evals: list[dict] = field(default_factory=list)
    """Held-out evaluations so far (after SFT, after each phase): the report's right panel."""

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        fresh = TrainState()
        for f in dataclasses.fields(self):
            setattr(self, f.name, state.get(f.name, getattr(fresh, f.name)))

    def evaluated(self, stage: str) -> bool:
        """Whether the held-out evaluation of `stage` ("after SFT", "after phase 1", ...) has run."""
        return any(e["stage"] == stage for e in self.evals)

    def count_update(self, finite: bool) -> int:
        """Record whether an RL update had a finite loss and gradient; -> the non-finite steps in a row."""
        self.bad_steps = 0 if finite else self.bad_steps + 1
        return self.bad_steps


EARLIER_OUTPUTS = ("metrics.jsonl", "checkpoints", "final", "report.png", "report.md")
"""What a run leaves in its folder that a fresh start under the same name would overwrite or mix with its own."""


def set_aside_earlier_run(run_dir: Path) -> Path | None:
    """A fresh start in a folder an earlier run used: move that run's outputs into <run_dir>/earlier/<UTC time>/
    (nothing a user has is deleted) and return where they went; None when there was nothing to move."""
    found = [run_dir / name for name in EARLIER_OUTPUTS if (run_dir / name).exists()]
    if not found:
        return None
    dest = run_dir / "earlier" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    k = 1
    while dest.exists():  # two fresh starts within a second
        dest, k = dest.with_name(f"{dest.name.split('.')[0]}.{k}"), k + 1
    dest.mkdir(parents=True)
    for p in found:
        p.rename(dest / p.name)
    return dest
