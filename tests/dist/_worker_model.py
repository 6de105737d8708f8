"""torchrun worker for tests/dist/test_model_dist.py (2 ranks, gloo, fp32 tiny Qwen):

  dp: FSDP2 over dp=2, each rank its own packed batch, gives the gradients of one process on both batches.
  sp: ring (zigzag) and Ulysses attention over sp=2 on one packed batch give the gradients of one process.

    torchrun --standalone --nproc_per_node=2 tests/dist/_worker_model.py dp|sp
"""

import functools
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from qlfast.model import QwenForCausalLM
from qlfast.ops.linear_logprob import linear_logprob
from qlfast.parallel.fsdp import apply_fsdp, full_grads
from qlfast.testing import rel_err

CFG = dict(model_type="qwen3", vocab_size=257, hidden_size=128, intermediate_size=160, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
           tie_word_embeddings=False)


def _model(**opts):
    m = QwenForCausalLM.from_config(CFG, seed=0)
    with torch.no_grad():  # non-trivial norms so that their gradients are checked too
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.linspace(-0.2, 0.2, p.numel()).view_as(p))
    m.set_options(attn_backend="torch", **opts)
    return m


def _batch(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    ids = torch.randint(0, CFG["vocab_size"], (t,), generator=gen)
    targets = torch.randint(0, CFG["vocab_size"], (t,), generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return ids, targets, cu


def _loss(model, ids, targets, cu, pos=None, weight=1.0):
    h = model(ids, pos, cu)
    return linear_logprob(h, model.lm_head_weight, targets, backend="torch").sum() * weight


def _compare(got: dict, ref: dict, tag: str):
    assert set(got) == set(ref), (set(got) ^ set(ref))
    for n in ref:
        err = rel_err(got[n], ref[n])
        assert err < 2e-5, f"{tag} {n}: rel err {err:.2e}"


def run_dp():
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))  # FSDP2 over every rank
    rank = dist.get_rank()
    batches = [_batch([45, 19, 60], seed=10), _batch([7, 90], seed=11)]
    # one process, both batches, loss = mean over the dp ranks' losses (FSDP averages gradients over dp)
    ref = _model()
    sum(_loss(ref, *b, weight=0.5) for b in batches).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    model = apply_fsdp(_model(checkpoint=True, tiled_mlp=True, mlp_tile_tokens=32), mesh)
    _loss(model, *batches[rank]).backward()
    _compare(full_grads(model), ref_grads, "dp=2 FSDP2")


def run_sp():
    from qlfast.parallel import contiguous_plan, ring_attention, shard, ulysses_attention, zigzag_plan

    group = dist.group.WORLD  # sp = the two ranks
    w, r = dist.get_world_size(group), dist.get_rank(group)
    ids, targets, cu = _batch([45, 3, 80], seed=12)
    ref = _model()
    _loss(ref, ids, targets, cu).backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    for kind in ("ring", "ulysses"):
        if kind == "ring":
            plan = zigzag_plan(cu, w, r, group=group)
            attn = functools.partial(ring_attention, group=group, backend="torch", check=False)
            cu_model, max_model = plan.cu_seqlens_local, plan.max_seqlen_local
        else:
            plan = contiguous_plan(cu, w, r, group=group)
            # Ulysses attends over the global packing: ignore the local one the model passes
            attn = lambda q, k, v, _cu, _max, p=plan: ulysses_attention(q, k, v, p.cu_seqlens, p.max_seqlen,
                                                                      group=group, backend="torch", check=False)
            cu_model, max_model = plan.cu_seqlens_local, plan.max_seqlen_local
        model = _model(checkpoint=True, offload=True, attention_fn=attn)
        t_loc = shard(targets, plan, pad_value=-100)
        t_loc = torch.where(plan.valid, t_loc, -100)
        h = model(shard(ids, plan), plan.position_ids, cu_model, max_model)
        linear_logprob(h, model.lm_head_weight, t_loc, backend="torch").sum().backward()
        grads = {}
        for n, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g, group=group)  # each rank holds its tokens' share of the gradient
            grads[n] = g
        _compare(grads, ref_grads, f"sp=2 {kind}")


if __name__ == "__main__":
    dist.init_process_group("gloo")  # torchrun's environment
    {"dp": run_dp, "sp": run_sp}[sys.argv[1]]()
    dist.barrier()
    if dist.get_rank() == 0:
        print("OK", sys.argv[1])
    dist.destroy_process_group()
