"""Builds qlfast._C from csrc/ when the installed torch has CUDA and nvcc is found; otherwise pure Python.

All metadata lives in pyproject.toml; this file only decides about the extension.
Set QLFAST_BUILD_CUDA=0 to skip the extension, =1 to require it.
"""

import glob
import os
import sys

from setuptools import setup


def _cuda_extension():
    want = os.environ.get("QLFAST_BUILD_CUDA", "auto")
    if want == "0":
        return [], {}, "QLFAST_BUILD_CUDA=0"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}, "torch is not installed in the build environment"
    if torch.version.cuda is None:
        reason = f"torch {torch.__version__} has no CUDA"
    elif CUDA_HOME is None:
        reason = "nvcc was not found (set CUDA_HOME)"
    else:
        sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
        if not sources:
            return [], {}, "csrc/ has no sources"
        arch = os.environ.get("QLFAST_CUDA_ARCH", "-gencode=arch=compute_90a,code=sm_90a")
        ext = CUDAExtension(
            "qlfast._C",
            sources=sources,
            extra_compile_args={
                "cxx": ["-O3", "-std=c++17"],
                "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", *arch.split()],
            },
            libraries=["cublas", "cublasLt"],
        )
        return [ext], {"build_ext": BuildExtension}, None
    if want == "1":
        raise SystemExit(f"qlfast: QLFAST_BUILD_CUDA=1 but {reason}")
    return [], {}, reason


ext_modules, cmdclass, skipped = _cuda_extension()
if skipped:
    print(f"qlfast: building without the CUDA extension qlfast._C ({skipped}); Triton and torch backends only.",
          file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
