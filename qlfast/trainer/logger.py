"""Observability: metrics as JSONL (one line per step), TensorBoard when installed, a progress bar on rank 0."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, is_main: bool, total_steps: int, resume_step: int = 0):
        self.is_main = is_main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        except ImportError:
            self.tb = None
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=resume_step, desc="RL", unit="step", dynamic_ncols=True)

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
        if stream == "train" and self.bar is not None:
            self.bar.set_postfix(phase=metrics.get("phase"), reward=f"{metrics.get('reward_mean', 0):.3f}",
                                 acc=f"{metrics.get('accuracy', 0):.3f}", refresh=False)
            self.bar.update(1)

    def write(self, msg: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def truncate_after(self, rl_step: int, sft_step: int) -> None:
        """On resume: drop rows past the checkpoint's steps, so the metrics equal an uninterrupted run's."""
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
            done = sft_step if stream == "sft" else rl_step
            if r["step"] < done or (stream not in ("sft", "train") and r["step"] <= rl_step):
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
