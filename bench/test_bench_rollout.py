"""Weight sync into the colocated vLLM engine: qlfast's in-place sync vs vLLM's reload_weights vs the copy floor.

Per model shape, three rows (op "weight_sync", mode "sync"):
  copy_floor           one torch copy_ per tensor into preallocated tensors of the same shapes and dtype: the bytes
                       alone, the least any in-place sync can cost on this machine
  qlfast               qlfast.rollout.sync_weights: HF names -> engine parameter slices (fused qkv / gate_up), copy_
  vllm_reload_weights  vLLM's in-process reload_weights (collective_rpc), the public in-place path
Each row carries GB/s and x_floor (time / copy_floor time). copy_floor and qlfast are timed alternately, round by
round, so that load from other processes on a shared machine falls on both alike.

Shapes: the tiny test model, and a Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14/2 heads, vocab 151936,
tied) with random weights: the engine starts with load_format="dummy" from a config-only directory, so nothing is
written to disk. One engine at a time (closed before the next) to keep memory bounded. Weights in bf16, the engine
dtype, so that every provider moves the same bytes. CPU only for now: vLLM is not on the GPU machines.
"""

import os
import statistics
import time

import pytest
import torch

pytest.importorskip("vllm")

import harness  # noqa: E402

from qlfast.rollout import EngineConfig, RolloutEngine, sync_weights  # noqa: E402
from qlfast.rollout.tiny import tiny_qwen2_config  # noqa: E402

SHAPES = {
    "tiny": dict(),
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, layers=24, heads=14, kv_heads=2, intermediate_size=4864,
                       max_positions=4096, tie=True),
}


def _hf_weights(config, dtype) -> dict:
    """Random weights with HF names and shapes (built on the meta device first, so no fp32 model is allocated)."""
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float32).to(dtype) * 0.02
            for n, p in model.named_parameters()}


def _interleaved(fns: dict, rep: int) -> dict:
    """Time the functions alternately, rep rounds, so that load from other processes hits them alike."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(rep):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "reps": rep, "peak_bytes": 0}
            for k, v in times.items()}


@pytest.fixture(scope="module", params=list(SHAPES))
def setup(request, tmp_path_factory):
    name = request.param
    config = tiny_qwen2_config(**SHAPES[name])
    path = str(tmp_path_factory.mktemp(f"cfg-{name}"))
    config.save_pretrained(path)
    engine = RolloutEngine(path, EngineConfig(dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True,
                                              max_model_len=256, cpu_kv_cache_gib=1))
    weights = _hf_weights(config, torch.bfloat16)
    yield name, engine, weights
    engine.close()
    del weights


def test_weight_sync(benchmark, setup):
    name, engine, weights = setup
    n_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    shape = {"model": name, "params": sum(t.numel() for t in weights.values()), "tensors": len(weights),
             "dtype": "bf16", "bytes": n_bytes}
    dst = {n: torch.empty_like(t) for n, t in weights.items()}

    def floor():
        for n, t in weights.items():
            dst[n].copy_(t)

    def ours():
        sync_weights(engine, weights)

    items = list(weights.items())

    def reload():
        engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})

    rep = 20 if name == "tiny" else 5
    assert sync_weights(engine, weights).fallback_tensors == 0
    stats = _interleaved({"copy_floor": floor, "qlfast": ours}, rep)
    dst.clear()  # free the floor's destination before reload_weights allocates
    floor_ms = stats["copy_floor"]["median_ms"]

    def extra(st):
        return {"GBps": round(n_bytes / (st["median_ms"] * 1e-3) / 1e9, 2),
                "x_floor": round(st["median_ms"] / floor_ms, 2), "threads": torch.get_num_threads()}

    harness.record("weight_sync", "copy_floor", shape, "sync", stats["copy_floor"], extra=extra(stats["copy_floor"]))
    row = harness.record("weight_sync", "qlfast", shape, "sync", stats["qlfast"], extra=extra(stats["qlfast"]))
    if os.environ.get("QLFAST_BENCH_SKIP_RELOAD") != "1":
        reload_stats = harness.measure(reload, warmup=1, rep=min(rep, 5))
        harness.record("weight_sync", "vllm_reload_weights", shape, "sync", reload_stats, extra=extra(reload_stats))
    benchmark.extra_info.update(row)
    benchmark.pedantic(ours, rounds=1, iterations=1)
