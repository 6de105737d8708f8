"""One training step (forward + backward, no optimizer) of QwenForCausalLM vs transformers, and the longest fit.

GPU (real sizes): Qwen2.5-1.5B- and 7B-shaped models, random bf16 weights, one packed sequence of 16K / 32K / 60K
tokens. Providers: qlfast (checkpointing + tiled MLP, checkpoint offload from 32K, attention backend "auto",
head through linear_logprob) and transformers (SDPA, gradient checkpointing, its own LM-head loss, Liger when
installed). Rows carry tokens/s, MFU (vs 989 TFLOP/s dense bf16 on H100) and peak memory. A row whose run ran
out of memory is recorded with "oom": true. CPU (small sizes): a tiny model at 1K / 2K tokens, same code.

FLOPs per step (Kaplan et al. 2020; causal attention counted once, recomputation not counted):
    6 * P_dense * T  +  6 * L * T^2 * Hq * D       (P_dense: parameters except the embedding lookup)
"""

from __future__ import annotations

import time

import harness
import pytest
import torch

from qlfast.model import QwenForCausalLM
from qlfast.model.memory import param_count
from qlfast.ops.linear_logprob import linear_logprob

H100_BF16 = 989e12
SHAPES = {
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         tie_word_embeddings=True, max_position_embeddings=131072),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False, max_position_embeddings=131072),
    "tiny": dict(model_type="qwen2", vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                 max_position_embeddings=8192),
}
REAL = harness.real_sizes()
MODELS = ["qwen2.5-1.5b", "qwen2.5-7b"] if REAL else ["tiny"]
TOKENS = [16384, 32768, 61440] if REAL else [512, 1024]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def step_flops(cfg: dict, tokens: int) -> float:
    n = param_count(cfg)
    dense = n["total"] - cfg["vocab_size"] * cfg["hidden_size"] * (0 if cfg["tie_word_embeddings"] else 1)
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 6 * dense * tokens + 6 * cfg["num_hidden_layers"] * tokens**2 * cfg["num_attention_heads"] * d


def _qlfast_step(cfg, tokens):
    model = QwenForCausalLM.from_config(cfg, dtype=DTYPE, device=DEVICE, seed=0)
    model.set_options(attn_backend="auto", checkpoint=True, tiled_mlp=True,
                      offload=DEVICE == "cuda" and tokens > 16384)
    ids = torch.randint(0, cfg["vocab_size"], (tokens,), device=DEVICE)
    targets = torch.roll(ids, -1)

    def fn():
        lp = linear_logprob(model(ids), model.lm_head_weight, targets)
        lp.mean().backward()
        model.zero_grad(set_to_none=True)

    return model, fn


def _hf_step(cfg, tokens):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**cfg)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=DTYPE, attn_implementation="sdpa")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    except ImportError:
        pass
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, cfg["vocab_size"], (1, tokens), device=DEVICE)

    def fn():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return model, fn


PROVIDERS = {"qlfast": _qlfast_step, "transformers": _hf_step}


def _free():
    harness.free_device_memory()


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_train_step(benchmark, provider, name, tokens):
    cfg = SHAPES[name]
    shape = {"model": name, "tokens": tokens}
    flops = step_flops(cfg, tokens)
    made, oom = harness.guarded(PROVIDERS[provider], cfg, tokens)
    model, fn = made if made is not None else (None, None)
    row = None
    if oom is None:
        row, oom = harness.guarded(harness.bench, benchmark, "model_train_step", provider, shape, "fwd+bwd", fn,
                                   flops=flops, warmup=1, rep=3)
    if oom is not None:  # outside any except block: no frame keeps the model or its activations alive
        del model, fn
        harness.free_device_memory()
        harness.record("model_train_step", provider, shape, "fwd+bwd",
                       {"median_ms": float("nan"), "min_ms": float("nan"), "reps": 0, "peak_bytes": 0},
                       extra={"oom": True})
        pytest.skip(f"{provider} {name} at {tokens} tokens: out of memory")
    secs = row["median_ms"] * 1e-3
    extra = {"tokens_per_s": round(tokens / secs, 1)}
    if DEVICE == "cuda":
        extra["mfu"] = round(flops / secs / H100_BF16, 4)
    benchmark.extra_info.update(extra)
    print(provider, name, tokens, extra, f"peak {row['peak_mem_mib']} MiB")
    del model, fn
    _free()


def _fits(provider, cfg, tokens) -> bool:
    model = fn = None
    try:
        model, fn = PROVIDERS[provider](cfg, tokens)
        fn()
        torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del model, fn
        _free()


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_longest_sequence(benchmark, provider, name):
    """Binary search (8K granularity, at most ~8 minutes) for the longest single sequence that trains."""
    if DEVICE != "cuda":  # bench/ has no gpu-marker skip of its own; on CPU nothing runs out of memory
        pytest.skip("needs a CUDA GPU")
    cfg = SHAPES[name]
    lo, hi, step = 0, 1 << 20, 8192
    t_end = time.monotonic() + 480
    while hi - lo > step and time.monotonic() < t_end:
        mid = (lo + hi) // 2 // step * step
        if _fits(provider, cfg, mid):
            lo = mid
        else:
            hi = mid
    harness.record("model_longest_sequence", provider, {"model": name}, "fwd+bwd",
                   {"median_ms": 0.0, "min_ms": 0.0, "reps": 0, "peak_bytes": 0}, extra={"max_tokens": lo})
    benchmark.extra_info["max_tokens"] = lo
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(provider, name, "longest sequence", lo)
