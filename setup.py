"""Builds r1kernels._C: the C++ sources (csrc/*.cpp) always; the CUDA ones (csrc/cuda/*.cu and their
*_launch.cpp bindings) when torch has CUDA. Env: R1K_SKIP_CUDA_BUILD=1, R1K_CUDA_ARCHS="9.0;9.0a"
(-> TORCH_CUDA_ARCH_LIST), MAX_JOBS (ninja parallelism), R1K_SKIP_BUILD=1 (pure-Python install)."""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("R1K_SKIP_BUILD", "0") != "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp"))
    with_cuda = torch.version.cuda is not None and os.environ.get("R1K_SKIP_CUDA_BUILD", "0") != "1"
    cxx = ["-O3", "-std=c++17"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("R1K_CUDA_ARCHS", "9.0"))
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_launch.cpp"))
        ext = CUDAExtension(
            "r1kernels._C", sources, include_dirs=[os.path.abspath("csrc")],
            define_macros=[("R1K_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]})
    else:
        ext = CppExtension("r1kernels._C", sources, include_dirs=[os.path.abspath("csrc")],
                           extra_compile_args={"cxx": cxx})
    ext_modules, cmdclass = [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
