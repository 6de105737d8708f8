"""qlfast.rollout.weight_sync: push the trainer's weights into the running vLLM engine, in place, after every step.

Step ordering around one RL step (colocated: trainer and engine share the device):

    groups = engine.generate(prompts, n, sampling)      # samples carry weight_version v
    engine.sleep()                                      # GPU: weights offloaded, KV cache dropped; CPU: no-op
    loss.backward(); optimizer.step()                   # the training step has the memory
    wake_and_sync(engine, model)                        # = engine.wake_up(["weights"])
                                                        #   sync_weights(engine, model): copy, reset prefix cache,
                                                        #     weight_version = v + 1
                                                        #   engine.wake_up(["kv_cache"])
    check_parity(engine, model, some_token_ids)         # every k steps (qlfast.rollout.parity)

Algorithm of sync_weights. vLLM fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (the model's
`packed_modules_mapping`). A plan built once per engine picks one of three ways:

- copy (tensor_parallel_size=1, plain parameters): each HF tensor is a row range of one engine parameter; the plan maps
  every HF name to that view and a sync is one `copy_` per tensor, cast to the engine dtype on the way (no per-tensor
  weight_loader calls, no re-processing, no allocation).
- loader (tensor_parallel_size > 1): each engine rank holds a shard (column-parallel q/k/v, gate/up and vocabulary
  rows; row-parallel o_proj / down_proj columns; KV heads replicated when tp > num_kv_heads). Full HF tensors go, in
  buckets of at most `bucket_bytes`, through the model's own `load_weights`, whose per-layer weight loaders narrow
  each one to this rank's shard and copy it in place; the bucket is then dropped. The plan keeps the full (unsharded)
  shape of every HF name, from the engine's layer attributes, so names and shapes are checked before the first copy
  (the loaders' narrow() would accept a tensor that is too large along the sharded dimension).
- reload (quantized, renamed, or CPU oneDNN-packed parameters with `cpu_plain_linear=False`): everything through
  vLLM's `reload_weights` at once.

FSDP2: a DTensor parameter is gathered with `full_tensor()`, a collective: every rank runs the same sync over the
same parameters in the same order, and each rank's engine (shard) takes what it needs from the full tensor. The extra
memory is one full parameter in copy mode and one bucket in loader mode (`SyncStats.max_bucket_bytes`), never the
whole model; without FSDP2 the trainer's own tensors are handed over and nothing is copied beyond the engine's
shard.

Errors: a name the engine does not know, or a shape that does not fit, raises WeightSyncError naming it; when the
source is an nn.Module or a dict, names and (global) shapes are all checked before the first copy.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from qlfast.rollout.engine import RolloutEngine

# wrappers that add a path component to parameter names (torch.compile, activation checkpointing, FSDP1, DDP)
_WRAPPER_TOKENS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


class WeightSyncError(ValueError):
    """A weight the engine does not know, or a shape that does not fit."""


@dataclass(frozen=True)
class SyncStats:
    seconds: float
    bytes: int
    """Bytes of the synced tensors in the engine dtype (full tensors: under TP each rank keeps its shard of them)."""
    tensors: int
    fast_tensors: int
    """Tensors copied straight into engine parameters (copy mode)."""
    fallback_tensors: int
    """Tensors that went through vLLM's weight loaders (load_weights under TP, reload_weights for packed engines)."""
    version: int
    """The engine's weight version after the sync."""
    mode: str = "copy"
    """How the plan synced: copy, loader (TP) or reload (module docstring)."""
    max_bucket_bytes: int = 0
    """The most bytes of full source tensors held at once (one tensor in copy mode, one bucket in loader mode)."""


# --- the plan: HF name -> engine parameter view, or the full shape the TP weight loaders expect ----------------------


@dataclass
class _Plan:
    mode: str  # "copy" | "loader" | "reload" (module docstring)
    slots: dict  # copy: hf name -> view of the engine parameter to copy into
    shapes: dict  # copy and loader: hf name -> the full (unsharded) shape the engine expects
    skip: frozenset  # HF names the engine ties to another parameter (lm_head.weight with tied embeddings)
    why: str  # why not "copy"


def _renames(mapper) -> bool:
    """Whether vLLM's name mapper renames weights (beyond the q/k/v, gate/up stacking the plan handles itself)."""
    if mapper is None:
        return False
    fields = ("orig_to_new_renaming", "orig_to_new_regex", "orig_to_new_substr", "orig_to_new_prefix",
              "orig_to_new_suffix")
    return any(getattr(mapper, f, None) for f in fields)


