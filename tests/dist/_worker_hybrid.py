"""torchrun worker for tests/dist/test_hybrid_attention.py: hybrid (Ulysses x ring) attention, outputs and dq, dk,
dv, equal single-process attention on the gathered packed batch, for U x R = 2 x 2, 1 x 4 and 4 x 1 on 4 ranks. Every
rank builds the same full batch from one seed, runs its shard, and asserts on the gathered result; gloo on CPU,
torch attention backend. Bad configurations raise ValueError on every rank.

    torchrun --standalone --nproc_per_node=4 tests/dist/_worker_hybrid.py
"""

import os

import torch
import torch.distributed as dist

# the batch, the float64 reference and the comparison are the ring / Ulysses worker's (this directory is on sys.path)
from _worker_sp_attention import _batch, _check, _cu, _expect_error

from qlfast.parallel import gather_unshard, hybrid_attention, hybrid_groups, hybrid_plan, shard

LENS = [37, 130, 64, 5]  # 5 < 2W; with U=4 the ring-local packing needs a pad sequence


def run_hybrid(groups, u, lens, hq, hkv, d, dtype, causal, seed):
    uly, ring = groups
    w, j = dist.get_world_size(), dist.get_rank()
    assert j == dist.get_rank(ring) * u + dist.get_rank(uly), "hybrid_groups: sp rank != ring_rank * U + uly_rank"
    q, k, v, dout = _batch(lens, hq, hkv, d, dtype, seed)
    cu = _cu(lens)
    plan = hybrid_plan(cu, u, w // u, j, pad=causal, group=dist.group.WORLD)
    ql, kl, vl = (shard(x, plan).requires_grad_() for x in (q, k, v))
    out = hybrid_attention(ql, kl, vl, plan.cu_seqlens_local, plan.max_seqlen_local, ulysses_group=uly,
                           ring_group=ring, causal=causal, backend="torch")
    assert out.shape == ql.shape and out.dtype == dtype
    out.backward(shard(dout, plan))  # zero gradient at pad positions, as a loss masked with plan.valid gives
    got = [gather_unshard(x.detach(), plan) for x in (out, ql.grad, kl.grad, vl.grad)]
    _check(f"hybrid U={u} R={w // u} {dtype} causal={causal} lens={lens} Hq={hq} Hkv={hkv}", got, q, k, v, dout,
           cu, causal)


def run_errors(groups):
    uly, ring = groups  # U = 2, R = 2
    w, j = dist.get_world_size(), dist.get_rank()
    _expect_error(lambda: hybrid_groups(3), "must be >= 1 and divide")
    _expect_error(lambda: hybrid_plan([0, 5], 2, 2, j, pad=False, group=dist.group.WORLD), "pad=False")
    _expect_error(lambda: hybrid_plan([0, 8], 2, 2, w), "0 <= rank < U x R")
    x = torch.randn(8, 4, 64)

    def attn(q, cu, max_len=8, kv=x):
        return hybrid_attention(q, kv, kv, cu, max_len, ulysses_group=uly, ring_group=ring, backend="torch")

    _expect_error(lambda: attn(torch.randn(8, 3, 64), _cu([16]), kv=torch.randn(8, 1, 64)), "must be divisible by")
    _expect_error(lambda: attn(x, _cu([8])), "U x T_local = 2 x 8")  # the rank's own packing, not the group's
    # the same packing inside each Ulysses group, a different one in the other group: caught by the ring check
    _expect_error(lambda: attn(x, _cu([2, 6, 8] if j < 2 else [8, 8])), "differs across the ranks")
    # one rank's bad input: it raises its own message, the other three raise too instead of waiting in a collective
    bad = _cu([3, 13]) if j == 3 else _cu([4, 4, 8])
    _expect_error(lambda: attn(x, bad), "even steps" if j == 3 else "rejected their inputs")


def main():
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    w = dist.get_world_size()
    assert w == 4, "written for 4 ranks (U x R = 2 x 2, 1 x 4, 4 x 1)"
    g22 = hybrid_groups(2)
    run_hybrid(g22, 2, LENS, 4, 2, 64, torch.float64, True, seed=1)  # GQA, U divides Hkv
    run_hybrid(g22, 2, LENS, 4, 1, 64, torch.float32, True, seed=2)  # U > Hkv: kv heads replicated
    run_hybrid(g22, 2, [8, 20, 4], 2, 2, 64, torch.float64, False, seed=3)  # non-causal: lengths multiples of 2R
    run_hybrid(hybrid_groups(1), 1, LENS, 2, 1, 64, torch.float64, True, seed=4)  # pure ring
    run_hybrid(hybrid_groups(4), 4, LENS, 8, 2, 64, torch.float64, True, seed=5)  # pure Ulysses, pad sequence
    run_errors(g22)
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"hybrid worker OK (W={w})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
