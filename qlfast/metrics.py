"""Evaluation metrics: unbiased pass@k, avg@k, response-length statistics.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1): with n samples of which c are
correct, the probability that k samples drawn without replacement include a correct one is
    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)
(the product form avoids huge binomials); it is 1 when n - c < k. A sample is correct when its score is
>= `threshold` (1.0: the rule/judge reward is 0 or 1). avg@k is the mean score over the k = n samples of each
prompt, averaged over prompts (the QwenLong-L1 tables report avg@k with sub-EM scores).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with n samples, c correct."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _check(scores: Sequence[Sequence[float]]) -> int:
    if not scores:
        raise ValueError("need at least one prompt")
    n = len(scores[0])
    if n == 0 or any(len(s) != n for s in scores):
        got = sorted({len(s) for s in scores})
        raise ValueError(f"every prompt needs the same number (>= 1) of samples, got {got}")
    return n


def pass_at_k_all(scores: Sequence[Sequence[float]], threshold: float = 1.0) -> dict[int, float]:
    """scores[prompt][sample] -> {k: mean over prompts of pass@k} for every k in 1..n."""
    n = _check(scores)
    counts = [sum(float(x) >= threshold for x in s) for s in scores]
    return {k: sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in range(1, n + 1)}


def avg_at_k(scores: Sequence[Sequence[float]]) -> float:
    """Mean over prompts of the mean score over each prompt's samples."""
    _check(scores)
    return sum(sum(float(x) for x in s) / len(s) for s in scores) / len(scores)


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """mean / std / min / p50 / p90 / max of response lengths (tokens); zeros for an empty list."""
    if not lengths:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    xs = sorted(float(x) for x in lengths)
    mean = sum(xs) / len(xs)

    def q(p: float) -> float:  # linear interpolation between closest ranks (numpy's default)
        pos = p * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    return {"mean": mean, "std": std, "min": xs[0], "p50": q(0.5), "p90": q(0.9), "max": xs[-1]}
