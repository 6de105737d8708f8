"""Backend selection shared by all ops: `backend="auto"` picks the fastest available for the tensors' device."""

from __future__ import annotations

import functools
import importlib.util

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")


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


def resolve(backend: str, device: torch.device, *, cuda_op: str | None = None, op: str = "op") -> str:
    """Map a requested backend to a concrete one and check that it can run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    on_gpu = device.type == "cuda"
    if backend == "auto":
        if on_gpu and cuda_op is not None and has_cuda_op(cuda_op):
            return "cuda"
        if on_gpu and has_triton():
            return "triton"
        # On CPU the Triton interpreter is correct but slow: the chunked torch reference is the fast path.
        return "torch"
    if backend == "cuda":
        if not on_gpu:
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got device {device}")
        if cuda_op is None or not has_cuda_op(cuda_op):
            raise ValueError(f"{op}: backend='cuda' needs the qlfast._C extension with torch.ops.qlfast.{cuda_op}; "
                             "reinstall on a machine with CUDA torch and nvcc")
    if backend == "triton" and not has_triton():
        raise ValueError(f"{op}: backend='triton' needs the triton package")
    return backend
