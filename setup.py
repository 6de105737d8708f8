"""Builds qlfast._C from csrc/ when the installed torch has CUDA and nvcc is found; otherwise pure Python.

Metadata lives in pyproject.toml; this file decides about the extension and lists the packages: every folder under
qlfast/ (found, not listed by hand, so a new subpackage cannot be left out of the wheel) and kernels/, installed as
qlfast.kernels. Never as a top-level `kernels`: that name belongs to Hugging Face's `kernels` package, which
transformers imports when it finds it.
Set QLFAST_BUILD_CUDA=0 to skip the extension, =1 to require it.
"""

import glob
import os
import sys

from setuptools import find_namespace_packages, setup


def _cublas(cuda_home):
    """(include_dirs, library_dirs, libraries, link_args) for cuBLAS: the toolkit's, else the nvidia-cublas wheel's.

    CUDA torch wheels depend on the nvidia-cublas pip package; a toolkit installed without cuBLAS development files
    still builds against that package's headers and its versioned libcublas.so.N (torch has loaded it already).
    """
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return [], [], ["cublas"], []
    for root in sys.path:
        for header in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include", "cublas_v2.h"))):
            pkg = os.path.dirname(os.path.dirname(header))
            libs = sorted(glob.glob(os.path.join(pkg, "lib", "libcublas.so*")))
            if not libs:
                continue
            plain = os.path.join(pkg, "lib", "libcublas.so")
            if plain in libs:
                return [os.path.dirname(header)], [os.path.dirname(plain)], ["cublas"], []
            return [os.path.dirname(header)], [], [], [libs[0], f"-Wl,-rpath,{os.path.dirname(libs[0])}"]
    raise SystemExit(f"qlfast: cuBLAS headers not found in {cuda_home}/include nor in an nvidia-cublas wheel")


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
        include_dirs, library_dirs, libraries, link_args = _cublas(CUDA_HOME)
        # No -std flag: BuildExtension adds the one the installed torch's headers need (C++17 or C++20).
        ext = CUDAExtension(
            "qlfast._C",
            sources=sources,
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            libraries=libraries,
            extra_link_args=link_args,
            extra_compile_args={
                "cxx": ["-O3"],
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", *arch.split()],
            },
        )
        return [ext], {"build_ext": BuildExtension}, None
    if want == "1":
        raise SystemExit(f"qlfast: QLFAST_BUILD_CUDA=1 but {reason}")
    return [], {}, reason


ext_modules, cmdclass, skipped = _cuda_extension()
if skipped:
    print(f"qlfast: building without the CUDA extension qlfast._C ({skipped}); Triton and torch backends only.",
          file=sys.stderr)



def _packages() -> tuple[list[str], dict[str, str]]:
    """(packages, package_dir): qlfast and every folder below it, and kernels/ (and its folders) as qlfast.kernels."""
    skip = ["*__pycache__*", "*.egg-info"]
    qlfast = find_namespace_packages(include=["qlfast", "qlfast.*"], exclude=skip)
    kernels = ["qlfast.kernels"] + [f"qlfast.kernels.{p}" for p in find_namespace_packages("kernels", exclude=skip)]
    return qlfast + kernels, {"qlfast.kernels": "kernels"}


packages, package_dir = _packages()
setup(ext_modules=ext_modules, cmdclass=cmdclass, packages=packages, package_dir=package_dir)
