"""Worker for tests/dist/test_rollout_dist.py: one vLLM engine per rank (external_launcher), FSDP2-sharded trainer.

Every rank: start the engine from the same model directory, shard a perturbed copy of the weights with FSDP2
(gloo, CPU), sync_weights (DTensor params gathered with full_tensor), and check that greedy output now equals
transformers' on the unsharded perturbed weights, on every rank, and that the parity check passes.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from qlfast.rollout import EngineConfig, RolloutEngine, SamplingConfig, check_parity, sync_weights

PROMPTS = [[5, 17, 301, 42, 7], [100, 3, 3, 250, 11, 64, 9]]
GREEDY = SamplingConfig(temperature=0.0, max_tokens=10)


def perturbed(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(7)  # same on every rank
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std().clamp_min(0.1))
    return model


def main(model_dir):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    engine = RolloutEngine(model_dir, EngineConfig(dtype="float32", max_model_len=256, cpu_kv_cache_gib=1))
    assert engine.external_launcher, "under torchrun the engine must use vLLM's external_launcher"
    before = [g[0].token_ids for g in engine.generate(PROMPTS, sampling=GREEDY)]

    reference = perturbed(model_dir)
    expected = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY.max_tokens,
                                 do_sample=False, eos_token_id=0, pad_token_id=0)
        expected.append(tuple(out[0, len(p):].tolist()))
    assert before != expected, "the perturbation must change greedy output"

    sharded = perturbed(model_dir)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    from torch.distributed.tensor import DTensor

    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    stats = sync_weights(engine, sharded, bucket_bytes=64 << 10)
    assert stats.fast_tensors == stats.tensors > 0 and stats.version == 1

    after = [g[0].token_ids for g in engine.generate(PROMPTS, sampling=GREEDY)]
    assert after == expected, f"rank {rank}: engine {after} != transformers {expected}"
    report = check_parity(engine, reference, PROMPTS, raise_above=1e-3)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (after, report.max_abs_diff))
    assert all(o[0] == expected for o in everyone), everyone
    print(f"rank {rank} ok: version {engine.weight_version}, parity max {report.max_abs_diff:.2e}", flush=True)
    dist.barrier()
    engine.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
