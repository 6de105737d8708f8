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
`packed_modules_mapping`); with tensor_parallel_size=1 each HF tensor is a row range of one engine parameter. A plan
built once maps every HF name to (engine parameter, row range); a sync is then one `copy_` per tensor into that
view, cast to the engine dtype on the way (no per-tensor weight_loader calls, no re-processing, no allocation).
Names the plan does not know go, in buckets of at most `bucket_bytes`, through the model's own
`load_weights(...)`; an engine whose parameters are not plain tensors (quantized, or CPU oneDNN-packed with
`cpu_plain_linear=False`) takes vLLM's `reload_weights` for everything.

FSDP2: a DTensor parameter is gathered with `full_tensor()` (a collective: every rank runs the same sync, each
rank's engine receives the full weights) one parameter at a time, copied, and dropped, so the extra memory is one
full parameter (plus one fallback bucket), never the whole model.

Errors: a name the engine does not know, or a shape that does not fit its slot, raises WeightSyncError naming it;
when the source is an nn.Module, names and (global) shapes are all checked before the first copy.
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
    """Bytes written into the engine (engine dtype)."""
    tensors: int
    fast_tensors: int
    """Tensors copied straight into engine parameters."""
    fallback_tensors: int
    """Tensors that went through vLLM's load_weights / reload_weights."""
    version: int
    """The engine's weight version after the sync."""


# --- CPU: keep plain linear weights -----------------------------------------------------------------------------------

_PLAIN_CPU_LINEAR_INSTALLED = False


def use_plain_cpu_linear() -> None:
    """Make vLLM's CPU linear layers keep their weight tensor and call F.linear on it (idempotent, process-wide).

    vLLM's CPU build otherwise replaces each linear weight by a oneDNN/sgl packed handle (the tensor becomes shape
    (0,)), so new weights need a re-pack per layer (~5x a copy). The replacement is installed before the engine
    loads; it affects engines created afterwards in this process. Non-2D weights keep vLLM's own handling.
    """
    global _PLAIN_CPU_LINEAR_INSTALLED
    if _PLAIN_CPU_LINEAR_INSTALLED:
        return
    import vllm.model_executor.layers.utils as vllm_layer_utils

    packed_dispatch = vllm_layer_utils.dispatch_cpu_unquantized_gemm

    def plain_dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:
            return packed_dispatch(layer, remove_weight)
        # the layer passes its current `weight` at call time, so an in-place copy into it is seen by the next GEMM
        layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

    # vLLM imports this name inside process_weights_after_loading at call time, so replacing the attribute suffices
    vllm_layer_utils.dispatch_cpu_unquantized_gemm = plain_dispatch
    _PLAIN_CPU_LINEAR_INSTALLED = True


# --- the plan: HF name -> engine parameter row range -----------------------------------------------------------------


@dataclass
class _Plan:
    slots: dict  # hf name -> (tensor view to copy into)
    skip: frozenset  # HF names the engine ties to another parameter (lm_head.weight with tied embeddings)
    fast: bool  # False: every tensor goes through vLLM's reload_weights
    why_slow: str


def _renames(mapper) -> bool:
    """Whether vLLM's name mapper renames weights (beyond the q/k/v, gate/up stacking the plan handles itself)."""
    if mapper is None:
        return False
    fields = ("orig_to_new_renaming", "orig_to_new_regex", "orig_to_new_substr", "orig_to_new_prefix",
              "orig_to_new_suffix")
    return any(getattr(mapper, f, None) for f in fields)


def _build_plan(engine: RolloutEngine) -> _Plan:
    model = engine.model
    mcfg = engine.llm.llm_engine.model_config
    hf_cfg = mcfg.hf_config.get_text_config() if hasattr(mcfg.hf_config, "get_text_config") else mcfg.hf_config
    skip = frozenset({"lm_head.weight"} if getattr(hf_cfg, "tie_word_embeddings", False) else ())
    packed = dict(getattr(model, "packed_modules_mapping", {}) or {})
    slots, why_slow = {}, ""
    if getattr(mcfg, "quantization", None):
        why_slow = f"quantized engine ({mcfg.quantization})"
    elif _renames(getattr(model, "hf_to_vllm_mapper", None)):
        why_slow = "model renames checkpoint weights (hf_to_vllm_mapper)"
    for pname, param in model.named_parameters():
        if why_slow:
            break
        module_name, _, leaf = pname.rpartition(".")
        parent, _, short = module_name.rpartition(".")
        if param.numel() == 0:
            why_slow = f"engine parameter {pname} is packed (CPU oneDNN; EngineConfig.cpu_plain_linear=False)"
            break
        data = param.data
        if short in packed:
            sizes = list(getattr(model.get_submodule(module_name), "output_sizes", []) or [])
            if len(sizes) != len(packed[short]) or sum(sizes) != data.shape[0]:
                why_slow = f"cannot split {pname} {tuple(data.shape)} into {packed[short]} (tensor parallel?)"
                break
            start = 0
            for sub, size in zip(packed[short], sizes):
                slots[f"{parent}.{sub}.{leaf}" if parent else f"{sub}.{leaf}"] = data.narrow(0, start, size)
                start += size
        else:
            slots[pname] = data
    return _Plan(slots=slots, skip=skip, fast=not why_slow, why_slow=why_slow)


def _plan(engine: RolloutEngine) -> _Plan:
    if engine._sync_plan is None:
        engine._sync_plan = _build_plan(engine)
    return engine._sync_plan


def hf_name(name: str) -> str:
    """The HF parameter name behind a trainer's (possibly wrapped) parameter name."""
    for token in _WRAPPER_TOKENS:
        name = name.replace(token, "")
    return name[len("module."):] if name.startswith("module.") else name


def _check_slot(plan: _Plan, name: str, shape: tuple) -> None:
    slot = plan.slots.get(name)
    if slot is None:
        if plan.fast:
            raise WeightSyncError(f"sync_weights: the engine has no weight named {name!r} (engine names look like "
                                  f"{next(iter(plan.slots), '?')!r})")
        return
    if tuple(slot.shape) != tuple(shape):
        raise WeightSyncError(f"sync_weights: weight {name!r} has shape {tuple(shape)} but the engine expects "
                              f"{tuple(slot.shape)}")


def _named_tensors(source) -> tuple[Iterable[tuple[str, torch.Tensor]], bool]:
    """(iterable of (name, tensor), whether all names/shapes are known up front)."""
    if isinstance(source, torch.nn.Module):
        return source.named_parameters(), True
    if isinstance(source, Mapping):
        return source.items(), True
    return source, False


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor: nothing is sharded
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


def _load_fallback(engine: RolloutEngine, bucket: list) -> None:
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
    the engine's parameters in place; reset the prefix cache; set the weight version (default: previous + 1)."""
    if engine.sleep_enabled and engine.weights_asleep:
        raise RuntimeError("sync_weights: the engine's weights are asleep; call engine.wake_up(['weights']) first")
    plan = _plan(engine)
    items, known = _named_tensors(source)
    if known:
        items = [(hf_name(n), t) for n, t in items]
        if plan.fast:
            for name, t in items:
                if name not in plan.skip:
                    _check_slot(plan, name, tuple(t.shape))
    t0 = time.perf_counter()
    n_bytes = n_fast = n_fallback = n_total = 0
    bucket, bucket_size, slow_all = [], 0, []
    with torch.no_grad():
        for raw_name, tensor in items:
            name = hf_name(raw_name)
            n_total += 1
            if name in plan.skip:
                _full(tensor)  # still a collective for sharded params: every rank must take part
                continue
            if plan.fast and not known:
                _check_slot(plan, name, tuple(tensor.shape))
            full = _full(tensor)
            slot = plan.slots.get(name) if plan.fast else None
            if slot is not None:
                slot.copy_(full)
                n_fast += 1
                n_bytes += slot.numel() * slot.element_size()
                continue
            # unmapped: the slow path, in bounded buckets (or all at once for reload_weights)
            full = full.to(engine.dtype)
            n_fallback += 1
            n_bytes += full.numel() * full.element_size()
            if not plan.fast:
                slow_all.append((name, full))
                continue
            bucket.append((name, full))
            bucket_size += full.numel() * full.element_size()
            if bucket_size >= bucket_bytes:
                _load_fallback(engine, bucket)
                bucket, bucket_size = [], 0
        if bucket:
            _load_fallback(engine, bucket)
        if slow_all:
            try:
                engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": slow_all})
            except Exception as e:
                raise WeightSyncError(f"sync_weights: vLLM reload_weights failed ({plan.why_slow}): "
                                      f"{type(e).__name__}: {e}") from e
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    engine.reset_prefix_cache()
    engine.weight_version = engine.weight_version + 1 if version is None else int(version)
    return SyncStats(seconds=time.perf_counter() - t0, bytes=n_bytes, tensors=n_total, fast_tensors=n_fast,
                     fallback_tensors=n_fallback, version=engine.weight_version)


def wake_and_sync(engine: RolloutEngine, source, **kwargs) -> SyncStats:
    """The post-step ordering: wake weights, push, reset prefix cache (inside sync_weights), wake KV cache."""
    engine.wake_up(["weights"])
    stats = sync_weights(engine, source, **kwargs)
    engine.wake_up(["kv_cache"])
    return stats
