"""The host harness of the CUDA kernels (csrc/harness): their __host__ __device__ per-thread bodies
compiled by the host C++ compiler and driven over small grids (csrc/common/launch.h), as the ops of
``torch.ops.spare_harness``. Built once per checkout into ``.cache/harness`` (ninja; ~1 min cold)."""
from __future__ import annotations

import functools
import glob
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def harness():
    from torch.utils.cpp_extension import load
    build = os.path.join(ROOT, ".cache", "harness")
    os.makedirs(build, exist_ok=True)
    load(name="spare_harness", sources=sorted(glob.glob(os.path.join(ROOT, "csrc", "harness", "*.cpp"))),
         extra_include_paths=[os.path.join(ROOT, "csrc")], extra_cflags=["-O2", "-std=c++17"],
         build_directory=build, is_python_module=False, verbose=False)
    return torch.ops.spare_harness
