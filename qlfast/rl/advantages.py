"""GRPO group-normalised advantages (DeepSeekMath, Shao et al. 2024, section 4.1.2 outcome supervision).

Rewards come in groups of G responses to the same prompt, laid out contiguously: rewards[b * G + j].
    A_{b,j} = (r_{b,j} - mean_j r_{b,j}) / (std_j r_{b,j} + eps)      (normalize_std=True, GRPO / DAPO)
    A_{b,j} =  r_{b,j} - mean_j r_{b,j}                                (normalize_std=False, Dr. GRPO, Liu et al. 2025)
std is the unbiased (Bessel-corrected) group standard deviation, as in verl and TRL; a group of size 1 has
advantage 0. Every token of a response gets its response's advantage (outcome reward, no per-token credit):
`broadcast_to_tokens` for packed (varlen) responses, `adv[:, None] * mask` for padded ones.
Computed in float64 and returned in float32 (advantages are O(1); the group sums are where precision goes).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards (B*G,) or (B, G) -> advantages of the same shape, float32."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    shape = rewards.shape
    if rewards.dim() == 2:
        if shape[1] != group_size:
            raise ValueError(f"rewards of shape {tuple(shape)} expected (B, G={group_size})")
    elif rewards.dim() != 1 or shape[0] % group_size:
        raise ValueError(f"rewards of shape {tuple(shape)} expected (B*G,) with G={group_size} or (B, G)")
    r = rewards.detach().to(torch.float64).reshape(-1, group_size)  # (B, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        adv = adv / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
    return adv.to(torch.float32).reshape(shape)


def broadcast_to_tokens(values: torch.Tensor, lengths: torch.Tensor | list[int]) -> torch.Tensor:
    """Per-sequence values (N,) -> per-token values (sum(lengths),) for packed responses."""
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=values.device)
    if values.dim() != 1 or lengths.shape != values.shape:
        raise ValueError(f"values {tuple(values.shape)} and lengths {tuple(lengths.shape)} must both be (N,)")
    if (lengths < 0).any():
        raise ValueError("lengths must be >= 0")
    return torch.repeat_interleave(values, lengths)
