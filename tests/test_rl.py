"""GRPO advantages, DAPO dynamic sampling and overlong shaping, curriculum bins/sampler, retrospective sampling."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from qlfast.rl.advantages import broadcast_to_tokens, group_advantages
from qlfast.rl.curriculum import Curriculum, Phase, PhaseSampler, assign_bins
from qlfast.rl.dynamic_sampling import dynamic_sample, group_has_variance
from qlfast.rl.overlong import apply_overlong_shaping, overlong_penalty
from qlfast.rl.retrospective import DifficultyTable, RetrospectiveConfig, RetrospectiveSampler

# ---------------------------------------------------------------- advantages


def _ref_adv(r, g, norm, eps):
    out = []
    for b in range(len(r) // g):
        grp = r[b * g : (b + 1) * g]
        m = sum(grp) / g
        sd = math.sqrt(sum((x - m) ** 2 for x in grp) / (g - 1)) if g > 1 else 0.0
        out += [(x - m) / (sd + eps) if norm and g > 1 else x - m for x in grp]
    return out


@pytest.mark.parametrize("g", [1, 3, 8])
@pytest.mark.parametrize("norm", [True, False])
def test_group_advantages_vs_reference(g, norm):
    torch.manual_seed(g)
    r = torch.rand(5 * g) * 2 - 0.5
    r[:g] = 1.0  # a zero-variance group: advantage exactly 0, no division blow-up
    adv = group_advantages(r, g, normalize_std=norm, eps=1e-6)
    ref = torch.tensor(_ref_adv(r.double().tolist(), g, norm, 1e-6), dtype=torch.float64)
    assert adv.dtype == torch.float32 and adv.shape == r.shape
    torch.testing.assert_close(adv.double(), ref, rtol=1e-6, atol=1e-6)
    assert torch.all(adv[:g] == 0)
    assert torch.allclose(adv.view(-1, g).sum(1), torch.zeros(5), atol=1e-5)  # zero mean per group
    adv2 = group_advantages(r.view(5, g), g, normalize_std=norm)
    assert adv2.shape == (5, g) and torch.equal(adv2.reshape(-1), adv)


def test_group_advantages_binary_rewards_std_one():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = group_advantages(r, 4)
    s = r.std().item()
    torch.testing.assert_close(adv, (r - 0.5) / (s + 1e-6))


def test_group_advantages_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B\*G,\)"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match=r"\(B, G=4\)"):
        group_advantages(torch.zeros(2, 3), 4)


def test_broadcast_to_tokens():
    adv = torch.tensor([0.5, -1.0, 2.0])
    out = broadcast_to_tokens(adv, [2, 0, 3])
    assert out.tolist() == [0.5, 0.5, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match=r"\(N,\)"):
        broadcast_to_tokens(adv, [1, 2])


# ---------------------------------------------------------------- dynamic sampling


def test_group_has_variance():
    r = torch.tensor([1.0, 1, 1, 0, 1, 0, 0, 0, 0])
    assert group_has_variance(r, 3).tolist() == [False, True, False]


def _groups(rng, n, p_mixed):
    out = []
    for _ in range(n):
        u = rng.random()
        if u < p_mixed:
            out.append(SimpleNamespace(rewards=[1.0, 0.0, 1.0, 0.0]))
        elif u < (1 + p_mixed) / 2:
            out.append(SimpleNamespace(rewards=[1.0] * 4))
        else:
            out.append(SimpleNamespace(rewards=[0.0] * 4))
    return out


def test_dynamic_sampling_reaches_target():
    rng = random.Random(0)
    calls = []

    def gen(round_idx):
        calls.append(round_idx)
        return _groups(rng, 8, 0.4)

    res = dynamic_sample(gen, target=8, max_rounds=10)
    assert res.complete and len(res.groups) == 8
    assert calls == list(range(res.rounds)) and res.rounds > 1
    assert res.generated == 8 * res.rounds
    assert res.dropped + 8 + res.surplus == res.generated
    assert all(max(g.rewards) > min(g.rewards) for g in res.groups)
    assert "8/8 groups" in res.message


def test_dynamic_sampling_gives_up_and_says_so():
    res = dynamic_sample(lambda i: [SimpleNamespace(rewards=[1.0, 1.0])] * 3 + [SimpleNamespace(rewards=[0, 1])],
                         target=5, max_rounds=2)
    assert not res.complete and len(res.groups) == 2 and res.rounds == 2 and res.dropped == 6
    assert res.per_round == [1, 1]
    assert "max rounds reached, training on 2 group(s)" in res.message
    empty = dynamic_sample(lambda i: [SimpleNamespace(rewards=[0.0, 0.0])], target=1, max_rounds=3)
    assert empty.groups == [] and not empty.complete
    with pytest.raises(ValueError):
        dynamic_sample(lambda i: [], target=0, max_rounds=1)


def test_dynamic_sampling_custom_accessor_and_tol():
    res = dynamic_sample(lambda i: [(0.5, 0.5 + 1e-9), (0.0, 1.0)], target=1, max_rounds=1,
                         rewards_of=lambda g: g, tol=1e-6)
    assert res.groups == [(0.0, 1.0)] and res.dropped == 1


# ---------------------------------------------------------------- overlong shaping


def test_overlong_penalty_dapo_eq13():
    L, C = 100, 20
    lengths = torch.tensor([0, 50, 80, 81, 90, 99, 100, 101, 500])
    expected = [0, 0, 0, -1 / 20, -10 / 20, -19 / 20, -1.0, -1.0, -1.0]
    torch.testing.assert_close(overlong_penalty(lengths, L, C), torch.tensor(expected, dtype=torch.float32))
    r = torch.tensor([1.0, 0.0, 1.0])
    out = apply_overlong_shaping(r, torch.tensor([10, 95, 200]), L, C, factor=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0, -0.375, 0.5]))
    assert overlong_penalty(torch.tensor([100, 101]), 100, 0).tolist() == [0.0, -1.0]
    with pytest.raises(ValueError):
        overlong_penalty(lengths, 10, 20)


# ---------------------------------------------------------------- curriculum


def test_assign_bins_disjoint_and_cumulative():
    lengths = [5, 10, 11, 30, 31, 1000, 0]
    b = assign_bins(lengths, [10, 30])
    assert b.bins == [[0, 1, 6], [2, 3]] and b.too_long == [4, 5]
    rep = b.report()
    assert "2 prompt(s) longer than every phase" in rep and "longest 1000" in rep
    c = assign_bins(lengths, [10, 30], cumulative=True)
    assert c.bins == [[0, 1, 6], [0, 1, 2, 3, 6]] and c.too_long == [4, 5]
    with pytest.raises(ValueError, match="non-decreasing"):
        assign_bins(lengths, [30, 10])


def test_phase_validation_and_steps():
    with pytest.raises(ValueError, match="exactly one"):
        Phase(100, 10)
    with pytest.raises(ValueError, match="exactly one"):
        Phase(100, 10, steps=1, epochs=1.0)
    assert Phase(100, 10, epochs=1.5).num_steps(bin_size=10, batch_size=4) == 4
    assert Phase(100, 10, steps=7).num_steps(10, 4) == 7


def test_phase_sampler_epochs_and_resume():
    idx = list(range(100, 110))
    s = PhaseSampler(idx, batch_size=4, seed=3)
    first_epoch = s.next_batch() + s.next_batch() + s.next_batch(2)
    assert sorted(first_epoch) == idx  # without replacement within an epoch
    stream = [s.next_batch() for _ in range(7)]
    assert all(x in idx for b in stream for x in b)
    # Resume from a mid-run state reproduces the continuation exactly.
    a = PhaseSampler(idx, 4, seed=3)
    for _ in range(5):
        a.next_batch()
    state = a.state_dict()
    cont = [a.next_batch() for _ in range(6)]
    b = PhaseSampler(idx, 4, seed=3)
    b.load_state_dict(state)
    assert [b.next_batch() for _ in range(6)] == cont
    assert PhaseSampler(idx, 4, seed=4).next_batch() != PhaseSampler(idx, 4, seed=3).next_batch()
    with pytest.raises(ValueError, match="bin of 10"):
        PhaseSampler(idx[:5], 4).load_state_dict(state)


def test_curriculum_phases_only_draw_their_bin():
    lengths = [random.Random(i).randint(1, 60) for i in range(50)]
    bins = assign_bins(lengths, [20, 40, 50])
    phases = [Phase(20, 8, steps=3), Phase(40, 16, epochs=1.0), Phase(50, 16, steps=2)]
    cur = Curriculum(phases, bins, batch_size=4, seed=1)
    assert cur.steps[1] == math.ceil(len(bins.bins[1]) / 4)
    assert cur.total_steps == sum(cur.steps)
    lo = [0, 20, 40]
    for step in range(cur.total_steps):
        k = cur.phase_of(step)
        batch = cur.next_batch(k)
        assert all(lo[k] < lengths[i] <= phases[k].max_prompt_tokens for i in batch)
    assert cur.phase_of(cur.phase_start(2)) == 2 and cur.phase_of(10**6) == 2
    st = cur.state_dict()
    nxt = cur.next_batch(1)
    cur2 = Curriculum(phases, bins, batch_size=4, seed=1)
    cur2.load_state_dict(st)
    assert cur2.next_batch(1) == nxt


def test_curriculum_rejects_steps_on_empty_bin():
    bins = assign_bins([5, 6], [10, 20])
    with pytest.raises(ValueError, match="phase 1 has 2 steps but no prompt"):
        Curriculum([Phase(10, 4, steps=1), Phase(20, 4, steps=2)], bins, batch_size=2)


# ---------------------------------------------------------------- retrospective sampling


def _table(mode, **kw):
    t = DifficultyTable(RetrospectiveConfig(mode=mode, **kw))
    # uid -> phase-0 group rewards (G = 4); "e" is solved every time (never hard); "f" is only seen in phase 1.
    groups = {"a": [0, 0, 0, 0], "b": [1, 0, 0, 0], "c": [1, 1, 0, 0], "d": [1, 1, 1, 0], "e": [1, 1, 1, 1]}
    for uid, r in groups.items():
        t.record(uid, 0, r)
    t.record("f", 1, [0, 0])
    return t


def test_difficulty_rules():
    t = _table("one_minus")
    uids, w = t.pool(1)
    assert uids == ["a", "b", "c", "d"] and w == pytest.approx([1.0, 0.75, 0.5, 0.25])
    ti = _table("inverse", cap=10.0)
    uids, w = ti.pool(1)
    assert uids == ["a", "b", "c", "d"] and w == pytest.approx([10.0, 4.0, 2.0, 4 / 3])
    assert ti.pool(2)[0] == ["a", "b", "c", "d", "f"]  # phase-1 records count from phase 2 on
    assert ti.pool(0) == ([], [])
    t.record("a", 1, [1, 1, 1, 1])  # later evidence lowers the difficulty for phase 2 only
    assert t.mean_reward("a", 1) == 0.0 and t.mean_reward("a", 2) == 0.5
    t.record("z", 0, [2.0, -1.0])  # shaped rewards are clipped to [0, 1]
    assert t.mean_reward("z", 1) == 0.5


@pytest.mark.parametrize("mode", ["inverse", "one_minus"])
def test_retrospective_draw_frequencies_match_rule(mode):
    t = _table(mode, cap=5.0, seed=7)
    sampler = RetrospectiveSampler(t)
    uids, w = t.pool(1)
    expected = {u: x / sum(w) for u, x in zip(uids, w)}
    counts = dict.fromkeys(uids, 0)
    n_steps, per_step = 2000, 10
    for step in range(n_steps):
        for u in sampler.draw(1, step, per_step):
            counts[u] += 1
    total = n_steps * per_step
    for u in uids:
        p = expected[u]
        sigma = math.sqrt(p * (1 - p) / total)
        assert abs(counts[u] / total - p) < 5 * sigma, (u, counts[u] / total, p)
    assert "e" not in counts and "f" not in counts  # solved / not-yet-earlier examples never drawn


def test_retrospective_compose_fraction_determinism_and_state():
    t = _table("inverse", fraction=0.25, seed=1)
    s = RetrospectiveSampler(t)
    fresh_src = iter(range(1000))
    fresh, retro = s.compose(1, step=3, batch_size=8, next_fresh=lambda n: [next(fresh_src) for _ in range(n)])
    assert len(retro) == 2 and fresh == list(range(6))
    assert s.draw(1, 3, 2) == retro  # same (seed, phase, step): same draw
    assert s.compose(0, 0, 8, lambda n: list(range(n))) == (list(range(8)), [])  # phase 0: nothing earlier
    t2 = DifficultyTable()
    t2.load_state_dict(t.state_dict())
    assert t2.pool(1) == t.pool(1) and RetrospectiveSampler(t2).draw(1, 3, 2) == retro
    assert RetrospectiveSampler(DifficultyTable()).num_retro(1, 8) == 0  # empty pool
    with pytest.raises(ValueError, match="mode"):
        RetrospectiveConfig(mode="bogus")
