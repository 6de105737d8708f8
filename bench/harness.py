"""The shared benchmark harness: time an op, take its peak memory, append one row per measurement.

Rows go to bench/results/<device>-<date>.jsonl (one JSON object per line; QLFAST_BENCH_RESULTS=DIR elsewhere,
QLFAST_BENCH_ROWS=FILE into one file) with the device name, commit (QLFAST_COMMIT where the copy has no .git), date,
torch / triton / CUDA driver versions, op, provider, shape, mode, median time, TFLOP/s when FLOPs are given, and
peak memory; callers add the backend that ran and the autotune config it chose. CPU rows go to files named cpu-*
that git ignores: only GPU runs are committed.

Independence: `free_device_memory()` (collect garbage, empty the CUDA cache) runs before every bench item
(bench/conftest.py) and before any free-memory reading, and `guarded()` runs a callable so that an out-of-memory
error leaves no frame (and so no tensor) of it alive: an item never inherits the memory of the one before.

Timing: on CUDA, events around the call after warm-up, median of repeats (the same method as triton's do_bench);
on CPU, perf_counter. Peak memory: torch.cuda.max_memory_allocated above the baseline on CUDA; on CPU the peak RSS
above the baseline (VmHWM, reset through /proc/self/clear_refs).
"""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import json
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def real_sizes() -> bool:
    """Real model sizes on a GPU, small ones elsewhere; QLFAST_BENCH_SIZE=small|real overrides."""
    size = os.environ.get("QLFAST_BENCH_SIZE")
    if size is not None:
        return size == "real"
    return torch.cuda.is_available()


@functools.cache
def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


@functools.cache
def commit() -> str:
    """QLFAST_COMMIT when set (the GPU machine's copy has no .git: the caller passes the commit in), else git's."""
    if os.environ.get("QLFAST_COMMIT"):
        return os.environ["QLFAST_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=RESULTS.parent, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=RESULTS.parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("QLFAST_COMMIT", "unknown")
    sha = sha or os.environ.get("QLFAST_COMMIT", "unknown")
    return sha + ("-dirty" if dirty else "")


@functools.cache
def versions() -> dict:
    """torch, triton, CUDA runtime and driver versions (QLFAST_DRIVER or nvidia-smi; "none" without a GPU)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    driver = os.environ.get("QLFAST_DRIVER")
    if driver is None and torch.cuda.is_available():
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = "unknown"
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda or "none",
            "driver": driver or "none"}


def free_device_memory() -> None:
    """Drop what the previous measurement left: unreachable frames and tensors, then the CUDA caching allocator's
    free blocks (so that mem_get_info reads what is really free)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def free_bytes() -> int:
    """Free device memory after free_device_memory() (0 without a GPU)."""
    if not torch.cuda.is_available():
        return 0
    free_device_memory()
    return torch.cuda.mem_get_info()[0]


def guarded(fn, *args, **kwargs):
    """fn(*args, **kwargs) -> (result, None), or (None, message) on an out-of-memory error. The exception and its
    traceback (which holds fn's frames and their tensors) are gone when this returns, and the memory is freed."""
    try:
        return fn(*args, **kwargs), None
    except torch.OutOfMemoryError as e:  # (torch.cuda.OutOfMemoryError is the same class)
        message = str(e).splitlines()[0][:200] if str(e) else "out of memory"
    free_device_memory()
    return None, message


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss_peak_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _proc_status_bytes(key: str) -> int:
    """A memory line of /proc/self/status (VmHWM: peak RSS, VmRSS: current RSS) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn, *, warmup: int = 2, rep: int = 5, min_time_s: float = 0.0) -> dict:
    """Run fn() warmup times, then rep times (more if min_time_s asks); return median/min ms and peak extra bytes."""
    on_gpu = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    t_start = time.perf_counter()
    while len(times) < rep or (time.perf_counter() - t_start < min_time_s and len(times) < 1000):
        if on_gpu:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    # peak memory from one more call, measured above what is live before it
    if on_gpu:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _proc_status_bytes("VmRSS")
        _rss_peak_reset()
        fn()
        peak = max(0, _proc_status_bytes("VmHWM") - base)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "reps": len(times), "peak_bytes": peak}


def record(op: str, provider: str, shape: dict, mode: str, stats: dict, *, flops: float | None = None,
           extra: dict | None = None) -> dict:
    """Append one result row to bench/results/ and return it."""
    row = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "commit": commit(),
        **versions(),
        "op": op,
        "provider": provider,
        "mode": mode,
        "shape": shape,
        "median_ms": round(stats["median_ms"], 4),
        "min_ms": round(stats["min_ms"], 4),
        "reps": stats["reps"],
        "peak_mem_mib": round(stats["peak_bytes"] / 2**20, 2),
    }
    if flops is not None:
        row["tflops"] = round(flops / (stats["median_ms"] * 1e-3) / 1e12, 2)
    if extra:
        row.update(extra)
    write_row(row)
    return row


def write_row(row: dict) -> None:
    """Append one row: to QLFAST_BENCH_ROWS (a file) if set, else bench/results/ (or QLFAST_BENCH_RESULTS)."""
    if os.environ.get("QLFAST_BENCH_ROWS"):
        path = Path(os.environ["QLFAST_BENCH_ROWS"])
        path.parent.mkdir(parents=True, exist_ok=True)
    else:
        out_dir = Path(os.environ.get("QLFAST_BENCH_RESULTS", RESULTS))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{_slug(device_name())}-{row['date'][:10]}.jsonl"
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()


def bench(benchmark, op: str, provider: str, shape: dict, mode: str, fn, *, flops: float | None = None,
          warmup: int = 2, rep: int = 5, extra: dict | None = None) -> dict:
    """Measure fn with the harness, record the row, and hand pytest-benchmark one timed call for its table."""
    stats = measure(fn, warmup=warmup, rep=rep)
    row = record(op, provider, shape, mode, stats, flops=flops, extra=extra)
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: (fn(), _sync()), rounds=1, iterations=1)
    return row
