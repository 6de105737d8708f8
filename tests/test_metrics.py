"""pass@k against brute-force enumeration, avg@k, length statistics."""

import itertools
import math
import random

import pytest

from qlfast.metrics import avg_at_k, length_stats, pass_at_k, pass_at_k_all


def brute_pass_at_k(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_vs_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_closed_form_large_n():
    # The product form agrees with the binomial form where that is still exact, and stays finite for large n.
    assert pass_at_k(100, 7, 10) == pytest.approx(1 - math.comb(93, 10) / math.comb(100, 10), rel=1e-12)
    v = pass_at_k(5000, 3, 1000)
    assert 0.0 < v < 1.0 and math.isfinite(v)


def test_pass_at_k_validation():
    for args in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (3, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


def test_pass_at_k_all_and_avg():
    rng = random.Random(0)
    scores = [[float(rng.random() < p) for _ in range(6)] for p in (0.1, 0.5, 0.9, 0.0, 1.0)]
    res = pass_at_k_all(scores)
    assert sorted(res) == [1, 2, 3, 4, 5, 6]
    for k, v in res.items():
        expected = sum(brute_pass_at_k(6, int(sum(s)), k) for s in scores) / len(scores)
        assert v == pytest.approx(expected)
    assert res[1] == pytest.approx(avg_at_k(scores))  # pass@1 == avg@k for 0/1 scores
    assert all(a <= b + 1e-12 for a, b in zip(list(res.values()), list(res.values())[1:]))  # monotone in k


def test_avg_at_k_partial_scores_and_threshold():
    scores = [[1.0, 0.5, 0.0], [0.2, 0.2, 0.2]]
    assert avg_at_k(scores) == pytest.approx((0.5 + 0.2) / 2)
    assert pass_at_k_all(scores)[3] == pytest.approx(0.5)  # only the 1.0 counts as correct
    assert pass_at_k_all(scores, threshold=0.5)[1] == pytest.approx((2 / 3) / 2)
    with pytest.raises(ValueError, match="same number"):
        avg_at_k([[1.0], [1.0, 0.0]])


def test_length_stats():
    s = length_stats([10, 20, 30, 40, 100])
    assert s["mean"] == 40 and s["min"] == 10 and s["max"] == 100 and s["p50"] == 30
    assert s["p90"] == pytest.approx(76.0)  # numpy's linear interpolation
    assert s["std"] == pytest.approx(math.sqrt(sum((x - 40) ** 2 for x in [10, 20, 30, 40, 100]) / 5))
    assert length_stats([])["mean"] == 0.0
