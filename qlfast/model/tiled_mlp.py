"""The SwiGLU MLP, plain (`swiglu_mlp`) and tiled (`tiled_mlp`): the sequence is processed in tiles and each tile is
recomputed in backward (ALST, sec. 3.2).

Memory contract: forward saves only x (T, H) and writes y (T, H); no (T, I) tensor outlives one tile. Backward
recomputes gate/up/act for one tile of T_tile rows, back-propagates it, and writes that tile's rows of dx; the weight
gradients accumulate over tiles in one fp32 buffer per weight. Peak extra memory is about
4 x T_tile x I (gate, up, silu(gate), act) plus the three weight-gradient buffers, instead of 4 x T x I. At 60K tokens
and I = 18944 (7B) in bf16 that is 9 GiB untiled vs 0.6 GiB with 4K-token tiles.

The weight gradients are returned from the Function rather than accumulated into .grad inside backward, so the
result is an ordinary autograd edge: FSDP2's post-backward hooks and gradient accumulation see nothing unusual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_mlp(x, w_gate, w_up, w_down, use_liger: bool = False):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, SwiGLU); x (T, H), weights (I, H), (I, H), (H, I) -> (T, H)."""
    gate, up = F.linear(x, w_gate), F.linear(x, w_up)
    if use_liger and x.is_cuda:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        act = LigerSiLUMulFunction.apply(gate, up)
    else:
        act = F.silu(gate) * up
    return F.linear(act, w_down)


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, tile, use_liger):
        out = torch.empty(x.shape[0], w_down.shape[0], dtype=x.dtype, device=x.device)  # (T, H)
        with torch.no_grad():
            for a in range(0, x.shape[0], tile):
                out[a:a + tile] = swiglu_mlp(x[a:a + tile], w_gate, w_up, w_down, use_liger)
        ctx.save_for_backward(x, w_gate, w_up, w_down)
        ctx.tile, ctx.use_liger = tile, use_liger
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w_gate, w_up, w_down = ctx.saved_tensors
        weights = (w_gate, w_up, w_down)
        need_x = ctx.needs_input_grad[0]
        need_w = [ctx.needs_input_grad[i] for i in (1, 2, 3)]
        dx = torch.empty_like(x) if need_x else None
        dws = [None, None, None]
        for a in range(0, x.shape[0], ctx.tile):
            xt = x[a:a + ctx.tile].detach().requires_grad_(need_x)
            ws = [w.detach().requires_grad_(n) for w, n in zip(weights, need_w)]
            with torch.enable_grad():
                y = swiglu_mlp(xt, *ws, ctx.use_liger)
            inputs = [t for t, n in zip([xt, *ws], [need_x, *need_w]) if n]
            grads = list(torch.autograd.grad(y, inputs, grad_out[a:a + ctx.tile]))
            if need_x:
                dx[a:a + ctx.tile] = grads.pop(0)
            for i in range(3):
                if need_w[i]:
                    g = grads.pop(0)
                    # accumulate across tiles in fp32: a bf16 running sum would round once per tile
                    dws[i] = g.float() if dws[i] is None else dws[i].add_(g)
        dws = [d.to(w.dtype) if d is not None else None for d, w in zip(dws, weights)]
        return dx, dws[0], dws[1], dws[2], None, None


def tiled_mlp(x, w_gate, w_up, w_down, *, tile_tokens: int, use_liger: bool = False):
    """down(silu(x W_gate^T) * (x W_up^T)) W_down^T over row tiles of x (T, H), recomputed per tile in backward."""
    if tile_tokens < 1:
        raise ValueError(f"tiled_mlp: tile_tokens must be >= 1, got {tile_tokens}")
    if x.dim() != 2 or w_gate.shape != w_up.shape or w_gate.shape[1] != x.shape[1] or \
            w_down.shape != (x.shape[1], w_gate.shape[0]):
        raise ValueError(f"tiled_mlp: expected x (T, H), w_gate/w_up (I, H), w_down (H, I); got x {tuple(x.shape)}, "
                         f"w_gate {tuple(w_gate.shape)}, w_up {tuple(w_up.shape)}, w_down {tuple(w_down.shape)}")
    return _TiledMLP.apply(x, w_gate, w_up, w_down, int(tile_tokens), bool(use_liger))
