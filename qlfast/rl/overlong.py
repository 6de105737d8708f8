"""DAPO overlong reward shaping (Yu et al. 2025, "DAPO", eq. 13, soft overlong punishment).

With L_max the max response length and L_cache the penalty window:
    R_length(y) = 0                                  if |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
                = -1                                 if L_max < |y|
added to the correctness reward (scaled by `factor`, 1 in DAPO). At |y| = L_max the linear branch already gives -1,
so the penalty is continuous and a response truncated at the limit gets -1. The QwenLong-L1 recipe uses
L_cache = 1000 with L_max = 10000.
"""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """lengths (N,) response token counts -> penalty (N,) float32 in [-1, 0]."""
    if max_len <= 0 or cache_len < 0 or cache_len > max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len and max_len > 0, got max_len={max_len} cache_len={cache_len}")
    n = torch.as_tensor(lengths).to(torch.float64)
    if cache_len == 0:
        return torch.where(n > max_len, -1.0, 0.0).to(torch.float32)
    start = max_len - cache_len
    linear = (start - n) / cache_len
    pen = torch.where(n <= start, torch.zeros_like(n), linear)
    pen = torch.where(n > max_len, torch.full_like(n, -1.0), pen)
    return pen.to(torch.float32)


def apply_overlong_shaping(rewards: torch.Tensor, lengths: torch.Tensor, max_len: int, cache_len: int,
                           factor: float = 1.0) -> torch.Tensor:
    """rewards (N,) + factor * overlong_penalty(lengths) (N,)."""
    if rewards.shape != torch.as_tensor(lengths).shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and lengths {tuple(torch.as_tensor(lengths).shape)} differ")
    return rewards.to(torch.float32) + factor * overlong_penalty(lengths, max_len, cache_len).to(rewards.device)
