"""The memory model (qlfast.model.memory) against measured peaks, and a 60K-token forward+backward on CPU.

Peaks are measured in a fresh subprocess (this file run as a script) as the RSS high-water mark above the RSS
after the model and inputs exist: that excess is the gradients, checkpoints and transients the model predicts
(on CPU the offloaded "host" copies are RSS too).
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from qlfast.model.memory import MemoryOptions, estimate, param_count

TINY = dict(model_type="qwen2", vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=65536)


def _torch_attn_workspace(hq: int, seqlen: int) -> int:
    return 8 * hq * min(1024, seqlen) * seqlen * 4


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


# the 60K-token run: one 64-dim head, so the CPU time stays small
LONG = {**TINY, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1, "num_key_value_heads": 1}


def _worker(total: int, seqlen: int, opts: dict, cfg: dict) -> dict:
    torch.set_num_threads(2)
    from qlfast.model import QwenForCausalLM
    from qlfast.ops.linear_logprob import linear_logprob

    model = QwenForCausalLM.from_config(cfg, seed=0)
    model.set_options(attn_backend="torch", **opts)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (total,), generator=gen)
    targets = torch.randint(0, TINY["vocab_size"], (total,), generator=gen)
    cu = torch.arange(0, total + 1, seqlen, dtype=torch.int32)
    # warm up on a short input so that thread pools and allocator arenas exist before the baseline
    h = model(ids[:seqlen], None, cu[:2])
    linear_logprob(h, model.lm_head_weight, targets[:seqlen]).sum().backward()
    model.zero_grad(set_to_none=True)
    base = _rss("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    hidden = model(ids, None, cu)
    lp = linear_logprob(hidden, model.lm_head_weight, targets)
    lp.float().mean().backward()
    seconds = time.perf_counter() - t0
    finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    return {"peak": _rss("VmHWM:") - base, "seconds": seconds, "finite": finite,
            "grad_norm": float(sum(p.grad.double().norm() ** 2 for p in model.parameters()) ** 0.5)}


def _measure(total, seqlen, opts, cfg=TINY):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc to measure peak RSS")
    # A fixed mmap threshold makes glibc return every freed tensor to the OS at once (its default threshold grows
    # with use and then keeps freed 16 MiB blocks in the heap), so the RSS high-water mark tracks live tensors.
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, __file__, json.dumps([total, seqlen, opts, cfg])], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _predicted(total, seqlen, opts, cfg=TINY):
    mem = MemoryOptions(param_bytes=4, optimizer_bytes=0, checkpoint=opts.get("checkpoint", False),
                        offload=opts.get("offload", False), tiled_mlp=opts.get("tiled_mlp", False),
                        mlp_tile_tokens=opts.get("mlp_tile_tokens", 4096),
                        attn_workspace_bytes=_torch_attn_workspace(cfg["num_attention_heads"], seqlen))
    e = estimate(cfg, total, options=mem)
    # params exist before the baseline; on CPU the offloaded copies are part of the RSS
    return e["total"] - e["params"] + e["host"], e


@pytest.mark.slow
def test_long_sequence_60k_within_memory_model():
    """A tiny model (one 64-dim head), forward+backward over 61,440 packed tokens (120 sequences of 512),
    checkpointed + offloaded + tiled: finite gradients, and peak RSS within the memory model's prediction."""
    total, seqlen = 61440, 512
    opts = dict(checkpoint=True, offload=True, tiled_mlp=True, mlp_tile_tokens=4096)
    got = _measure(total, seqlen, opts, LONG)
    pred, parts = _predicted(total, seqlen, opts, LONG)
    assert got["finite"] and got["grad_norm"] > 0
    assert got["peak"] <= pred, f"peak RSS {got['peak'] / 2**20:.0f} MiB > predicted {pred / 2**20:.0f} MiB {parts}"
    # and the prediction is a bound, not a blanket: within 3x of what was measured
    assert pred <= 3 * got["peak"], f"prediction {pred / 2**20:.0f} MiB is > 3x the peak {got['peak'] / 2**20:.0f}"
    print(f"60K tokens: {got['seconds']:.1f} s, peak {got['peak'] / 2**20:.0f} MiB, predicted {pred / 2**20:.0f}")