def _full_rows_cols(module: torch.nn.Module, param: torch.Tensor) -> tuple[list[int], int | None] | None:
    """The unsharded output rows of each fused part of a vLLM parallel layer's parameter, and its input columns
    (None for 1-D); None when the parameter is not tensor-parallel (replicated as is)."""
    from vllm.model_executor.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    cols = None
    if isinstance(module, VocabParallelEmbedding):
        rows, cols = [module.org_vocab_size], module.embedding_dim
    elif isinstance(module, QKVParallelLinear):
        q, kv = module.total_num_heads * module.head_size, module.total_num_kv_heads
        rows, cols = [q, kv * module.head_size, kv * module.v_head_size], module.input_size
    elif isinstance(module, MergedColumnParallelLinear):
        rows, cols = list(module.output_sizes), module.input_size
    elif isinstance(module, LinearBase):
        rows, cols = [module.output_size], module.input_size
    else:
        return None
    return rows, (cols if param.dim() == 2 else None)


def _build_plan(engine: RolloutEngine) -> _Plan:
    model = engine.model
    mcfg = engine.llm.llm_engine.model_config
    hf_cfg = mcfg.hf_config.get_text_config() if hasattr(mcfg.hf_config, "get_text_config") else mcfg.hf_config
    skip = frozenset({"lm_head.weight"} if getattr(hf_cfg, "tie_word_embeddings", False) else ())
    packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
    why = ""
    if getattr(mcfg, "quantization", None):
        why = f"quantized engine ({mcfg.quantization})"
    elif _renames(getattr(model, "hf_to_vllm_mapper", None)):
        why = "model renames checkpoint weights (hf_to_vllm_mapper)"
    elif any(p.numel() == 0 for p in model.parameters()):
        why = "engine parameters are packed (CPU oneDNN; EngineConfig.cpu_plain_linear=False)"
    if why:
        return _Plan("reload", {}, {}, skip, why)
    tp = engine.tp_size
    slots, shapes = {}, {}
    for module_name, module in model.named_modules():
        parent, _, short = module_name.rpartition(".")
        for leaf, param in module.named_parameters(recurse=False):
            data = param.data
            parts = packed.get(short)
            if tp > 1:
                full = _full_rows_cols(module, data)
                if full is None:  # replicated on every rank (norms)
                    shapes[f"{module_name}.{leaf}"] = tuple(data.shape)
                    continue
                rows, cols = full
                tail = (cols,) if cols is not None else ()
                if parts and len(parts) == len(rows):
                    for sub, r in zip(parts, rows):
                        shapes[f"{parent}.{sub}.{leaf}" if parent else f"{sub}.{leaf}"] = (r, *tail)
                else:
                    shapes[f"{module_name}.{leaf}"] = (sum(rows), *tail)
                continue
            if parts:
                sizes = list(getattr(module, "output_sizes", []) or [])
                if len(sizes) != len(parts) or sum(sizes) != data.shape[0]:
                    return _Plan("reload", {}, {}, skip, f"cannot split {module_name}.{leaf} {tuple(data.shape)} "
                                                         f"into {parts}")
                start = 0
                for sub, size in zip(parts, sizes):
                    slots[f"{parent}.{sub}.{leaf}" if parent else f"{sub}.{leaf}"] = data.narrow(0, start, size)
                    start += size
            else:
                slots[f"{module_name}.{leaf}"] = data
    if tp > 1:
        return _Plan("loader", {}, shapes, skip, f"tensor_parallel_size={tp}: vLLM's weight loaders take each shard")
    return _Plan("copy", slots, {n: tuple(v.shape) for n, v in slots.items()}, skip, "")


def _plan(engine: RolloutEngine) -> _Plan:
    if engine._sync_plan is None:
        engine._sync_plan = _build_plan(engine)
    return engine._sync_plan


def hf_name(name: str) -> str:
    """The HF parameter name behind a trainer's (possibly wrapped) parameter name."""
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name[len("module."):] if name.startswith("module.") else name


def _check(plan: _Plan, name: str, shape: tuple) -> None:
    if plan.mode == "reload":  # vLLM's own loaders check what they load
        return
    want = plan.shapes.get(name)
    if want is None:
        raise WeightSyncError(f"sync_weights: the engine has no weight named {name!r} (engine names look like "
                              f"{next(iter(plan.shapes), '?')!r})")
    if tuple(want) != tuple(shape):
        raise WeightSyncError(f"sync_weights: weight {name!r} has shape {tuple(shape)} but the engine expects "
                              f"{tuple(want)}")


