"""Mixed precision: master weights and optimizer state in `--model.master_dtype` (fp32), compute in `--model.dtype`.

Why: bf16 keeps 8 significant bits. A weight of magnitude 0.02 lies in [2^-6, 2^-5), where bf16's spacing is 2^-13
= 1.2e-4, so an update below 6.1e-5 rounds away; an AdamW update is about lr, 2e-6 in the QwenLong-L1 recipe (issue
13 measured 3.9% of a 4096 x 4096 bf16 weight changing per AdamW step at that lr). So the masters, and AdamW's m and v
(which live in their parameters' dtype), stay fp32, and forward and backward run in bf16.

Two mechanisms, one policy:
- FSDP2 (`--model.fsdp=true`): the sharded parameters are the masters; `MixedPrecisionPolicy(param_dtype=compute,
  reduce_dtype=float32)` casts each all-gathered layer to the compute dtype and reduce-scatters the gradients in fp32
  into fp32 sharded gradients (qlfast/parallel/fsdp.py), as verl's FSDP actor does.
- Replicated: `attach` casts the model's parameters to the compute dtype (the working copy that forward, the export
  and the weight sync see) and keeps an fp32 master per parameter. A post-accumulate-grad hook moves each backward's
  compute-dtype gradient into its master's fp32 `.grad` and frees it, so micro-batches accumulate in fp32 (what FSDP2
  does with reduce_dtype=float32); the gradient all-reduce, clipping and AdamW run on the masters (`trainable`), and
  `after_step` casts the masters back into the working copy.

Why not FSDP2 on a one-rank mesh per rank for the replicated case: it makes every parameter a DTensor, so the
replicated export, the torch.save checkpoint, the flat gradient all-reduce and a plain `python -m qlfast.train` (no
process group) would all need the FSDP variants; the hooks above change none of them and hold the same numbers
(bf16 gradients cast to fp32 once per backward, fp32 accumulation, reduction and update). Their cost is the bf16
working copy, 2 bytes per parameter beside the 4-byte master (FSDP2 holds only the layers in flight unsharded).

With dtype == master_dtype nothing is attached: the model trains in that dtype exactly as without this module
(`--model.master_dtype=bfloat16 --model.dtype=bfloat16` is pure bf16, chosen knowingly).
"""

from __future__ import annotations

import weakref

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_MASTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: one of {', '.join(DTYPES)}")
    return DTYPES[name]


def param_dtype(model_cfg) -> torch.dtype | None:
    """FSDP2's MixedPrecisionPolicy param_dtype for a ModelConfig: its compute dtype when the masters are wider,
    else None (train in the parameters' own dtype)."""
    return None if model_cfg.dtype == model_cfg.master_dtype else dtype(model_cfg.dtype)


class Masters:
    """fp32 copies of a model's trainable parameters, fed by its gradients and written back after each step."""

    def __init__(self, model: torch.nn.Module, compute: torch.dtype):
        self.names: list[str] = []
        self.working: list[torch.nn.Parameter] = []
        self.masters: list[torch.nn.Parameter] = []
        self.compute = compute
        self._hooks = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            master = torch.nn.Parameter(p.data)  # the master takes over the storage (no copy)
            with torch.no_grad():
                p.data = p.data.to(compute)  # the same Parameter object: modules and later hooks keep seeing it
            self.names.append(name)
            self.working.append(p)
            self.masters.append(master)
            self._hooks.append(p.register_post_accumulate_grad_hook(_mover(master)))

    @torch.no_grad()
    def write_back(self) -> None:
        for w, m in zip(self.working, self.masters):
            w.copy_(m)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.masters))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"master weights: the checkpoint lacks {len(missing)} of them, e.g. {missing[:3]}")
        for name, m in zip(self.names, self.masters):
            if state[name].shape != m.shape:
                raise ValueError(f"master weights: {name} has shape {tuple(state[name].shape)} in the checkpoint, "
                                 f"the model {tuple(m.shape)}")
            m.copy_(state[name])
        self.write_back()


def _mover(master: torch.nn.Parameter):
    def hook(p: torch.Tensor) -> None:
        # the whole backward's gradient of p (autograd sums every use of p before accumulating it): into fp32, once
        if master.grad is None:
            master.grad = p.grad.to(master.dtype)
        else:
            master.grad.add_(p.grad)
        p.grad = None

    return hook


def attach(model: torch.nn.Module, compute: torch.dtype) -> Masters | None:
    """Make `model` (parameters in the master dtype) compute in `compute`, its current parameters becoming the masters.
    No-op (None) when the parameters are already in `compute`. Call before any optimizer is built over the model."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or all(p.dtype == compute for p in params):
        return None
    if model in _MASTERS:
        raise ValueError("precision.attach: this model already has master weights")
    masters = Masters(model, compute)
    _MASTERS[model] = masters
    return masters


def masters(model: torch.nn.Module) -> Masters | None:
    return _MASTERS.get(model)


def trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors that hold the gradients and that the optimizer updates: the fp32 masters when attached, else the
    model's own trainable parameters."""
    m = _MASTERS.get(model)
    return list(m.masters) if m is not None else [p for p in model.parameters() if p.requires_grad]


def after_step(model: torch.nn.Module) -> None:
    """Cast the updated masters into the model's compute-dtype parameters (no-op without masters)."""
    m = _MASTERS.get(model)
    if m is not None:
        m.write_back()


def state_dict(model: torch.nn.Module) -> dict:
    """The model's weights for a trainer checkpoint: the masters by parameter name when attached (plus the
    buffers), else model.state_dict()."""
    m = _MASTERS.get(model)
    if m is None:
        return model.state_dict()
    return {**model.state_dict(), **m.state_dict()}


def load_state_dict(model: torch.nn.Module, state: dict) -> None:
    """Inverse of state_dict: masters (then the working copy cast from them), or model.load_state_dict."""
    model.load_state_dict(state)  # casts into the working copy (and checks names, buffers)
    m = _MASTERS.get(model)
    if m is not None:
        m.load_state_dict(state)


class Weights:
    """The model's weights as a checkpoint part (qlfast/trainer/checkpoint.Checkpointer): the fp32 masters when
    attached, else model.state_dict()."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        return state_dict(self.model)

    def load_state_dict(self, state: dict) -> None:
        load_state_dict(self.model, state)
