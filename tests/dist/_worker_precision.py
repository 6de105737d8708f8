"""fp32 master weights under bf16 compute, through the trainer's own policy update at the recipe's lr 2e-6.

One RL update (rl_step.policy_update, AdamW from optim.adamw) from the same fp32 initial weights in four precisions:
fp32, bf16 compute with fp32 masters ("mixed"), pure bf16, and float64 (the reference gradient). Checks (`check`):
  1. the mixed run changes >= 99% of the master elements that have a nonzero gradient (pure bf16: a few percent);
  2. its gradient (on the masters, fp32) is the float64 gradient to bf16 accuracy: no worse than 4x pure bf16's error;
  3. its update is AdamW's first step computed in float64 from that gradient, to 2 fp32 roundings (of the weight and
     of the step): the master path loses nothing;
  4. its update equals the fp32 run's wherever bf16 resolves the gradient's sign (|g_bf16 - g_fp32| < |g_fp32|, at
     least 99% of the elements), there to 4 bf16 epsilons (AdamW's first step is about lr * sign(g), so elsewhere an
     unresolved sign flips the element's step; those elements carry the smallest gradients).

Imported by tests/test_precision.py (one process, replicated) and run under torchrun for 2 ranks (gloo), where each
rank trains on its own groups, replicated (masters all-reduced) and FSDP2 (MixedPrecisionPolicy, fp32 shards):

    torchrun --standalone --nproc_per_node=2 tests/dist/_worker_precision.py
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from qlfast.config import RLConfig
from qlfast.model import QwenForCausalLM
from qlfast.testing import assert_close_vs_ref, rel_err
from qlfast.trainer import optim, precision
from qlfast.trainer.comm import Env
from qlfast.trainer.rl_step import Group, policy_update

CFG = dict(model_type="qwen2", vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024, tie_word_embeddings=True)
LR = 2e-6
RL = RLConfig(lr=LR, warmup_steps=0, batch_size=8, mini_batch_size=8, weight_decay=0.0)


def groups(rank: int, n: int = 4) -> list[Group]:
    rng = random.Random(1000 + rank)
    out = []
    for i in range(n):
        prompt = [rng.randrange(CFG["vocab_size"]) for _ in range(rng.randint(20, 40))]
        resps = [[rng.randrange(CFG["vocab_size"]) for _ in range(rng.randint(5, 20))] for _ in range(4)]
        out.append(Group(index=i, uid=f"{rank}/{i}", source="s", prompt_ids=prompt, responses=resps,
                         rollout_logprobs=[[-5.8 + 0.1 * rng.random() for _ in r] for r in resps],
                         rewards=[0.0] * 4, shaped=[0.0] * 4, finish=["stop"] * 4, weight_version=0,
                         advantages=[rng.gauss(0, 1) for _ in range(4)]))
    return out


@dataclass
class Run:
    before: torch.Tensor  # flat weights the optimizer steps (masters when mixed), float64, full
    delta: torch.Tensor  # flat update, float64
    grad: torch.Tensor  # flat gradient the optimizer saw (after clipping), in its own dtype
    metrics: dict


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _flat(ts, dtype=None) -> torch.Tensor:
    return torch.cat([_full(t).reshape(-1).to(dtype or t.dtype) for t in ts])


def run(compute: torch.dtype, master: torch.dtype, env: Env, my_groups: list[Group]) -> Run:
    """One policy update of the tiny model (fp32 init, seed 0) with masters in `master`, compute in `compute`."""
    model = QwenForCausalLM.from_config(CFG, seed=0).to(master)
    model.set_options(attn_backend="sdpa")
    if env.fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        from qlfast.parallel.fsdp import apply_fsdp

        mesh = init_device_mesh("cpu", (env.world,))
        apply_fsdp(model, mesh, param_dtype=None if compute == master else compute)
    else:
        precision.attach(model, compute)
    params = precision.trainable(model)
    before = _flat(params, torch.float64)
    opt = optim.adamw(model, LR, RL.weight_decay)
    sched = optim.schedule(opt, RL.warmup_steps)
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update(grad=_flat([p.grad for p in params])))
    metrics = policy_update(model, opt, sched, my_groups, env, rl=RL, mini_batches=1, max_response_tokens=32,
                            backend="torch")
    assert metrics["finite"], metrics
    return Run(before, _flat(params, torch.float64) - before, seen["grad"], metrics)


def check(f32: Run, mixed: Run, pure: Run, f64: Run, tag: str) -> dict:
    nz = mixed.grad != 0
    changed = float(((mixed.delta != 0) & nz).sum() / nz.sum())
    pure_nz = pure.grad != 0
    pure_changed = float(((pure.delta != 0) & pure_nz).sum() / pure_nz.sum())
    assert changed >= 0.99, f"{tag}: only {100 * changed:.2f}% of the masters with a gradient changed"
    assert pure_changed < 0.5, f"{tag}: pure bf16 changed {100 * pure_changed:.1f}%: the case shows nothing"

    assert mixed.grad.dtype == torch.float32, mixed.grad.dtype
    assert_close_vs_ref(f"{tag} master gradient", mixed.grad, f64.grad, pure.grad, mult=4.0)

    # AdamW's first step (bias-corrected m = g, v = g^2; no weight decay): -lr g / (|g| + eps), here in float64
    g = mixed.grad.double()
    step = -LR * g / (g.abs() + 1e-8)
    # fp32 rounding: of the step's few ops (relative to the step) and of the add (relative to the weight)
    ulp = torch.finfo(torch.float32).eps * (torch.maximum(mixed.before.abs(), (mixed.before + mixed.delta).abs())
                                            + step.abs())
    worst = float(((mixed.delta - step).abs() / ulp.clamp_min(1e-30)).max())
    assert worst <= 2.0, f"{tag}: the master update is {worst:.2f} fp32 ulps from AdamW's step on its gradient"

    gf = f32.grad.double()
    resolved = (g - gf).abs() < gf.abs()
    share = float(resolved.double().mean())
    err = rel_err(mixed.delta[resolved], f32.delta[resolved])
    bound = 4 * torch.finfo(torch.bfloat16).eps
    assert share >= 0.99, f"{tag}: bf16 resolves the gradient's sign on only {100 * share:.2f}% of the elements"
    assert err <= bound, f"{tag}: update differs from fp32's by {err:.3e} (> {bound:.3e}) where the sign is resolved"
    return {"changed": changed, "pure_changed": pure_changed, "grad_err": rel_err(mixed.grad, f64.grad),
            "pure_grad_err": rel_err(pure.grad, f64.grad), "adam_ulps": worst, "resolved": share,
            "update_err_resolved": err, "update_err_all": rel_err(mixed.delta, f32.delta),
            "pure_update_err_all": rel_err(pure.delta, f32.delta)}


def case(env: Env, my_groups: list[Group], tag: str) -> dict:
    ref_env = Env(env.rank, env.world, env.local_rank, env.device)  # float64 reference: replicated, all-reduced
    return check(run(torch.float32, torch.float32, env, my_groups), run(torch.bfloat16, torch.float32, env, my_groups),
                 run(torch.bfloat16, torch.bfloat16, env, my_groups),
                 run(torch.float64, torch.float64, ref_env, my_groups), tag)


if __name__ == "__main__":
    import os

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mine = groups(rank, n=2 + rank)  # uneven shares, as after rollouts
    for fsdp in (False, True):
        tag = f"{'FSDP2' if fsdp else 'replicated'} x{world}"
        numbers = case(Env(rank, world, rank, torch.device("cpu"), fsdp=fsdp), mine, tag)
        if rank == 0:
            print(tag, " ".join(f"{k}={v:.4g}" for k, v in numbers.items()), flush=True)
    dist.barrier()
    if rank == 0:
        print("OK precision")
    dist.destroy_process_group()
