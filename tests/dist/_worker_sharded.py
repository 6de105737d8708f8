"""torchrun worker for tests/dist/test_sharded_load.py (2 ranks, gloo):

  load <big> <small>: a checkpoint of a few hundred MB loaded straight into FSDP2 shards (meta build, apply_fsdp,
      load_sharded): each rank's RSS grows by about (model / world + the largest tensor), not the model; the sharded
      model's weights are the file's and its outputs the unsharded model's. <small> (bf16 on disk, odd vocabulary: an
      uneven shard) loads into fp32 masters exactly.
  reference <policy> <reference>: the KL-penalised policy update with the reference FSDP2-sharded like the policy
      (both loaded shard by shard) gives the replicated run's gradients and KL; one reference pass per policy pass.

    torchrun --standalone --nproc_per_node=2 tests/dist/_worker_sharded.py load BIG_DIR SMALL_DIR
"""

import json
import random
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from qlfast.model import ModelOptions, QwenForCausalLM
from qlfast.model.config import load_config
from qlfast.parallel.fsdp import full_state_dict
from qlfast.testing import rel_err


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _reset_peak() -> int:
    """RSS now, with the high-water mark reset to it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS:")


def _sharded(path, mesh, dtype=torch.float32, param_dtype=None):
    """The trainer's way: a meta model, then comm.shard_model(weights=path) (apply_fsdp + load_sharded)."""
    from qlfast.trainer import comm

    with torch.device("meta"):
        model = QwenForCausalLM(load_config(path), ModelOptions(attn_backend="sdpa")).to(dtype)
    env = comm.Env(dist.get_rank(), dist.get_world_size(), dist.get_rank(), torch.device("cpu"), fsdp=True)
    return comm.shard_model(model, env, param_dtype=param_dtype, weights=path)


def _file_tensors(path) -> dict:
    from safetensors.torch import load_file

    from qlfast.model.io import weight_files

    return {k: v for f in sorted(set(weight_files(path).values())) for k, v in load_file(f).items()}


def run_load(big: str, small: str):
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    files = _file_tensors(big) if rank == 0 else None  # sizes only (then dropped)
    sizes = dist_broadcast(None if files is None else {k: v.numel() * v.element_size() for k, v in files.items()})
    del files
    total, largest = sum(sizes.values()), max(sizes.values())

    # warm up on the small checkpoint: the code the load runs (imports, FSDP2, safetensors) is RSS too
    _sharded(small, mesh)
    base = _reset_peak()
    model = _sharded(big, mesh)
    sharded_peak = _status("VmHWM:") - base
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())

    base = _reset_peak()
    full = QwenForCausalLM.from_pretrained(big, options=ModelOptions(attn_backend="sdpa"))  # the old way's first half
    full_peak = _status("VmHWM:") - base
    mib = 2**20
    print(f"rank {rank}: model {total / mib:.0f} MiB, largest tensor {largest / mib:.0f} MiB, local shards "
          f"{local / mib:.0f} MiB; RSS growth loading sharded {sharded_peak / mib:.0f} MiB (bound model / world + "
          f"largest = {(total / world + largest) / mib:.0f} MiB), loading whole {full_peak / mib:.0f} MiB", flush=True)
    assert local <= total / world + 2 * largest / world
    assert total / world <= sharded_peak <= total / world + largest + 16 * mib, (sharded_peak, total, largest)
    assert sharded_peak < 0.8 * full_peak

    # the shards hold the file's tensors, and the sharded model computes what the whole one does
    for name, p in model.named_parameters():
        assert torch.equal(p.full_tensor(), dict(full.named_parameters())[name]), name
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, full.config.vocab_size, (37,), generator=gen)
    cu = torch.tensor([0, 20, 37], dtype=torch.int32)
    with torch.no_grad():
        got, want = model(ids, None, cu), full(ids, None, cu)
    err = rel_err(got, want)
    assert err < 1e-6, err
    print(f"rank {rank}: sharded vs whole outputs rel err {err:.1e}", flush=True)
    del model, full

    # bf16 on disk, odd vocabulary (uneven shards), into fp32 masters: the exact upcast
    small_model = _sharded(small, mesh, param_dtype=torch.bfloat16)
    disk = _file_tensors(small)
    sd = full_state_dict(small_model, masters=True)  # on rank 0 only
    for name, t in disk.items() if rank == 0 else ():
        assert t.dtype == torch.bfloat16 and sd[name].dtype == torch.float32, name
        assert torch.equal(sd[name], t.float()), name
    assert small_model.model.rotary_emb.inv_freq.dtype == torch.float32


