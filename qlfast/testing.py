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


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 600, env: dict | None = None,
                 log=None) -> str:
    """Run `script` under `torchrun --standalone --nproc_per_node=nproc` (gloo on CPU); return its output (stdout and
    stderr interleaved), or raise with the output when it fails or runs past `timeout` seconds.

    Multi-process tests are plain pytest tests that call this with a worker script that asserts on every rank. The
    error shows every distinct Python traceback the ranks printed, then the output's tail (torchrun's own summary
    names no cause); `log`, a path, keeps the whole output. On timeout the workers are stopped too, so that no rank
    lives on into the next test.
    """
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    try:
        out, _ = proc.communicate(timeout=timeout)
        failure = f"failed with exit code {proc.returncode}" if proc.returncode else None
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: torchrun passes it on to its workers (each in a session of its own), waits for them
        # (SIGKILL after 30 s), then exits
        proc.terminate()
        out, _ = proc.communicate()
        failure = f"ran past its {timeout:.0f} s timeout (stopped)"
    if log is not None:
        with open(log, "w") as f:
            f.write(out)
    if failure:
        where = f" (whole output: {log})" if log else ""
        raise AssertionError(f"torchrun {script} {' '.join(args)} {failure}{where}:\n{_tracebacks(out)}\n"
                             f"---- last lines ----\n{out[-6000:]}")
    return out


def _tracebacks(out: str, limit: int = 4) -> str:
    """The distinct Python tracebacks of the ranks in `out` (each up to its exception line), at most `limit`."""
    import re

    blocks, cur = [], None
    for line in out.splitlines():
        body = re.sub(r"^\[rank\d+\]: ?", "", line)  # torchrun prefixes a worker's stderr lines
        if body.startswith("Traceback (most recent call last)"):
            cur = [line]
        elif cur is not None:
            cur.append(line)
            if body and not body[0].isspace():  # the exception line ends the block
                # torchrun's own exceptions (ChildFailedError, SignalException) name no cause
                if "torch.distributed.elastic" not in body and cur not in blocks:
                    blocks.append(cur)
                cur = None
    if not blocks:
        return "(no Python traceback from a rank in the output)"
    return "\n\n".join("\n".join(b) for b in blocks[:limit])


def skip_gpu_items_without_cuda(items) -> None:
    """pytest collection hook body: mark `gpu` tests skipped when no CUDA device is visible."""
    import pytest

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker, not item.keywords: keywords also hold the names of the parent nodes (a checkout in a folder
        # named "gpu" would skip every test)
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


class _StandInDriver:
    """Triton's active driver on a machine without a GPU: names a CUDA target, launches nothing."""

    def __init__(self, capability: int, warp_size: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, warp_size)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def offline_cuda_target(capability: int = 90, warp_size: int = 32):
    """Context manager: Triton compiles for an NVIDIA GPU (default sm_90, Hopper: H100/H200) where none is present.

    Inside it, `jit_fn.warmup(*args, grid=(1,), **constexprs)` runs Triton's whole pipeline (TTIR, TTGIR, LLVM IR,
    PTX, and ptxas to a cubin) and launches nothing, so a CPU machine can check that kernels still compile for the
    GPU and read their IR. The kernels must be JIT functions (TRITON_INTERPRET=0 when they were decorated)."""
    import contextlib

    from triton.runtime import driver

    @contextlib.contextmanager
    def ctx():
        previous = driver._active
        driver.set_active(_StandInDriver(capability, warp_size))
        try:
            yield
        finally:
            driver._active = previous

    return ctx()


def one_triton_config():
    """An autouse pytest fixture for kernel test modules (`_one_config = one_triton_config()`): the Triton kernels
    launch the first config of their autotune list (QLFAST_TRITON_AUTOTUNE=0) instead of compiling and timing every
    config at every new shape: one compile per kernel on a GPU. tests/test_triton_configs.py checks every config."""
    import pytest

    @pytest.fixture(autouse=True)
    def _fixture(monkeypatch):
        monkeypatch.setenv("QLFAST_TRITON_AUTOTUNE", "0")

    return _fixture
