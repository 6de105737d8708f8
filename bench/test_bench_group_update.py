"""One GRPO group's policy-loss forward + backward: prompt-shared packing vs one by one (docs/perf/shared_prompt.md).

A group is one prompt of P tokens and G responses of R tokens, packed either one by one (G sequences of P + R
tokens) or prompt-shared ([P | R x G], qlfast.ops.shared_prefix_attention). Both go through the same model and the
fused policy loss over the response rows only; the rows carry time and peak memory, and `tokens` (what was packed).

GPU (real sizes): a Qwen2.5-1.5B-shaped model (random bf16 weights, checkpointing + tiled MLP), P = 8K and 16K,
R = 1K, G = 8. CPU (small sizes): the tiny preset's model at its RL shapes (P = 192, R = 48, G = 8) and P = 512.
FLOPs are those each packing actually runs (so the two rows' TFLOP/s compare how well each uses the hardware, and
their times how much work the sharing saves): 6 x dense parameters x tokens, plus 12 x layers x Hq x D per attended
(query, key) pair (causal pairs counted once, as in bench/test_bench_model.py): G (P + R)^2 / 2 pairs one by one,
P^2 / 2 + G (R P + R^2 / 2) shared.
"""

from __future__ import annotations

import harness
import pytest
import torch
from test_bench_model import SHAPES

from qlfast.model import QwenForCausalLM
from qlfast.model.memory import param_count
from qlfast.ops import PolicyLossConfig, policy_loss
from qlfast.trainer.packing import pack

REAL = harness.real_sizes()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TINY = dict(model_type="qwen2", vocab_size=704, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, max_position_embeddings=2048)
MODEL = "qwen2.5-1.5b" if REAL else "tiny-preset"
CFG = SHAPES["qwen2.5-1.5b"] if REAL else TINY
CASES = [(8192, 1024, 8), (16384, 1024, 8)] if REAL else [(192, 48, 8), (512, 48, 8)]


def _flops(tokens: int, p: int, r: int, g: int, shared: bool) -> float:
    n = param_count(CFG)
    dense = n["total"] - CFG["vocab_size"] * CFG["hidden_size"] * (0 if CFG["tie_word_embeddings"] else 1)
    pairs = p * p / 2 + g * (r * p + r * r / 2) if shared else g * (p + r) ** 2 / 2
    d = CFG["hidden_size"] // CFG["num_attention_heads"]
    return 6 * dense * tokens + 12 * CFG["num_hidden_layers"] * CFG["num_attention_heads"] * d * pairs


def _group(p: int, r: int, g: int):
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, CFG["vocab_size"], (p,), generator=gen).tolist()
    responses = [torch.randint(1, CFG["vocab_size"], (r,), generator=gen).tolist() for _ in range(g)]
    advantages = torch.randn(g, generator=gen).tolist()
    return [prompt] * g, responses, advantages


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """One thread on CPU: on a shared 2-core machine two OpenMP threads stall whenever one is descheduled
    (docs/perf/grpo_step.md, "Threads")."""
    if DEVICE == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
    else:
        yield


@pytest.mark.parametrize("p,r,g", CASES)
@pytest.mark.parametrize("provider", ["shared", "one-by-one"])
def test_group_update(benchmark, provider, p, r, g):
    model = QwenForCausalLM.from_config(CFG, dtype=DTYPE, device=DEVICE, seed=0)
    model.set_options(attn_backend="auto", checkpoint=DEVICE == "cuda",
                      tiled_mlp=DEVICE == "cuda")
    prompts, responses, adv = _group(p, r, g)
    b = pack(prompts, responses, advantages=adv, share_prompts=provider == "shared").to(DEVICE)
    cfg = PolicyLossConfig(global_tokens=float(g * r))
    ones = torch.ones_like(b.advantages)

    def fn():
        hidden = model(b.input_ids, b.position_ids, b.cu_seqlens, prefix=b.prefix).index_select(0, b.rows)
        loss, _ = policy_loss(hidden, model.lm_head_weight, b.targets, b.advantages, ones, cu_seqlens=b.cu_rows,
                              config=cfg)
        loss.backward()
        model.zero_grad(set_to_none=True)

    shape = {"model": MODEL, "prompt": p, "response": r, "group": g, "tokens": b.num_tokens}
    row, oom = harness.guarded(harness.bench, benchmark, "group_update", provider, shape, "fwd+bwd", fn,
                               flops=_flops(b.num_tokens, p, r, g, provider == "shared"), warmup=1, rep=3)
    if oom is not None:  # outside the except block: no frame of fn keeps its tensors alive
        del fn, model, b
        harness.free_device_memory()
        harness.record("group_update", provider, shape, "fwd+bwd",
                       {"median_ms": float("nan"), "min_ms": float("nan"), "reps": 0, "peak_bytes": 0},
                       extra={"oom": True})
        pytest.skip(f"{provider} at P={p}, R={r}, G={g}: out of memory")
    print(provider, shape, f"{row['median_ms']:.1f} ms", f"peak {row['peak_mem_mib']} MiB")
