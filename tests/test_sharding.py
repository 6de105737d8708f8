"""Sharding packed batches for sequence parallelism (qlfast.parallel.sharding): zigzag and contiguous plans, round
trips, local cu_seqlens, padding, and the errors. Single process: every rank's plan is built here."""

import pytest
import torch

from qlfast.parallel.ring import _halves
from qlfast.parallel.sharding import check_ulysses_heads, contiguous_plan, shard, unshard, zigzag_plan

LENS = [37, 130, 64, 1]


def _cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zigzag_round_trip_and_layout(world):
    cu = _cu(LENS)
    t = sum(LENS)
    x = torch.randn(t, 3, 5)
    plans = [zigzag_plan(cu, world, r) for r in range(world)]
    pieces = [shard(x, p, pad_value=float("nan")) for p in plans]
    assert torch.equal(unshard(pieces, plans[0]), x)
    n_chunks = 2 * world
    padded = [-(-n // n_chunks) * n_chunks for n in LENS]
    assert plans[0].padded_seqlens == tuple(padded)
    local = [n // world for n in padded]
    for r, (p, piece) in enumerate(zip(plans, pieces)):
        assert p.cu_seqlens_local.tolist() == _cu(local).tolist()
        assert p.max_seqlen_local == max(local)
        assert p.cu_seqlens_local.dtype == torch.int32
        assert piece.shape == (sum(local), 3, 5)
        # pad positions carry pad_value, real ones the original tokens; positions follow chunks r and 2W-1-r
        assert torch.isnan(piece[~p.valid]).all() and not torch.isnan(piece[p.valid]).any()
        off, starts = 0, [0, *torch.tensor(LENS).cumsum(0).tolist()[:-1]]
        for s, npad in enumerate(padded):
            c = npad // n_chunks
            want = list(range(r * c, (r + 1) * c)) + list(range((n_chunks - 1 - r) * c, (n_chunks - r) * c))
            assert p.position_ids[off:off + 2 * c].tolist() == want
            got_idx = p.index[off:off + 2 * c].tolist()
            assert got_idx == [starts[s] + w if w < LENS[s] else -1 for w in want]
            off += 2 * c
    # every real token is held exactly once across the ranks
    held = torch.cat([p.index[p.valid] for p in plans]).sort().values
    assert torch.equal(held, torch.arange(t))


def test_zigzag_halves_match_chunks():
    """ring.py's first/second-half rows are exactly the chunk r / chunk 2W-1-r tokens of every sequence."""
    world = 3
    cu = _cu(LENS)
    for r in range(world):
        p = zigzag_plan(cu, world, r)
        cu_half, first, second = _halves(p.cu_seqlens_local, p.local_tokens)
        assert cu_half.tolist() == [c // 2 for c in p.cu_seqlens_local.tolist()]
        pos = p.position_ids
        c = torch.tensor([n // (2 * world) for n in p.padded_seqlens])
        seq_first = torch.repeat_interleave(torch.arange(len(LENS)), c)
        assert torch.equal(pos[first] // c[seq_first], torch.full_like(first, r))
        assert torch.equal(pos[second] // c[seq_first], torch.full_like(second, 2 * world - 1 - r))


def test_zigzag_pad_false_errors():
    with pytest.raises(ValueError, match=r"sequence 0 has 37 tokens, not a multiple of 2W = 4"):
        zigzag_plan(_cu(LENS), 2, 0, pad=False)
    with pytest.raises(ValueError, match=r"shorter than 2W"):
        zigzag_plan(_cu([8, 3]), 2, 0, pad=False)
    p = zigzag_plan(_cu([8, 12]), 2, 1, pad=False)
    assert p.valid.all() and p.cu_seqlens_local.tolist() == [0, 4, 10]


def test_short_sequence_is_padded():
    """A 1-token sequence with W=4 becomes 8 tokens (7 of them padding): one real token on rank 0 only."""
    plans = [zigzag_plan([0, 1], 4, r) for r in range(4)]
    assert plans[0].padded_seqlens == (8,)
    assert [int(p.valid.sum()) for p in plans] == [1, 0, 0, 0]


@pytest.mark.parametrize("world", [1, 2, 4, 5])
def test_contiguous_round_trip(world):
    cu = _cu(LENS)
    t = sum(LENS)
    x = torch.randn(t, 4)
    plans = [contiguous_plan(cu, world, r) for r in range(world)]
    pieces = [shard(x, p, pad_value=-7.0) for p in plans]
    assert torch.equal(unshard(torch.stack(pieces), plans[0]), x)
    t_pad = -(-t // world) * world
    p0 = plans[0]
    want_lens = LENS + ([t_pad - t] if t_pad > t else [])
    assert p0.cu_seqlens.tolist() == _cu(want_lens).tolist()  # the pad tail is a sequence of its own
    assert p0.max_seqlen == max(want_lens)
    full_pos = torch.cat([torch.arange(n) for n in want_lens])
    for r, p in enumerate(plans):
        lo, hi = r * t_pad // world, (r + 1) * t_pad // world
        assert torch.equal(p.position_ids, full_pos[lo:hi])
        # local packing: the global boundaries clipped to [lo, hi)
        bounds = sorted({lo, hi, *[b for b in p0.cu_seqlens.tolist() if lo < b < hi]})
        assert p.cu_seqlens_local.tolist() == [b - lo for b in bounds]
    assert (pieces[-1][~plans[-1].valid] == -7.0).all()


def test_plan_errors():
    with pytest.raises(ValueError, match="non-decreasing from 0"):
        zigzag_plan([0, 5, 3], 2, 0)
    with pytest.raises(ValueError, match="non-decreasing from 0"):
        contiguous_plan([1, 5], 2, 0)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        zigzag_plan([0, 8], 2, 2)
    p = zigzag_plan([0, 8], 2, 0)
    with pytest.raises(ValueError, match=r"x must be \(T, \.\.\.\) with T = 8"):
        shard(torch.zeros(9), p)
    with pytest.raises(ValueError, match=r"pieces must be \(W, T_local, \.\.\.\)"):
        unshard(torch.zeros(3, 4), p)


def test_ulysses_head_checks():
    assert check_ulysses_heads(40, 8, 8) == 1
    assert check_ulysses_heads(28, 4, 4) == 1
    assert check_ulysses_heads(8, 2, 4) == 2  # W > Hkv: each kv head replicated twice
    assert check_ulysses_heads(16, 1, 8) == 8
    with pytest.raises(ValueError, match="Hq=40 query heads must be divisible by .* W=16"):
        check_ulysses_heads(40, 8, 16)
    with pytest.raises(ValueError, match="Hkv=6 kv heads and W=4"):
        check_ulysses_heads(12, 6, 4)
