"""torchrun worker for tests/dist/test_sp_attention.py: ring and Ulysses attention (outputs and dq, dk, dv) equal
single-process attention on the gathered packed batch. Every rank builds the same full batch from one seed, runs
its shard, and asserts on the gathered result; gloo on CPU, torch attention backend.

    torchrun --standalone --nproc_per_node=2 tests/dist/_worker_sp_attention.py
"""

import os
import sys

import torch
import torch.distributed as dist

from qlfast.parallel import contiguous_plan, gather_unshard, ring_attention, shard, ulysses_attention, zigzag_plan
from qlfast.ref.attention import naive_attention
from qlfast.testing import assert_close_vs_ref, rel_err


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def _batch(lens, hq, hkv, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    t = sum(lens)
    q, k, v, dout = (torch.randn(t, h, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
    return q.to(dtype), k.to(dtype), v.to(dtype), dout.to(dtype)


def _reference(q, k, v, dout, cu, causal, upcast):
    """Single-process attention by autograd -> (out, dq, dk, dv); upcast=False is the same-dtype eager baseline."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, _ = naive_attention(q, k, v, cu, cu, causal=causal, upcast=upcast)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check(tag, got, q, k, v, dout, cu, causal):
    ref = _reference(q.double(), k.double(), v.double(), dout.double(), cu, causal, upcast=True)
    names = ("out", "dq", "dk", "dv")
    if q.dtype == torch.float64:
        for name, g, r in zip(names, got, ref):
            err = rel_err(g, r)
            assert err < 1e-12, f"{tag} {name}: fp64 rel err {err:.3e}"
    else:
        eager = _reference(q, k, v, dout, cu, causal, upcast=False)
        for name, g, r, e in zip(names, got, ref, eager):
            assert_close_vs_ref(f"{tag} {name}", g, r, e, mult=4.0)


def run_ring(lens, hq, hkv, d, dtype, causal, seed):
    w, r = dist.get_world_size(), dist.get_rank()
    q, k, v, dout = _batch(lens, hq, hkv, d, dtype, seed)
    cu = _cu(lens)
    plan = zigzag_plan(cu, w, r, pad=causal, group=dist.group.WORLD)
    ql, kl, vl = (shard(x, plan).requires_grad_() for x in (q, k, v))
    out = ring_attention(ql, kl, vl, plan.cu_seqlens_local, plan.max_seqlen_local, causal=causal, backend="torch")
    assert out.shape == ql.shape and out.dtype == dtype
    out.backward(shard(dout, plan))  # zero gradient at pad positions, as a loss masked with plan.valid gives
    got = [gather_unshard(x.detach(), plan) for x in (out, ql.grad, kl.grad, vl.grad)]
    _check(f"ring W={w} {dtype} causal={causal} lens={lens} Hq={hq} Hkv={hkv}", got, q, k, v, dout, cu, causal)


def run_ulysses(lens, hq, hkv, d, dtype, causal, seed):
    w, r = dist.get_world_size(), dist.get_rank()
    q, k, v, dout = _batch(lens, hq, hkv, d, dtype, seed)
    cu = _cu(lens)
    plan = contiguous_plan(cu, w, r, group=dist.group.WORLD)
    ql, kl, vl = (shard(x, plan).requires_grad_() for x in (q, k, v))
    out = ulysses_attention(ql, kl, vl, plan.cu_seqlens, plan.max_seqlen, causal=causal, backend="torch")
    assert out.shape == ql.shape and out.dtype == dtype
    out.backward(shard(dout, plan))
    got = [gather_unshard(x.detach(), plan) for x in (out, ql.grad, kl.grad, vl.grad)]
    _check(f"ulysses W={w} {dtype} causal={causal} lens={lens} Hq={hq} Hkv={hkv}", got, q, k, v, dout, cu, causal)


def _expect_error(fn, match):
    try:
        fn()
    except ValueError as e:
        assert match in str(e), f"expected an error containing {match!r}, got {e}"
        return
    raise AssertionError(f"expected ValueError containing {match!r}")


def run_errors():
    w, r = dist.get_world_size(), dist.get_rank()
    # each rank passes a different packing: caught by the all_gathered hash, on every rank
    _expect_error(lambda: zigzag_plan([0, 8 * (r + 1)], w, r, group=dist.group.WORLD), "differs across the ranks")
    _expect_error(lambda: contiguous_plan([0, 5 + r], w, r, group=dist.group.WORLD), "differs across the ranks")
    x = torch.randn(8, 2, 64)
    cu_local = torch.tensor([0, 2 + 2 * (r % 2), 8], dtype=torch.int32)  # valid locally, differs
    _expect_error(lambda: ring_attention(x, x, x, cu_local, 6, backend="torch"), "differs across the ranks")
    _expect_error(lambda: ring_attention(x[:7], x[:7], x[:7], cu_local, 6), "even lengths")
    # one rank's bad input: it raises its own message, the others raise too instead of waiting in a collective
    cu_bad = torch.tensor([0, 3 if r == 1 else 4, 8], dtype=torch.int32)
    _expect_error(lambda: ring_attention(x, x, x, cu_bad, 6), "even steps" if r == 1 else "rejected their inputs")
    q3 = torch.randn(4, 3, 64)
    _expect_error(lambda: ulysses_attention(q3, q3, q3, _cu([4 * w]), 4 * w), "must be divisible by")
    _expect_error(lambda: ulysses_attention(x, x, x, _cu([7]), 7), "covers T=7 tokens")


def main():
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    w = dist.get_world_size()
    lens = [37, 130, 64]
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    if which in ("all", "ring"):
        run_ring(lens, 4, 2, 64, torch.float64, True, seed=1)
        run_ring(lens, 4, 1, 64, torch.float32, True, seed=2)
        run_ring([1, 2 * w + 3], 2, 2, 64, torch.float64, True, seed=3)  # shorter than 2W: padded
        run_ring([4 * w, 6 * w], 2, 1, 64, torch.float64, False, seed=4)  # non-causal: lengths multiples of 2W
    if which in ("all", "ulysses"):
        run_ulysses(lens, 4, 2, 64, torch.float64, True, seed=5)
        run_ulysses(lens, 4, 1, 64, torch.float32, True, seed=6)  # W > Hkv: kv heads replicated
        run_ulysses([17, 50], 2 * w, 2 * w, 64, torch.float64, False, seed=7)
    if which in ("all", "errors"):
        run_errors()
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"sp_attention worker OK (W={w}, {which})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
