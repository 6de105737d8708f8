"""Observability: metrics as JSONL (one line per step), TensorBoard when installed, a progress bar on rank 0."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    """metrics.jsonl rows (rank 0), TensorBoard scalars, and one progress bar per stage ("sft", "train" = RL), each
    started by its stage's first row, so its rate and ETA measure that stage alone."""

    BARS = {"sft": "SFT", "train": "RL"}

    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, sft_steps: int = 0):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.totals = {"sft": sft_steps, "train": total_steps}
        self.tb = None
        self.bar = None
        self.bar_stream = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        except ImportError:
            self.tb = None

    def _bar_for(self, stream: str, step: int):
        """The progress bar of `stream`'s stage, created at its first row (a resumed stage starts at `step`)."""
        if stream not in self.BARS or not self.totals[stream]:
            return None
        if self.bar_stream != stream:
            from tqdm import tqdm

            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=self.totals[stream], initial=step, desc=self.BARS[stream], unit="step",
                            dynamic_ncols=True)
            self.bar_stream = stream
        return self.bar

    def log(self, step: int, metrics: dict, stream: str = "train") -> None:
        if not self.is_main:
            return
        row = {"stream": stream, "step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{stream}/{k}", v, step)
        if (bar := self._bar_for(stream, step)) is not None:
            if stream == "train":
                bar.set_postfix(phase=metrics.get("phase"), reward=f"{metrics.get('reward_mean', 0):.3f}",
                                acc=f"{metrics.get('accuracy', 0):.3f}", refresh=False)
            elif "sft_loss" in metrics:
                bar.set_postfix(loss=f"{metrics['sft_loss']:.4f}", refresh=False)
            bar.update(1)

    def write(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def truncate_after(self, rl_step: int, sft_step: int, evaluated: set[str] | None = None) -> None:
        """On resume: drop rows past the checkpoint's steps, so the metrics equal an uninterrupted run's. Evaluation
        rows stay when the checkpoint records their stage as done (`evaluated`; None: when their step <= rl_step): a
        run killed after an evaluation but before the next checkpoint evaluates again, and must not leave two rows."""
        if not self.is_main or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            # sft and train rows are logged after their step finished (steps 0..n-1 are done at a checkpoint of n);
            # evaluation rows carry the number of finished RL steps
            stream = r.get("stream")
            if stream in ("sft", "train"):
                ok = r["step"] < (sft_step if stream == "sft" else rl_step)
            else:
                ok = r.get("stage") in evaluated if evaluated is not None else r["step"] <= rl_step
            if ok:
                keep.append(line)
        self.path.write_text("".join(k + "\n" for k in keep))

    def rows(self, stream: str = "train") -> list[dict]:
        if not self.path.exists():
            return []
        return [r for r in (json.loads(line) for line in self.path.read_text().splitlines() if line.strip())
                if r.get("stream") == stream]

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
