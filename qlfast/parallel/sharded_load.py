"""A Hugging Face checkpoint loaded straight into FSDP2 shards: no rank ever holds the whole model.

    with torch.device("meta"):
        model = QwenForCausalLM(load_config(path), options)      # no memory
    apply_fsdp(model, mesh, param_dtype=torch.bfloat16)          # sharded parameters, still on meta (fp32 masters)
    load_sharded(model, path, device)                            # each rank reads the rows it owns

FSDP2 shards every parameter along dim 0 as torch.chunk does: rank r of W holds rows [r c, min((r + 1) c, n)) with
c = ceil(n / W). Each rank reads exactly those rows of each tensor with safetensors' lazy `get_slice` (a row range
of a row-major tensor is one contiguous byte range of the memory-mapped file) and casts them into its shard.

Why each rank reads its own slices rather than rank 0 reading and scattering:
- memory: a rank holds its shards plus one slice, 1/W of the largest tensor; a scattering rank 0 would hold whole
  tensors (the 32B model's embedding alone is 152064 x 5120 x 2 B = 1.6 GB) plus the send buffers;
- time: every rank reads 1/W of the checkpoint, all at once, and nothing crosses the network (with a scatter, rank 0
  reads all of it and sends (W - 1) / W of it);
- nothing to agree on: no collective, so the load cannot deadlock on a rank that failed to open a file.
The cost is that every rank opens every file (the headers only).

Memory contract per rank: its shards (P / W elements in the parameters' dtype) + one slice in the file's dtype and
its cast (peak about P / W + the largest tensor / W); pages of the memory-mapped files count towards the RSS only
while the slice is read.
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open

from qlfast.model import io


def _rows(p) -> tuple[int, int]:
    """(first row, rows) of this rank's shard of a dim-0 sharded DTensor, as FSDP2 (torch.chunk) lays them out."""
    from torch.distributed.tensor import Shard

    if len(p.placements) != 1 or p.placements[0] != Shard(0):
        raise ValueError(f"load_sharded: expected FSDP2's Shard(0) placement, got {p.placements}")
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return start, min(chunk, n - start)


@torch.no_grad()
def load_sharded(model, path, device, *, buffer_device=None) -> None:
    """Materialise `model` (FSDP2-sharded on the meta device) on `device`, each rank filling its own shards from the
    safetensors checkpoint at `path` (cast into the parameters' dtype). buffer_device: where the (recomputed) RoPE
    frequencies go (default: `device`; the compute device under FSDP2's CPU offload)."""
    from torch.distributed.tensor import DTensor

    path = os.fspath(path)
    files = io.weight_files(path, dict(model.named_parameters()))
    model.to_empty(device=device)
    params = dict(model.named_parameters())  # to_empty made new parameters
    by_file: dict[str, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    for fname, names in by_file.items():
        with safe_open(fname, framework="pt", device="cpu") as f:
            for name in names:
                p = params[name]
                sl = f.get_slice(name)
                if tuple(sl.get_shape()) != tuple(p.shape):
                    raise ValueError(f"from_pretrained: {name} has shape {tuple(sl.get_shape())} in {fname}, the "
                                     f"config expects {tuple(p.shape)}")
                if isinstance(p, DTensor):
                    local = p.to_local()
                    start, rows = _rows(p)
                    if local.shape[0] != rows:
                        raise RuntimeError(f"load_sharded: {name}: local shard has {local.shape[0]} rows, expected "
                                           f"{rows} (FSDP2 layout changed?)")
                    if rows:
                        local.copy_(sl[start:start + rows])
                else:  # not sharded (outside every FSDP unit): the whole tensor
                    p.copy_(sl[:])
    from qlfast.model.rope import rope_parameters

    model.model.rotary_emb.inv_freq = rope_parameters(model.config, buffer_device or device)[0]
