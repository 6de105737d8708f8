"""Test helpers shared by qlfast's tests and usable by projects that test their own kernels the same way.

The rule (flash-attention, attention-gym, Cut Cross-Entropy): compare against a float64 reference and require the
kernel's error to be at most a small multiple of the error of eager torch in the same dtype.
"""

from __future__ import annotations

import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (ref's norm floored so an all-zero reference is not a division by zero)."""
    x64, r64 = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x64).all():
        return float("inf")
    return ((x64 - r64).norm() / r64.norm().clamp_min(1e-30)).item()


def assert_close_vs_ref(name: str, got: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, *,
                        mult: float = 4.0, floor: float | None = None) -> None:
    """Assert rel_err(got) <= mult * max(rel_err(eager), floor); floor defaults to the dtype's epsilon."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    e_got, e_eager = rel_err(got, ref64), rel_err(eager, ref64)
    if floor is None:
        floor = torch.finfo(eager.dtype if eager.is_floating_point() else torch.float32).eps
    bound = mult * max(e_eager, floor)
    assert e_got <= bound, f"{name}: rel err {e_got:.3e} > {mult} x eager {e_eager:.3e} (bound {bound:.3e})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that an element the kernel forgot to write fails the comparison."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 600, env: dict | None = None) -> str:
    """Run `script` under `torchrun --standalone --nproc_per_node=nproc` (gloo on CPU); raise with its output on error.

    Multi-process tests are plain pytest tests that call this with a worker script that asserts on every rank.
    """
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed with exit code {proc.returncode}:\n{out[-8000:]}")
    return out


def skip_gpu_items_without_cuda(items) -> None:
    """pytest collection hook body: mark `gpu` tests skipped when no CUDA device is visible."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
