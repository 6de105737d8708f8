"""AdamW with linear warm-up then a constant (RL) or cosine-to-10% (SFT) schedule.

The optimizer steps the tensors `precision.trainable(model)` names: the fp32 masters when the model computes in a
lower dtype (qlfast/trainer/precision.py), else the parameters themselves (FSDP2's sharded parameters included, which
are the masters there). AdamW's m and v take the dtype of what it steps, so they are fp32 with fp32 masters."""

from __future__ import annotations

import math

import torch

from qlfast.trainer import precision


def adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = precision.trainable(model)
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                             fused=fused or None)


def schedule(optimizer, warmup: int, total: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """total=None: constant after warm-up; else cosine from 1 to 0.1 over total steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if total is None or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_and_step(model, optimizer, scheduler, max_norm: float) -> tuple[float, bool]:
    """Clip, and step unless the gradient is non-finite (then cast the masters into the model, when it has them).
    Returns (grad norm, stepped)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(norm, "full_tensor"):  # FSDP2: the norm of DTensor gradients is itself a DTensor
        norm = norm.full_tensor()
    ok = bool(torch.isfinite(norm))
    if ok:
        optimizer.step()
        precision.after_step(model)
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(norm), ok
