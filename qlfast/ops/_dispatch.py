"""Backend dispatch shared by all ops: one table per op, one rule for `backend="auto"`.

Each op declares its backends in a `Table`: for every device type, the backends that run there, fastest first by
measurement (the table's comment cites the docs/perf page and rows that set the order). The one rule:

    auto = the first backend listed for the tensors' device type that is available here (its package or the
           compiled extension is present) and supports these inputs (head dim, dtype, layout, ...).

A backend whose speed was never measured against the one before it goes after it, so `auto` never switches to an
unmeasured backend because it was built. An explicit backend must be one of the op's names; if it cannot run on
these tensors the error says why and what to use. The torch reference runs everywhere and supports everything, so
`auto` always finds a backend.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def cuda_ext():
    """The compiled extension qlfast._C, or None when it was not built (no CUDA torch or no nvcc)."""
    try:
        from qlfast import _C  # noqa: F401
    except ImportError:
        return None
    return _C


def has_cuda_op(name: str) -> bool:
    if cuda_ext() is None:
        return False
    return hasattr(torch.ops.qlfast, name)


def _always(**_) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One implementation of an op: where it runs, whether it is installed, which inputs it takes."""

    name: str
    devices: tuple[str, ...]
    """Device types (torch.device.type) it runs on."""
    available: Callable[[], str | None] = lambda: None
    """None when it can run on this machine, else the reason (e.g. 'the triton package is not installed')."""
    supports: Callable[..., str | None] = field(default=_always)
    """supports(**inputs) -> None when it takes these inputs, else the reason; inputs are the op's own keywords."""


def triton_backend(*devices: str, supports=_always) -> Backend:
    return Backend("triton", devices, lambda: None if has_triton() else "the triton package is not installed",
                   supports)


def cuda_backend(cuda_op: str, supports=_always) -> Backend:
    def available():
        if has_cuda_op(cuda_op):
            return None
        return (f"it needs the qlfast._C extension with torch.ops.qlfast.{cuda_op}; reinstall on a machine with "
                "CUDA torch and nvcc")

    return Backend("cuda", ("cuda",), available, supports)


TORCH = Backend("torch", ("cpu", "cuda"))


class Table:
    """The backends of one op. `order[device_type]` lists backend names fastest first."""

    def __init__(self, op: str, backends: list[Backend], order: dict[str, tuple[str, ...]]):
        self.op = op
        self.backends = {b.name: b for b in backends}
        self.order = order
        for dev, names in order.items():
            for n in names:
                if n not in self.backends or dev not in self.backends[n].devices:
                    raise ValueError(f"{op}: order lists {n!r} for {dev}, which it does not run on")

    @property
    def names(self) -> tuple[str, ...]:
        return ("auto", *self.backends)

    def resolve(self, backend: str, device: torch.device, **inputs) -> str:
        """The concrete backend for `backend` ("auto" or a name) on `device` with these inputs; ValueError if none."""
        if backend not in self.backends and backend != "auto":
            raise ValueError(f"{self.op}: backend must be one of {self.names}, got {backend!r}")
        dev = torch.device(device).type
        if backend == "auto":
            why = []
            for name in self.order.get(dev, ()):
                b = self.backends[name]
                reason = b.available() or b.supports(**inputs)
                if reason is None:
                    return name
                why.append(f"{name}: {reason}")
            raise ValueError(f"{self.op}: no backend runs on {dev} tensors here ({'; '.join(why) or 'none listed'})")
        b = self.backends[backend]
        if dev not in b.devices:
            needs = " or ".join(f"{d.upper() if d == 'cuda' else d} tensors" for d in b.devices)
            raise ValueError(f"{self.op}: backend={backend!r} needs {needs}, got device {dev}")
        reason = b.available() or b.supports(**inputs)
        if reason is not None:
            raise ValueError(f"{self.op}: backend={backend!r} cannot run here: {reason}")
        return backend
