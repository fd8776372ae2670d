"""Builds the optional native extension ``spare_kernels._C`` (flash-attention style switches).

- ``SPARE_KERNELS_BUILD_EXT=0``  skip the extension entirely (pure-PyTorch reference backend).
- ``SPARE_KERNELS_BUILD_CUDA=0`` skip CUDA sources even when torch has CUDA and nvcc is found.
- ``SPARE_KERNELS_NATIVE=0``     do not compile the CPU sources with ``-march=native``.
"""
import glob
import os
import shutil

from setuptools import setup


def _flag(name, default="1"):
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


def _extensions():
    if not _flag("SPARE_KERNELS_BUILD_EXT"):
        print("spare_kernels: SPARE_KERNELS_BUILD_EXT=0, skipping the native extension")
        return [], {}
    cpu_srcs = sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_srcs = sorted(glob.glob("csrc/cuda/*.cu"))
    if not cpu_srcs and not cuda_srcs:
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        print(f"spare_kernels: no C++ compiler ({cxx}) found, skipping the native extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if _flag("SPARE_KERNELS_NATIVE"):
        cxx_flags.append("-march=native")
    with_cuda = (_flag("SPARE_KERNELS_BUILD_CUDA") and bool(cuda_srcs) and torch.version.cuda is not None
                 and CUDA_HOME is not None)
    if with_cuda:
        ext = CUDAExtension(
            "spare_kernels._C", cpu_srcs + cuda_srcs,
            define_macros=[("SPARE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++17"]},
            extra_link_args=["-fopenmp"])
    else:
        if cuda_srcs:
            print("spare_kernels: torch has no CUDA or nvcc is missing, building CPU sources only")
        ext = CppExtension("spare_kernels._C", cpu_srcs, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
