"""Hugging Face checkpoint I/O: config.json + model.safetensors, or shards with model.safetensors.index.json.

Parameter names are HF's own, so loading is a name-for-name copy and saving writes what transformers'
AutoModelForCausalLM and vLLM read unchanged. Loading streams one tensor at a time from safetensors (memory: the
model plus one tensor); the model is built on the meta device first and materialised on the target device, so a 7B
checkpoint never exists twice in memory. A tied model stores no lm_head.weight (as HF writes it); a checkpoint that
has one anyway is accepted and the extra tensor is ignored. An FSDP2-sharded model loads its shards rank by rank
instead (qlfast/parallel/sharded_load.py).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"


def weight_files(path: str, params=None) -> dict[str, str]:
    """name -> file for every tensor in the checkpoint at `path`; with `params` (names of the model's parameters),
    checked to hold each of them and nothing the model lacks (a tied model's extra lm_head.weight is accepted)."""
    files = _weight_files(path)
    if params is None:
        return files
    missing = sorted(set(params) - set(files))
    if missing:
        raise ValueError(f"from_pretrained: {path} lacks {len(missing)} tensors, e.g. {missing[:5]}")
    unexpected = sorted(n for n in set(files) - set(params) if "rotary_emb" not in n and n != "lm_head.weight")
    if unexpected:
        raise ValueError(f"from_pretrained: {path} has tensors this model does not: {unexpected[:5]}")
    return files


def _weight_files(path: str) -> dict[str, str]:
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            wmap = json.load(f)["weight_map"]
        return {name: os.path.join(path, fname) for name, fname in wmap.items()}
    single = os.path.join(path, SINGLE)
    if not os.path.exists(single):
        raise ValueError(f"from_pretrained: {path} has neither {SINGLE} nor {INDEX}")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def _config_dtype(config):
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None


@torch.no_grad()
def load_weights(model, path, *, dtype=None, device=None) -> None:
    """Materialise `model` (built on meta) on `device` in `dtype` (default: config dtype, else fp32) from `path`."""
    path = os.fspath(path)
    device = torch.device(device or "cpu")
    dtype = dtype or _config_dtype(model.config) or torch.float32
    files = weight_files(path, dict(model.named_parameters()))
    model.to(dtype)  # still on meta: free; then allocate once, in the final dtype
    model.to_empty(device=device)
    params = dict(model.named_parameters())  # to_empty made new Parameter objects
    by_file: dict[str, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    for fname, names in by_file.items():
        with safe_open(fname, framework="pt", device="cpu") as f:
            for name in names:
                t = f.get_tensor(name)
                if t.shape != params[name].shape:
                    raise ValueError(f"from_pretrained: {name} has shape {tuple(t.shape)} in {fname}, the config "
                                     f"expects {tuple(params[name].shape)}")
                params[name].copy_(t)
    from qlfast.model.rope import rope_parameters

    model.model.rotary_emb.inv_freq = rope_parameters(model.config, device)[0]


def save(model, path, *, tokenizer=None, max_shard_bytes: int = 4 * 2**30, state_dict=None, dtype=None) -> None:
    """Write config.json, safetensors (sharded past max_shard_bytes, with an index) and the tokenizer if given.

    state_dict: pass a gathered full state dict when the model is sharded (FSDP2); default: model.state_dict().
    dtype: the floating-point tensors are written in it (the compute dtype, not fp32 masters); default: as stored.
    config.json names the written dtype as both `dtype` (transformers 5) and `torch_dtype` (what transformers 4 and
    older vLLM read). A model loaded from a directory with generation_config.json gets a copy of it (the sampling
    defaults and stop tokens that transformers and vLLM apply)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    sd = state_dict if state_dict is not None else model.state_dict()
    sd = {k: _cast(v.detach().to("cpu"), dtype).contiguous() for k, v in sd.items() if "rotary_emb" not in k}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    for stale in (SINGLE, INDEX):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    shards, cur, cur_bytes = [], {}, 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if cur and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[name] = t
        cur_bytes += nbytes
    shards.append(cur)
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, SINGLE), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata=meta)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in sd.values())
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = model.config
    written = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    config.dtype = written
    config.save_pretrained(path)
    config_file = os.path.join(path, "config.json")
    with open(config_file) as f:
        conf = json.load(f)
    conf["torch_dtype"] = written
    with open(config_file, "w") as f:
        json.dump(conf, f, indent=2, sort_keys=True)
        f.write("\n")
    source = getattr(config, "_name_or_path", "") or ""  # the directory load_config read, if any
    gen, dest = os.path.join(source, GENERATION_CONFIG), os.path.join(path, GENERATION_CONFIG)
    if source and os.path.isfile(gen) and os.path.realpath(gen) != os.path.realpath(dest):
        shutil.copyfile(gen, dest)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t
