import os

import torch

# Triton kernels run on CPU through the interpreter; it must be on before any kernel is decorated.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from qlfast.testing import skip_gpu_items_without_cuda  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu_items_without_cuda(items)
