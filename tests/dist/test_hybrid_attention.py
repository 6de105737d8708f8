"""Hybrid sequence parallelism (qlfast.parallel.hybrid): the plan's layout (single process: after the Ulysses
all-to-all, which concatenates a group's pieces in rank order, each group holds its ring rank's zigzag packing), and
under torchrun (gloo on CPU, 4 ranks) outputs and dq, dk, dv equal single-process attention for U x R = 2 x 2, 1 x 4
and 4 x 1, with bad configurations raising on every rank. The distributed assertions run inside
tests/dist/_worker_hybrid.py on every rank."""

from pathlib import Path

import pytest
import torch

from qlfast.parallel import hybrid_plan, shard, unshard, zigzag_plan
from qlfast.testing import run_torchrun

WORKER = str(Path(__file__).resolve().parent / "_worker_hybrid.py")
LENS = [37, 130, 64, 5, 1]


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize(("u", "r"), [(2, 2), (4, 1), (1, 4), (3, 1), (3, 2), (2, 3)])
def test_hybrid_plan_layout(u, r):
    cu, w = _cu(LENS), u * r
    x = torch.randn(sum(LENS), 3, 5)
    plans = [hybrid_plan(cu, u, r, j) for j in range(w)]
    pieces = [shard(x, p, pad_value=float("nan")) for p in plans]
    assert torch.equal(unshard(pieces, plans[0]), x)
    for ring_rank in range(r):
        zz = zigzag_plan(cu, r, ring_rank)
        group = plans[ring_rank * u:(ring_rank + 1) * u]
        assert [(p.ring_rank, p.ulysses_rank) for p in group] == [(ring_rank, i) for i in range(u)]
        # what the all-to-all hands the ring: the zigzag packing of ring rank r, then one even pad sequence
        got = torch.cat([p.index for p in group])
        tail = got.numel() - zz.local_tokens
        assert tail % 2 == 0 and 0 <= tail < 2 * u and got.numel() % u == 0
        assert torch.equal(got[:zz.local_tokens], zz.index) and (got[zz.local_tokens:] == -1).all()
        want_cu = zz.cu_seqlens_local.tolist() + ([zz.local_tokens + tail] if tail else [])
        for p in group:
            assert p.cu_seqlens_local.tolist() == want_cu and p.cu_seqlens_local.dtype == torch.int32
            assert p.max_seqlen_local == max(zz.max_seqlen_local, tail)
        pos = torch.cat([p.position_ids for p in group])
        assert torch.equal(pos[:zz.local_tokens], zz.position_ids)
        assert pos[zz.local_tokens:].tolist() == list(range(tail))
    held = torch.cat([p.index[p.valid] for p in plans]).sort().values
    assert torch.equal(held, torch.arange(sum(LENS)))  # every real token exactly once


def test_hybrid_plan_errors():
    with pytest.raises(ValueError, match="0 <= rank < U x R"):
        hybrid_plan([0, 8], 2, 2, 4)
    with pytest.raises(ValueError, match="ulysses_size U >= 1"):
        hybrid_plan([0, 8], 0, 2, 0)
    with pytest.raises(ValueError, match=r"hybrid_plan: zigzag_plan\(pad=False\).*ring size R=2"):
        hybrid_plan([0, 5], 2, 2, 0, pad=False)


@pytest.mark.dist
def test_hybrid_attention_matches_single_process():
    out = run_torchrun(WORKER, nproc=4, timeout=300)
    assert "hybrid worker OK (W=4)" in out