def _named_tensors(source) -> tuple[Iterable[tuple[str, torch.Tensor]], bool]:
    """(iterable of (name, tensor), whether all names/shapes are known up front)."""
    if isinstance(source, torch.nn.Module):
        return source.named_parameters(), True
    if isinstance(source, Mapping):
        return source.items(), True
    return source, False


def _full(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole tensor behind a (possibly FSDP2-sharded) parameter. A DTensor's local shard is cast to `dtype` (the
    engine's) before the all-gather: fp32 master shards then cross the wire, and take memory, at bf16 size."""
    t = t.detach()
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing is sharded
        return t
    if not isinstance(t, DTensor):
        return t
    return (t if dtype is None else t.to(dtype)).full_tensor()


def _load_bucket(engine: RolloutEngine, bucket: list) -> None:
    names = [n for n, _ in bucket]
    # vLLM's load_weights looks each name up in its parameter dict: an unknown name is a KeyError naming it
    try:
        loaded = engine.model.load_weights(iter(bucket))
    except KeyError as e:
        raise WeightSyncError(f"sync_weights: the engine has no weight named {e.args[0]!r} (bucket: {names})") from e
    except (AssertionError, RuntimeError, ValueError) as e:
        raise WeightSyncError(f"sync_weights: vLLM could not load {names}: {type(e).__name__}: {e}") from e
    if loaded is not None and not loaded:
        raise WeightSyncError(f"sync_weights: the engine loaded none of {names}")


def sync_weights(engine: RolloutEngine, source, *, bucket_bytes: int = 512 << 20,
                 version: int | None = None) -> SyncStats:
    """Copy `source` (an nn.Module, possibly FSDP2-sharded, a state dict, or an iterable of (HF name, tensor)) into
    the engine's parameters in place (under TP: this rank's shard of each); reset the prefix cache; set the weight
    version (default: previous + 1). A collective when `source` holds DTensors."""
    if engine.sleep_enabled and engine.weights_asleep:
        raise RuntimeError("sync_weights: the engine's weights are asleep; call engine.wake_up(['weights']) first")
    plan = _plan(engine)
    items, known = _named_tensors(source)
    if known:
        items = [(hf_name(n), t) for n, t in items]
        for name, t in items:
            if name not in plan.skip:
                _check(plan, name, tuple(t.shape))
    t0 = time.perf_counter()
    n_bytes = n_fast = n_loader = n_total = 0
    bucket, bucket_size, max_bucket, reload_all = [], 0, 0, []
    with torch.no_grad():
        for raw_name, tensor in items:
            name = hf_name(raw_name)
            n_total += 1
            if name in plan.skip:
                _full(tensor, engine.dtype)  # still a collective for sharded params: every rank must take part
                continue
            if not known:
                _check(plan, name, tuple(tensor.shape))
            full = _full(tensor, engine.dtype)
            size = full.numel() * full.element_size()
            n_bytes += full.numel() * engine.dtype.itemsize
            if plan.mode == "copy":
                plan.slots[name].copy_(full)
                n_fast += 1
                max_bucket = max(max_bucket, size)
                continue
            n_loader += 1
            if plan.mode == "reload":
                reload_all.append((name, full.to(engine.dtype)))
                continue
            bucket.append((name, full))
            bucket_size += size
            max_bucket = max(max_bucket, bucket_size)
            if bucket_size >= bucket_bytes:
                _load_bucket(engine, bucket)
                bucket, bucket_size = [], 0
        if bucket:
            _load_bucket(engine, bucket)
        del bucket
        if reload_all:
            max_bucket = sum(t.numel() * t.element_size() for _, t in reload_all)
            try:
                engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": reload_all})
            except Exception as e:
                raise WeightSyncError(f"sync_weights: vLLM reload_weights failed ({plan.why}): "
                                      f"{type(e).__name__}: {e}") from e
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    engine.reset_prefix_cache()
    engine.weight_version = engine.weight_version + 1 if version is None else int(version)
    return SyncStats(seconds=time.perf_counter() - t0, bytes=n_bytes, tensors=n_total, fast_tensors=n_fast,
                     fallback_tensors=n_loader, version=engine.weight_version, mode=plan.mode,
                     max_bucket_bytes=max_bucket)


def wake_and_sync(engine: RolloutEngine, source, **kwargs) -> SyncStats:
    """The post-step ordering: wake weights, push, reset prefix cache (inside sync_weights), wake KV cache."""
    engine.wake_up(["weights"])
    stats = sync_weights(engine, source, **kwargs)
    engine.wake_up(["kv_cache"])
    return stats
