"""FSDP2 (torch.distributed.fsdp.fully_shard) for QwenForCausalLM over the data-parallel mesh dimension.

Each decoder layer is its own FSDP unit and the root holds the embedding, final norm and head: during forward and
backward only one or two layers' parameters are all-gathered at a time (memory: P / dp sharded + ~2 layers
unsharded), gradients are reduce-scattered (averaged over dp) as each layer's backward finishes. Works with the
model's non-reentrant checkpointing and tiled MLP (both are ordinary autograd to FSDP).

Mixed precision (qlfast/trainer/precision.py): the sharded parameters are the master weights (fp32), and
`param_dtype=torch.bfloat16` makes FSDP2 cast each layer's shards to bf16 before the all-gather, so forward and
backward run on bf16 copies; `reduce_dtype=float32` reduce-scatters the bf16 gradients in fp32 into fp32 sharded
gradients, and AdamW steps the fp32 shards (its m and v are fp32 too). Memory per rank: 4 + 4 + 8 = 16 bytes per
parameter / dp for masters, gradients and AdamW state, plus the unsharded bf16 layers in flight.

Optimizer state offload for single-GPU long runs: `cpu_offload=True` uses FSDP2's CPUOffloadPolicy, which keeps
the sharded parameters, gradients and therefore the optimizer state in (pinned) CPU memory and steps the optimizer
there; only the all-gathered layers live on the GPU.
"""

from __future__ import annotations

import weakref

import torch
from torch.distributed.device_mesh import DeviceMesh

# model -> the compute dtype its all-gathered parameters are cast to (apply_fsdp's param_dtype)
_PARAM_DTYPE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def apply_fsdp(model, mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
               cpu_offload: bool = False):
    """Shard `model` in place over the 1-D `mesh` (e.g. build_mesh(...)["dp"]); returns the model.

    param_dtype: compute dtype of the all-gathered parameters (None = as stored); reduce_dtype: gradient
    reduce-scatter dtype (fp32 by default, so that bf16 training averages gradients without bf16 rounding)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if mesh.ndim != 1:
        raise ValueError(f"apply_fsdp: expected the 1-D data-parallel mesh (mesh['dp']), got {mesh.ndim}-D")
    kw = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
              offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    # the root keeps its parameters gathered after forward: the head needs them again right away in the loss
    fully_shard(model, reshard_after_forward=False, **kw)
    if param_dtype is not None:
        _PARAM_DTYPE[model] = param_dtype
    return model


def compute_dtype(model) -> torch.dtype | None:
    """The dtype forward runs in under apply_fsdp's mixed precision (None: the parameters' own)."""
    return _PARAM_DTYPE.get(model)


def full_state_dict(model, *, masters: bool = False) -> dict:
    """The full (unsharded) state dict on CPU on rank 0 (other ranks get {}: DCP's cpu_offload keeps it on rank 0
    only), e.g. for io.save(..) there; collective.

    In the compute dtype (what the export and the rollout engine get), unless masters=True: then as stored (fp32
    masters under mixed precision)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    dtype = None if masters else compute_dtype(model)
    if dtype is None:
        return full
    for k, v in full.items():  # one tensor at a time: the fp32 copy is freed as its cast replaces it
        if v.is_floating_point():
            full[k] = v.to(dtype)
    return full


def full_grads(model) -> dict:
    """name -> full gradient tensor (gathered from the DTensor shards); for tests and debugging."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[name] = None if g is None else g.detach().cpu()
    return out