def dist_broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _groups(rank: int, vocab: int):
    from qlfast.trainer.rl_step import Group

    rng = random.Random(rank)
    out = []
    for i in range(2 + rank):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(8, 20))]
        resps = [[rng.randrange(vocab) for _ in range(rng.randint(2, 10))] for _ in range(3)]
        out.append(Group(index=i, uid=f"{rank}/{i}", source="s", prompt_ids=prompt, responses=resps,
                         rollout_logprobs=[[-4.5] * len(r) for r in resps], rewards=[0.0] * 3, shaped=[0.0] * 3,
                         finish=["stop"] * 3, weight_version=0, advantages=[rng.gauss(0, 1) for _ in range(3)]))
    return out


def _full_grad(p):
    return (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()


def run_reference(policy_dir: str, ref_dir: str):
    from qlfast.config import Config
    from qlfast.trainer import optim, reference
    from qlfast.trainer.comm import Env
    from qlfast.trainer.rl_step import policy_update

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = Config()
    cfg.rl.kl_coef, cfg.rl.kl_type, cfg.rl.micro_batch_tokens = 0.3, "k3", 48
    groups = _groups(rank, load_config(policy_dir).vocab_size)
    results = {}
    for fsdp in (False, True):
        env = Env(rank, world, rank, torch.device("cpu"), fsdp=fsdp)
        if fsdp:
            policy = _sharded(policy_dir, init_device_mesh("cpu", (world,)))
        else:
            policy = QwenForCausalLM.from_pretrained(policy_dir, options=ModelOptions(attn_backend="sdpa"))
        ref = reference.load(ref_dir, policy, cfg, env)
        assert all(not p.requires_grad for p in ref.parameters())
        assert fsdp == hasattr(next(ref.parameters()), "full_tensor")
        calls = {"policy": [], "ref": []}
        policy.register_forward_pre_hook(lambda *a, c=calls["policy"]: c.append(1))
        ref.register_forward_pre_hook(lambda *a, c=calls["ref"]: c.append(1))
        opt = torch.optim.SGD(list(policy.parameters()), lr=0.0)
        seen = {}
        opt.register_step_pre_hook(lambda o, a, k, seen=seen: seen.update(g=[_full_grad(p) for p in
                                                                              o.param_groups[0]["params"]]))
        m = policy_update(policy, opt, optim.schedule(opt, 0), groups, env, rl=cfg.rl, mini_batches=1,
                          max_response_tokens=16, backend="torch", reference=ref)
        assert len(calls["ref"]) == len(calls["policy"]) >= 2, calls
        results[fsdp] = (m, seen["g"])
    (m_rep, g_rep), (m_fsdp, g_fsdp) = results[False], results[True]
    assert m_rep["kl_loss"] > 1e-4, m_rep
    for key in ("kl_loss", "policy_loss"):
        assert abs(m_rep[key] - m_fsdp[key]) <= 1e-5 * abs(m_rep[key]), (key, m_rep[key], m_fsdp[key])
    worst = max(rel_err(a, b) for a, b in zip(g_fsdp, g_rep))
    assert worst < 1e-5, worst
    print(f"rank {rank}: KL {m_rep['kl_loss']:.4g}; FSDP2 reference vs replicated gradient rel err {worst:.1e}",
          flush=True)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    {"load": run_load, "reference": run_reference}[sys.argv[1]](*sys.argv[2:])
    dist.barrier()
    if dist.get_rank() == 0:
        print("OK", sys.argv[1], json.dumps(sys.argv[2:]))
    dist.destroy_process_group()
