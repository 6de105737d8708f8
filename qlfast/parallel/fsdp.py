"""FSDP2 (torch.distributed.fsdp.fully_shard) for QwenForCausalLM over the data-parallel mesh dimension.

Each decoder layer is its own FSDP unit and the root holds the embedding, final norm and head: during forward and
backward only one or two layers' parameters are all-gathered at a time (memory: P / dp sharded + ~2 layers
unsharded), gradients are reduce-scattered (averaged over dp) as each layer's backward finishes. Works with the
model's non-reentrant checkpointing and tiled MLP (both are ordinary autograd to FSDP).

Optimizer state offload for single-GPU long runs: `cpu_offload=True` uses FSDP2's CPUOffloadPolicy, which keeps
the sharded parameters, gradients and therefore the optimizer state in (pinned) CPU memory and steps the optimizer
there; only the all-gathered layers live on the GPU.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh


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
    return model


def full_state_dict(model) -> dict:
    """The full (unsharded) state dict on CPU, on every rank, e.g. for model.save_pretrained(..) on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_grads(model) -> dict:
    """name -> full gradient tensor (gathered from the DTensor shards); for tests and debugging."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[name] = None if g is None else g.detach().cpu()
    return out
