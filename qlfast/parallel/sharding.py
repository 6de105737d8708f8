"""Shard a packed varlen batch across a sequence-parallel group, and gather it back.

Zigzag (ring attention; Brandon et al. 2023 "Striped Attention", zhuzilin/ring-flash-attention's zigzag layout):
each sequence is padded at its end to a multiple of 2W tokens and cut into 2W equal chunks; rank i holds chunks i
and 2W-1-i of every sequence, in that order, so that under a causal mask every rank does the same work. A rank's
local batch is still a packed varlen batch: sequence s contributes 2 * L_pad[s] / (2W) tokens, described by
`cu_seqlens_local`, which is the same on every rank.

Padding (which we do rather than reject): a sequence whose length is not a multiple of 2W, including one shorter
than 2W, is padded at its end. Pad tokens come after every real token of their sequence, so under causal attention
no real query sees them and, when the loss ignores them (zero gradient at pad positions), they change nothing: the
result on real tokens is exact. `plan.valid` marks real tokens, `plan.position_ids` continues the positions through
the padding, and `unshard` drops it. Non-causal ring attention would let real queries see pad keys: build that
plan with pad=False, which raises on any length that is not a multiple of 2W.

Contiguous (Ulysses; Jacobs et al. 2023 "DeepSpeed Ulysses"): the packed batch (T tokens) is padded at its end to
a multiple of W with one extra pad sequence (so no real token ever attends to padding, causal or not) and rank r
holds tokens [r T/W, (r+1) T/W). Attention runs on the full sequence after the all-to-all, with the padded global
`cu_seqlens` of the plan.

Both plans carry `index_all (W, T_local)`: the position in the original packed batch of every token each rank
holds (-1 for padding), so `shard` and `unshard` are index_select / index_copy with no communication;
`gather_unshard` all-gathers the local pieces first. Mismatched cu_seqlens across ranks are caught by an
all_gather of a small hash (`check_same_across_ranks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ShardPlan:
    """Where every token of a packed batch lives on a sequence-parallel group of `world_size` ranks."""

    kind: str  # "zigzag" or "contiguous"
    world_size: int
    rank: int
    seqlens: tuple[int, ...]  # original sequence lengths
    padded_seqlens: tuple[int, ...]  # after padding (zigzag: each a multiple of 2W; contiguous: a pad tail added)
    cu_seqlens: torch.Tensor  # int32 (S'+1,): the padded global packing (what Ulysses attention runs on)
    max_seqlen: int  # longest padded global sequence
    cu_seqlens_local: torch.Tensor  # int32 (S_l+1,): this rank's local packing (zigzag: what ring attention runs on)
    max_seqlen_local: int
    index_all: torch.Tensor  # int64 (W, T_local): original token index of each local token per rank, -1 for padding
    position_ids_all: torch.Tensor  # int64 (W, T_local): position within its (padded) sequence

    @property
    def num_tokens(self) -> int:
        """T, the tokens of the original packed batch."""
        return sum(self.seqlens)

    @property
    def local_tokens(self) -> int:
        return self.index_all.shape[1]

    @property
    def index(self) -> torch.Tensor:
        return self.index_all[self.rank]

    @property
    def valid(self) -> torch.Tensor:
        """bool (T_local,): True on real tokens, False on padding (mask the loss with it)."""
        return self.index >= 0

    @property
    def position_ids(self) -> torch.Tensor:
        return self.position_ids_all[self.rank]


def _seqlens(cu_seqlens) -> list[int]:
    b = [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
    if len(b) < 2 or b[0] != 0 or any(b[i + 1] < b[i] for i in range(len(b) - 1)):
        shown = b if len(b) <= 8 else b[:4] + ["..."] + b[-3:]
        raise ValueError(f"cu_seqlens must be (S+1,) non-decreasing from 0 with S >= 1, got {shown}")
    return [b[i + 1] - b[i] for i in range(len(b) - 1)]


def _check_world(world_size: int, rank: int):
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got world_size={world_size}, rank={rank}")


def _cu(lengths, device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return cu.to(torch.int32).to(device)


def _comm_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(backend) else torch.device("cpu")


def check_same_across_ranks(t: torch.Tensor, group=None, *, what: str = "cu_seqlens",
                            local_error: str | None = None) -> None:
    """Raise ValueError on every rank when `t` (an integer tensor) differs between the ranks of `group`, or when
    any rank passes a `local_error` (a message from its own input checks).

    Compares a 5-number hash (length, sum, two position-weighted sums, the local-error flag) with one all_gather:
    a few bytes and one host sync, so call it once per batch, not per layer. Raising on every rank together, never
    on some ranks while the others wait in a collective, is what keeps a bad input from becoming a hang.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        if local_error:
            raise ValueError(local_error)
        return
    x = t.detach().reshape(-1).to(torch.int64).cpu()
    w = torch.arange(1, x.numel() + 1, dtype=torch.int64)
    h = torch.stack([torch.tensor(x.numel()), x.sum(), (x * w).sum(), (x * (w * w % 1000003)).sum(),
                     torch.tensor(int(local_error is not None))])
    h = h.to(_comm_device(group))
    hs = [torch.empty_like(h) for _ in range(dist.get_world_size(group))]
    dist.all_gather(hs, h, group=group)
    hs = [v.tolist() for v in hs]
    if local_error:
        raise ValueError(local_error)
    failed = [r for r, v in enumerate(hs) if v[4]]
    if failed:
        raise ValueError(f"{what}: ranks {failed} of the sequence-parallel group rejected their inputs (see their "
                         "errors)")
    if any(v[:4] != hs[0][:4] for v in hs):
        bad = [r for r, v in enumerate(hs) if v[:4] != hs[0][:4]]
        raise ValueError(f"{what} differs across the ranks of the sequence-parallel group (ranks {bad} differ from "
                         f"rank 0): every rank must pass the same packed-batch layout")


