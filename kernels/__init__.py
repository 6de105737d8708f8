"""Triton kernels (installed as `qlfast.kernels`): @triton.jit code and launch helpers only.

No autograd, no config, nothing from qlfast. On a machine without a CUDA GPU the kernels run through Triton's
interpreter: TRITON_INTERPRET must be set before any kernel is decorated, so it is set here when unset.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
