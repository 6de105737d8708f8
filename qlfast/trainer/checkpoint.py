"""Atomic, resumable checkpoints of a training run.

Layout of <run_dir>/checkpoints/<tag>/ (written to <tag>.tmp first, then renamed, so a killed run never leaves a
half-written checkpoint under a real name; a save starts by clearing any <tag>.tmp a killed save left):
    model/              Hugging Face layout (config.json, safetensors, tokenizer): loads into transformers and vLLM
    replicated.pt       the torch state that is the same on every rank, written once by rank 0: the schedulers and
                        (unless sharded) the model's master weights and the optimizers
    trainer-rank<r>.pt  that rank's own torch state: its RNG streams
    dcp/                FSDP2 only: the sharded model and optimizers (torch.distributed.checkpoint, one file per
                        rank), in place of their copies in trainer-rank<r>.pt
    state.json          the JSON state, the same on every rank: the run's TrainState (stage, steps, evaluations),
                        the curriculum samplers' positions, the difficulty table
<run_dir>/checkpoints/LATEST names the newest complete tag (itself replaced atomically).

`Checkpointer` says which Stateful part of a run goes where (torchtitan's CheckpointManager, shrunk) and saves or
loads them all; `save` / `load` / `latest` below do the file work.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


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


class RNGState:
    """This process's RNG streams (python, numpy, torch, CUDA) as a checkpoint part."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


@dataclass
class Checkpointer:
    """A run's Stateful parts and where each goes (see the module docstring):

        shared    JSON parts, the same on every rank -> state.json (rank 0 writes, every rank reads)
        replicated torch parts the same on every rank -> replicated.pt (rank 0 writes, every rank reads)
        per_rank  torch parts -> trainer-rank<r>.pt (every rank its own), loaded after the replicated ones
        sharded   FSDP2's (model, optimizer, ...) -> dcp/ (collective), instead of per-rank copies
        export    writes the HF model directory model/ (a collective under FSDP2; rank 0 writes)
    """

    run_dir: Path
    shared: dict[str, Stateful]
    per_rank: dict[str, Stateful]
    export: Callable[[str], None]
    sharded: tuple | None = None
    keep: int = 2
    replicated: dict[str, Stateful] = field(default_factory=dict)

    def save(self, tag: str) -> Path:
        """Write checkpoint `tag` (collective); -> its path."""
        return save(self.run_dir, tag, save_model=self.export, keep=self.keep, sharded=self.sharded,
                    state={name: part.state_dict() for name, part in self.shared.items()},
                    trainer_state={name: part.state_dict() for name, part in self.per_rank.items()},
                    replicated_state=({name: part.state_dict() for name, part in self.replicated.items()}
                                      if _rank() == 0 else None))

    def latest(self) -> Path | None:
        return latest(self.run_dir)

    def load(self, path: str | Path) -> None:
        """Load every part from checkpoint `path` (collective under FSDP2)."""
        state, trainer_state = load(path)
        replicated_file = Path(path) / "replicated.pt"
        # checkpoints written before replicated.pt existed hold these parts in every trainer-rank<r>.pt
        replicated = (torch.load(replicated_file, map_location="cpu", weights_only=False)  # not rank 0's devices
                      if replicated_file.exists() else trainer_state)
        for name, part in self.shared.items():
            part.load_state_dict(state[name])
        if self.sharded is not None:
            load_sharded(Path(path) / "dcp", *self.sharded)
        for name, part in self.replicated.items():
            part.load_state_dict(replicated[name])
        for name, part in self.per_rank.items():
            part.load_state_dict(trainer_state[name])


def save(run_dir: str | Path, tag: str, *, save_model, state: dict, trainer_state: dict, keep: int = 2,
         sharded: tuple | None = None, replicated_state: dict | None = None) -> Path:
    """Write checkpoint `tag` on every rank (rank 0 writes the model and state.json); return its final path.

    save_model(dir) writes the HF model directory (called on every rank: FSDP gathers are collective; the callee
    writes only on rank 0). trainer_state is this rank's optimizer/scheduler/RNG dict. sharded=(model, optimizer, ...):
    FSDP2-sharded, written to dcp/ by save_sharded.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / tag
    tmp = root / f"{tag}.tmp"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        save_model(str(tmp / "model"))
        if sharded is not None:
            save_sharded(tmp / "dcp", *sharded)
        torch.save(trainer_state, tmp / f"trainer-rank{rank}.pt")
        if rank == 0 and replicated_state:  # once, not once per rank
            torch.save(replicated_state, tmp / "replicated.pt")
        if rank == 0:
            (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
    except RuntimeError as e:  # torch's zip writer reports a full disk as "unexpected pos N vs M", with no path
        if "unexpected pos" in str(e) or shutil.disk_usage(tmp.parent).free < (64 << 20):
            shutil.rmtree(tmp, ignore_errors=True)  # LATEST still names the previous, complete checkpoint
            raise OSError(errno.ENOSPC, f"No space left on device writing checkpoint {tag} (LATEST unchanged)",
                          str(tmp)) from e
        raise
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


# ---- FSDP2: model and optimizer state as sharded DCP checkpoints (each rank writes and reads its own shards) ----


def _optim_key(i: int) -> str:
    return "optim" if i == 0 else f"optim{i}"  # the first optimizer keeps the key of checkpoints that held only one


def save_sharded(path: str | Path, model, *optimizers) -> None:
    """Write the sharded model and optimizers' state (collective; the trainer's: the RL and the SFT optimizer).

    An optimizer that has not stepped yet is left out: DCP's get_optimizer_state_dict would create its state with a
    zero-gradient step(), which AdamW counts, so the first real update would take step-2 bias corrections and move the
    weights 0.744x as far as it should (the RL optimizer at the "sft" checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    state = {"model": sd.get_model_state_dict(model)}
    for i, optimizer in enumerate(optimizers):
        if optimizer.state:
            state[_optim_key(i)] = sd.get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: str | Path, model, *optimizers) -> None:
    """Read what save_sharded wrote into the sharded model and optimizers, given in the same order (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {"model": sd.get_model_state_dict(model)}
    for i, optimizer in enumerate(optimizers):
        if any(k.startswith(_optim_key(i) + ".") for k in saved):
            # the template's zero-gradient step (see save_sharded) is overwritten by the loaded state, step included
            state[_optim_key(i)] = sd.get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    sd.set_model_state_dict(model, state["model"])
    for i, optimizer in enumerate(optimizers):
        if _optim_key(i) in state:
            sd.set_optimizer_state_dict(model, optimizer, state[_optim_key(i)])
