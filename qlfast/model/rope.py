"""Rotary position embedding (Su et al. 2021, RoFormer, eq. 34) with the rope scalings Qwen configs carry.

The inverse frequencies and the attention factor come from transformers' own ROPE_INIT_FUNCTIONS (YaRN, linear,
dynamic NTK, llama3, longrope), so a scaled config gives exactly HF's cos/sin. Position ids are per token (packed
sequences restart at 0), so cos/sin are gathered per token: (T, D) each, computed in fp32 and cast to the
activation dtype as HF does. Rotation: x * cos + rotate_half(x) * sin, halves [x1, x2] -> [-x2, x1].
"""

from __future__ import annotations

import torch

from qlfast.model.config import head_dim, rope_theta, rope_type


def _default_inv_freq(config, device=None) -> torch.Tensor:
    dim = head_dim(config)
    return 1.0 / (rope_theta(config) ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def rope_parameters(config, device=None, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq (D/2,) fp32, attention_factor) for `config`; seq_len matters only for dynamic NTK scaling."""
    kind = rope_type(config)
    if kind == "default":
        return _default_inv_freq(config, device), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope: rope_type {kind!r} is not one of {sorted(ROPE_INIT_FUNCTIONS)}")
    fn = ROPE_INIT_FUNCTIONS[kind]
    if kind == "dynamic":
        inv_freq, factor = fn(config, device, seq_len=seq_len)
    else:
        inv_freq, factor = fn(config, device)
    return inv_freq.float(), float(factor)


class RotaryEmbedding(torch.nn.Module):
    """Holds inv_freq (a non-persistent buffer, so it never reaches a checkpoint) and builds per-token cos/sin."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.kind = rope_type(config)
        self.max_pos = config.max_position_embeddings
        inv_freq, self.attention_factor = rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (T,) -> cos, sin (T, D) in `dtype`."""
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32 or inv_freq.device != position_ids.device:
            # model.to(bf16) casts buffers too; the frequencies must stay fp32 (bf16 would shift long positions)
            inv_freq, _ = rope_parameters(self.config, position_ids.device)
        if self.kind == "dynamic":
            # HF's dynamic_rope_update recomputes the frequencies for the longest sequence seen when it exceeds the
            # original maximum; for one fresh sequence that is max(position) + 1.
            seq_len = int(position_ids.max()) + 1 if position_ids.numel() else 0
            if seq_len > self.max_pos:
                inv_freq, _ = rope_parameters(self.config, position_ids.device, seq_len=seq_len)
        freqs = position_ids.float()[:, None] * inv_freq.to(position_ids.device)[None, :]  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (T, Hq, D), k (T, Hkv, D), cos/sin (T, D) -> rotated q, k."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
