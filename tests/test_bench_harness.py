"""bench/harness.py keeps every bench item independent of the one before: an out-of-memory error caught by guarded()
leaves no frame of the failed call alive (so its tensors are freed before the next item measures free memory), and
rows carry the commit and versions the GPU rows need."""

from __future__ import annotations

import gc
import json
import sys
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import harness  # noqa: E402


def test_guarded_oom_leaves_no_tensor_alive():
    refs = []

    def step():
        activations = torch.empty(1 << 20)  # held by this frame when the error is raised
        refs.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 128.00 GiB")

    gc.disable()  # the frames must go by reference counting alone, not by a later collection
    try:
        result, oom = harness.guarded(step)
        alive = refs[0]() is not None
    finally:
        gc.enable()
    assert result is None and oom.startswith("CUDA out of memory")
    assert not alive, "the failed call's tensor is still alive after guarded() returned"
    assert harness.guarded(lambda x: x + 1, 2) == (3, None)


def test_rows_carry_commit_and_versions(tmp_path, monkeypatch):
    monkeypatch.setenv("QLFAST_BENCH_ROWS", str(tmp_path / "rows.jsonl"))
    monkeypatch.setenv("QLFAST_COMMIT", "abc123")
    harness.commit.cache_clear()
    try:
        row = harness.record("op", "prov", {"N": 1}, "fwd", {"median_ms": 2.0, "min_ms": 1.0, "reps": 3,
                                                             "peak_bytes": 0}, extra={"backend": "triton"})
    finally:
        harness.commit.cache_clear()
    (saved,) = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert saved == row and row["commit"] == "abc123" and row["backend"] == "triton"
    for key in ("torch", "triton", "cuda", "driver", "device", "date"):
        assert key in row
    assert harness.free_bytes() == 0 or torch.cuda.is_available()