def _plan_inputs(cu_seqlens, world_size: int, rank: int, group, device):
    """Checks shared by every plan -> (sequence lengths, device of the plan's tensors)."""
    _check_world(world_size, rank)
    lens = _seqlens(cu_seqlens)
    if device is None:
        device = cu_seqlens.device if torch.is_tensor(cu_seqlens) else torch.device("cpu")
    if group is not None:
        check_same_across_ranks(torch.tensor([world_size, *lens]), group)
    return lens, device


def zigzag_plan(cu_seqlens, world_size: int, rank: int, *, pad: bool = True, group=None, device=None) -> ShardPlan:
    """Plan for zigzag ring attention: rank `rank` holds chunks rank and 2W-1-rank of every sequence.

    cu_seqlens: the global packing (S+1,) (tensor or list). pad=False raises on a sequence whose length is not a
    multiple of 2W (needed for non-causal attention). group: when given, checks that every rank passes the same
    cu_seqlens. device: where the plan's tensors live (defaults to cu_seqlens's device, CPU for a list).
    """
    lens, device = _plan_inputs(cu_seqlens, world_size, rank, group, device)
    n_chunks = 2 * world_size
    if not pad:
        bad = [(s, n) for s, n in enumerate(lens) if n % n_chunks]
        if bad:
            s, n = bad[0]
            raise ValueError(f"zigzag_plan(pad=False): sequence {s} has {n} tokens, not a multiple of 2W = {n_chunks} "
                             f"(each sequence is cut into 2W equal chunks; a sequence shorter than 2W cannot be); "
                             f"use pad=True (causal attention only)")
    padded = [-(-n // n_chunks) * n_chunks for n in lens]
    starts = [0]
    for n in lens[:-1]:
        starts.append(starts[-1] + n)
    index_all, pos_all = [], []
    for r in range(world_size):
        idx, pos = [], []
        for s, (n, npad) in enumerate(zip(lens, padded)):
            c = npad // n_chunks
            for chunk in (r, n_chunks - 1 - r):
                p = torch.arange(chunk * c, (chunk + 1) * c)
                pos.append(p)
                idx.append(torch.where(p < n, p + starts[s], -1))
        index_all.append(torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64))
        pos_all.append(torch.cat(pos) if pos else torch.zeros(0, dtype=torch.int64))
    local = [npad // world_size for npad in padded]
    return ShardPlan(
        kind="zigzag", world_size=world_size, rank=rank, seqlens=tuple(lens), padded_seqlens=tuple(padded),
        cu_seqlens=_cu(padded, device), max_seqlen=max(padded), cu_seqlens_local=_cu(local, device),
        max_seqlen_local=max(local), index_all=torch.stack(index_all).to(device),
        position_ids_all=torch.stack(pos_all).to(device))


def contiguous_plan(cu_seqlens, world_size: int, rank: int, *, group=None, device=None) -> ShardPlan:
    """Plan for Ulysses: the packed batch padded to a multiple of W with one pad sequence, cut in W equal pieces."""
    lens, device = _plan_inputs(cu_seqlens, world_size, rank, group, device)
    total = sum(lens)
    t_pad = -(-max(total, 1) // world_size) * world_size
    padded = lens + ([t_pad - total] if t_pad > total else [])
    t_local = t_pad // world_size
    tok = torch.arange(t_pad)
    index_all = torch.where(tok < total, tok, -1).view(world_size, t_local)
    pos = torch.cat([torch.arange(n) for n in padded]).view(world_size, t_local)
    # local packing: the global sequence boundaries clipped to this rank's token range
    cu_g = _cu(padded, "cpu").long()
    lo, hi = rank * t_local, (rank + 1) * t_local
    bounds = sorted({lo, hi, *[int(b) for b in cu_g if lo < b < hi]})
    local = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return ShardPlan(
        kind="contiguous", world_size=world_size, rank=rank, seqlens=tuple(lens), padded_seqlens=tuple(padded),
        cu_seqlens=_cu(padded, device), max_seqlen=max(padded), cu_seqlens_local=_cu(local, device),
        max_seqlen_local=max(local), index_all=index_all.to(device), position_ids_all=pos.to(device))


def shard(x: torch.Tensor, plan: ShardPlan, *, pad_value: float = 0) -> torch.Tensor:
    """This rank's local piece of a packed tensor x (T, ...) -> (T_local, ...), pad positions set to pad_value."""
    if x.shape[0] != plan.num_tokens:
        raise ValueError(f"shard: x must be (T, ...) with T = {plan.num_tokens} packed tokens, got {tuple(x.shape)}")
    idx = plan.index.to(x.device)
    out = x.index_select(0, idx.clamp_min(0))
    pad_mask = (idx < 0).view(-1, *([1] * (x.dim() - 1)))
    return out.masked_fill(pad_mask, pad_value)


def unshard(pieces, plan: ShardPlan) -> torch.Tensor:
    """Inverse of shard: every rank's piece ((W, T_local, ...) stacked, or a list of W) -> (T, ...), padding dropped."""
    pieces = torch.stack(list(pieces)) if not torch.is_tensor(pieces) else pieces
    if pieces.shape[:2] != plan.index_all.shape:
        raise ValueError(f"unshard: pieces must be (W, T_local, ...) = {tuple(plan.index_all.shape)} + (...), got "
                         f"{tuple(pieces.shape)}")
    idx = plan.index_all.to(pieces.device).reshape(-1)
    flat = pieces.reshape(-1, *pieces.shape[2:])
    keep = idx >= 0
    out = flat.new_empty(plan.num_tokens, *pieces.shape[2:])
    return out.index_copy_(0, idx[keep], flat[keep])


def gather_unshard(x_local: torch.Tensor, plan: ShardPlan, group=None) -> torch.Tensor:
    """All-gather every rank's local piece (T_local, ...) and unshard -> (T, ...) on every rank. Not differentiable."""
    if x_local.shape[0] != plan.local_tokens:
        raise ValueError(f"gather_unshard: x_local must be (T_local, ...) with T_local = {plan.local_tokens}, got "
                         f"{tuple(x_local.shape)}")
    pieces = [torch.empty_like(x_local) for _ in range(plan.world_size)]
    dist.all_gather(pieces, x_local.contiguous(), group=group)
    return unshard(pieces, plan)


def check_ulysses_heads(num_heads: int, num_kv_heads: int, world_size: int) -> int:
    """-> how many times each kv head is replicated so that W ranks each get whole heads (1 when W <= Hkv)."""
    if num_heads % world_size:
        raise ValueError(f"ulysses: Hq={num_heads} query heads must be divisible by the sequence-parallel group size "
                         f"W={world_size} (each rank computes Hq/W heads)")
    if num_kv_heads % world_size == 0:
        return 1
    if world_size % num_kv_heads == 0:
        return world_size // num_kv_heads
    raise ValueError(f"ulysses: Hkv={num_kv_heads} kv heads and W={world_size} ranks: W must divide Hkv, or Hkv "
                     f"divide W (then kv heads are replicated W/Hkv times)")