@pytest.mark.parametrize("opts", [dict(checkpoint=True), dict(checkpoint=False)])
def test_memory_model_bounds_measured_peak(opts):
    total, seqlen = 8192, 512
    got = _measure(total, seqlen, opts)
    pred, parts = _predicted(total, seqlen, opts)
    assert got["peak"] <= pred, f"peak RSS {got['peak'] / 2**20:.0f} MiB > predicted {pred / 2**20:.0f} MiB {parts}"
    assert pred <= 3 * got["peak"], f"prediction {pred / 2**20:.0f} MiB is > 3x the peak {got['peak'] / 2**20:.0f}"


def test_estimate_parts_7b_60k():
    """Numbers for docs/perf/model.md: a Qwen2.5-7B-shaped model at 60K tokens on one GPU, bf16."""
    cfg = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072)
    assert abs(param_count(cfg)["total"] - 7.62e9) < 0.01e9  # Qwen2.5-7B has 7.62B parameters
    plain = estimate(cfg, 60_000, options=MemoryOptions(checkpoint=True))
    lean = estimate(cfg, 60_000, options=MemoryOptions(checkpoint=True, offload=True, tiled_mlp=True,
                                                       offload_optimizer=True))
    assert lean["checkpoints"] < plain["checkpoints"] / 10 and lean["transient"] < plain["transient"]
    assert lean["optimizer"] == 0 and lean["host"] > plain["host"]
    assert lean["total"] < 80e9 < plain["total"]  # fits an H100 only with the lean options
    sp2 = estimate(cfg, 60_000, sp=2, dp=2, options=MemoryOptions(checkpoint=True))
    assert sp2["checkpoints"] == plain["checkpoints"] // 2 and sp2["optimizer"] < plain["optimizer"]
    with pytest.raises(ValueError, match="seq_len"):
        estimate(cfg, 0)


def test_masters_and_adam_are_12_bytes_per_parameter():
    """fp32 masters (4) + AdamW m, v (8) per parameter before sharding, fp32 gradients (4) beside them; the bf16
    working copy (2) only without FSDP2; FSDP2 divides the 16 by dp, CPUOffloadPolicy moves them to the host."""
    cfg = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
               num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072)
    n = param_count(cfg)
    p, layer, root = n["total"], n["layer"], n["embed"] + cfg["hidden_size"]
    mixed = estimate(cfg, 4096, options=MemoryOptions(checkpoint=True))
    assert mixed["params"] + mixed["optimizer"] == (4 + 8 + 2) * p  # masters, m and v, and the bf16 working copy
    assert mixed["grads"] == 4 * p + 2 * layer  # fp32 gradients, plus one layer's bf16 gradient before its cast
    pure = estimate(cfg, 4096, options=MemoryOptions(checkpoint=True, master_bytes=2))
    assert pure["params"] == 2 * p and pure["grads"] == 2 * p and pure["optimizer"] == 8 * p
    dp8 = estimate(cfg, 4096, dp=8, options=MemoryOptions(checkpoint=True))
    assert dp8["params"] == int(4 * p / 8 + 2 * (2 * layer + root))  # fp32 shards + bf16 layers in flight and root
    assert dp8["optimizer"] == int(8 * p / 8) and dp8["grads"] == int(4 * p / 8 + 6 * layer)
    off = estimate(cfg, 4096, dp=8, options=MemoryOptions(checkpoint=True, offload_optimizer=True))
    assert off["optimizer"] == 0 and off["params"] == 2 * (2 * layer + root)
    assert off["host"] == int(16 * p / 8)


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    print(json.dumps(_worker(*args)))
