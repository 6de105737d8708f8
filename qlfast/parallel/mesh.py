"""The (dp x sp) device mesh built from torchrun's world: data parallel outside, sequence parallel inside.

    mesh = build_mesh(sp=2)                   # world 8 -> dp 4 x sp 2; ranks 2i, 2i+1 share a sequence
    fsdp.apply_fsdp(model, mesh["dp"])        # shard parameters/grads/optimizer over dp
    sp_group = mesh["sp"].get_group()         # ring / Ulysses attention over sp

sp is the inner (fastest-varying) dimension so that a sequence's ranks are neighbours, i.e. on the same node for
sp <= GPUs per node: ring/Ulysses traffic is per layer and needs NVLink; FSDP traffic is per layer too but overlaps.
Backend: NCCL on GPU, gloo on CPU (tests run the same code under torchrun on CPU).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed() -> None:
    """init_process_group from torchrun's environment (NCCL on GPU, gloo on CPU); pins the local GPU."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def build_mesh(sp: int = 1, dp: int | None = None) -> DeviceMesh:
    """A 2-D DeviceMesh ("dp", "sp") over the whole world; dp defaults to world_size // sp."""
    init_distributed()
    world = dist.get_world_size()
    if sp < 1 or world % sp:
        raise ValueError(f"build_mesh: sp={sp} must be >= 1 and divide the world size {world}")
    dp = world // sp if dp is None else dp
    if dp * sp != world:
        raise ValueError(f"build_mesh: dp x sp = {dp} x {sp} must equal the world size {world}")
    return init_device_mesh(device_type(), (dp, sp), mesh_dim_names=("dp", "sp"))
