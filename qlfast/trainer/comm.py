"""`qlfast.trainer.comm`: the trainer's process group from torchrun's environment (gloo on CPU, NCCL on GPU), the
sequence-parallel groups (`--model.sp`, see qlfast/trainer/sp.py), and the few collectives the loop needs. A plain
`python -m qlfast.train` runs as a world of one. Callers import it as `comm`; `dist` is always torch.distributed."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    fsdp: bool = False
    """The policy is FSDP2-sharded: FSDP reduces the gradients, and every rank runs the same number of forward and
    backward passes (its all-gathers are collectives)."""
    sp: int = 1
    """Sequence-parallel degree: groups of sp consecutive ranks share every micro-batch, each holding 1/sp of its
    tokens (dp = world / sp groups)."""
    sp_attention: str = "ring"
    """Attention across an sp group: "ring" (zigzag ring attention), "ulysses" (all-to-all over heads) or "hybrid"
    (Ulysses inside groups of sp_ulysses ranks, ring across them)."""
    sp_group: object = None
    """This rank's sp group (a ProcessGroup; None when sp == 1)."""
    sp_ulysses: int = 1
    """With sp_attention "hybrid": ranks per Ulysses group (the ring joins sp / sp_ulysses of them)."""
    hybrid_groups: tuple | None = None
    """With sp_attention "hybrid": (Ulysses group, ring group) of this rank."""

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def loss_scale(self) -> float:
        """Losses are normalised by global counts, so the batch gradient is the SUM over ranks; FSDP2 averages."""
        return float(self.world) if self.fsdp else 1.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def die_with_launcher() -> bool:
    """Under torchrun (each worker is in its own process session), ask the kernel to SIGTERM this process when its
    launcher dies, so a kill -9 of torchrun does not leave ranks training on (Linux prctl PR_SET_PDEATHSIG). Returns
    whether it is armed; a plain `python -m qlfast.train` (parent: the user's shell, perhaps under nohup) is left
    alone."""
    import ctypes
    import signal
    import sys

    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    launcher = os.getppid()
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        return False
    if os.getppid() != launcher:  # it died before the signal was armed
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def init(device_pref: str = "auto", *, fsdp: bool = False, sp: int = 1, sp_attention: str = "ring",
         sp_ulysses: int = 1) -> Env:
    """The process group (when there is more than one rank, or with fsdp), the sp groups, and this rank's device."""
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref == "cuda"
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise SystemExit("qlfast.train: --train.device=cuda but no CUDA GPU is visible")
    if fsdp and "MASTER_ADDR" not in os.environ:
        raise SystemExit("qlfast.train: --model.fsdp=true shards over torchrun's ranks; launch with "
                         "`torchrun --standalone --nproc_per_node=N -m qlfast.train ...`")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if sp < 1 or world % sp:
        raise SystemExit(f"qlfast.train: --model.sp={sp} must divide the number of ranks ({world}): sp groups are sp "
                         "consecutive ranks")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if (world > 1 or fsdp) and not dist.is_initialized():
        # CUDA tensors go over NCCL; the small CPU tensors and objects of the bookkeeping collectives over gloo
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    sp_group = None
    for start in range(0, world, sp) if sp > 1 else ():
        group = dist.new_group(list(range(start, start + sp)))  # collective: every rank creates every group
        if start <= rank < start + sp:
            sp_group = group
    hybrid = None
    if sp > 1 and sp_attention == "hybrid":
        from qlfast.parallel import hybrid_groups

        hybrid = hybrid_groups(sp_ulysses, sp)  # collective, like the sp groups
    return Env(rank, world, local_rank, device, fsdp=fsdp, sp=sp, sp_attention=sp_attention, sp_group=sp_group,
               sp_ulysses=sp_ulysses if sp_attention == "hybrid" else 1, hybrid_groups=hybrid)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def sum_floats(*values: float, device=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    return all_reduce_sum(t).tolist()


def all_gather_objects(obj, group=None) -> list:
    """Every rank's `obj` (of `group`, default the world), in rank order."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def max_int(n: int) -> int:
    """The largest `n` over the ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return n
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def shard_model(model: torch.nn.Module, env: Env, *, cpu_offload: bool = False, param_dtype: torch.dtype | None = None,
                weights: str | None = None) -> torch.nn.Module:
    """FSDP2 over all ranks (one data-parallel dimension), before any optimizer is built over the parameters.

    param_dtype: the compute dtype when it differs from the parameters' (the fp32 masters; qlfast/trainer/precision.py).
    weights: a model built on the meta device is filled from this HF checkpoint, each rank reading only its shards
    (qlfast/parallel/sharded_load.py)."""
    from torch.distributed.device_mesh import init_device_mesh

    from qlfast.parallel.fsdp import apply_fsdp

    if cpu_offload and env.device.type != "cuda":
        raise SystemExit("qlfast.train: --model.optimizer_offload=true moves FSDP2's sharded state off the GPU into "
                         f"pinned CPU memory; it needs --train.device=cuda (this run trains on {env.device})")
    mesh = init_device_mesh(env.device.type, (env.world,), mesh_dim_names=("dp",))
    apply_fsdp(model, mesh, cpu_offload=cpu_offload, param_dtype=param_dtype)
    if weights is not None:
        from qlfast.parallel.sharded_load import load_sharded

        load_sharded(model, weights, "cpu" if cpu_offload else env.device, buffer_device=env.device)
    return model


def all_reduce_grads(model: torch.nn.Module, env: Env | None = None) -> None:
    """Sum gradients over ranks (losses are normalised by global token counts, so the sum is the batch gradient; under
    sp a rank's loss holds only its tokens' rows, and the sum over ALL ranks is again the batch gradient).

    One flat buffer: one collective instead of one per parameter. A no-op under FSDP2, which reduce-scatters the
    gradients itself during backward."""
    if (env is not None and env.fsdp) or not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    from qlfast.trainer.precision import trainable

    params = trainable(model)  # the fp32 masters when the model computes in bf16 (qlfast/trainer/precision.py)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    off = 0
    for g in grads:
        g.copy_(flat[off: off + g.numel()].view_as(g))
        off += g.numel()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()
