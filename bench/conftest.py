import os
import sys
from pathlib import Path

import torch

from qlfast.testing import skip_gpu_items_without_cuda

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped cleanly without one)")


def pytest_collection_modifyitems(config, items):
    skip_gpu_items_without_cuda(items)
