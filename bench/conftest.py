import os
import sys
from pathlib import Path

import pytest
import torch

from qlfast.testing import skip_gpu_items_without_cuda

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402  (bench/ is on the path from here on)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped cleanly without one)")


def pytest_collection_modifyitems(config, items):
    skip_gpu_items_without_cuda(items)


@pytest.fixture(autouse=True)
def _independent_items():
    """Every bench item starts from the memory it needs, not what the previous item left (a caught OOM's frames, the
    caching allocator's free blocks)."""
    harness.free_device_memory()
    yield
    harness.free_device_memory()
