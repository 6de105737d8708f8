"""Atomic, resumable checkpoints of a training run.

Layout of <run_dir>/checkpoints/<tag>/ (written to <tag>.tmp-<pid> first, then renamed, so a killed run never leaves a
half-written checkpoint under a real name):
    model/              Hugging Face layout (config.json, safetensors, tokenizer): loads into transformers and vLLM
    trainer-rank<r>.pt  optimizer, scheduler, RNG states of that rank
    state.json          stage, phase, step, sampler positions, difficulty table, metrics needed to continue
<run_dir>/checkpoints/LATEST names the newest complete tag (itself replaced atomically).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: str | Path, tag: str, *, save_model, state: dict, trainer_state: dict, keep: int = 2) -> Path:
    """Write checkpoint `tag` on every rank (rank 0 writes the model and state.json); return its final path.

    save_model(dir) writes the HF model directory (called on every rank: FSDP gathers are collective; the callee
    writes only on rank 0). trainer_state is this rank's optimizer/scheduler/RNG dict.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / tag
    tmp = root / f"{tag}.tmp"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    save_model(str(tmp / "model"))
    torch.save(trainer_state, tmp / f"trainer-rank{rank}.pt")
    if rank == 0:
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = root / "LATEST.tmp"
        latest_tmp.write_text(tag)
        os.replace(latest_tmp, root / "LATEST")
        _prune(root, keep, protect=tag)
    _barrier()
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    done = sorted((p for p in root.iterdir() if p.is_dir() and ".tmp" not in p.name), key=lambda p: p.stat().st_mtime)
    for p in done[:-keep]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    marker = Path(run_dir) / "checkpoints" / "LATEST"
    if not marker.exists():
        return None
    path = marker.parent / marker.read_text().strip()
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{marker} names {path.name}, which has no state.json: the checkpoint is incomplete")
    return path


def load(path: str | Path) -> tuple[dict, dict]:
    """-> (state from state.json, this rank's trainer state)."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    trainer_file = path / f"trainer-rank{_rank()}.pt"
    if not trainer_file.exists():
        raise FileNotFoundError(f"{trainer_file} is missing: was the run saved with a different number of ranks?")
    return state, torch.load(trainer_file, weights_only=False)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"checkpoint state: cannot store {type(o).__name__} in state.json")
