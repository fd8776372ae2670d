"""Native CPU backend: the C++ kernels of ``csrc/cpu`` (extension ``spare_kernels._C``).

The C++ side defines ``torch.ops.spare_kernels_cpu.<op>`` with exactly the backend contract of
``reference.py``. Each is registered here for CPU tensors of the dtypes it handles (fp32, bf16
activations); any other dtype (fp64 gradcheck, fp16) goes to the reference, the oracle.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from . import reference
from .registry import OPS, note_unavailable, register

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)

try:
    _C = importlib.import_module("spare_kernels._C")  # registers torch.ops.spare_kernels_cpu
except ImportError as e:  # built with SPARE_KERNELS_BUILD_EXT=0, or no compiler
    _C = None
    _why = f"the native extension spare_kernels._C is not built ({e})"
    note_unavailable("cpu", _why)
    warnings.warn(f"spare_kernels: {_why}; using the pure-PyTorch reference backend on CPU. "
                  "Reinstall with a C++ compiler (and SPARE_KERNELS_BUILD_EXT unset) for the fast kernels.",
                  RuntimeWarning, stacklevel=2)


def _wrap(op):
    native = getattr(torch.ops.spare_kernels_cpu, op)
    fallback = getattr(reference, op)
    # The activation's position: after the accumulator (saliency) or dy (backward), else first.
    pos = 1 if op.startswith("saliency") or op.endswith("_backward") else 0

    def impl(*args):
        a = args[pos]
        if a.dtype in _KERNEL_DTYPES:
            return native(*args)
        return fallback(*args)

    impl.__name__ = f"cpu_{op}"
    # The op's C++ autograd twin (native kernels forward and backward, no Python per call), used by
    # ops/masked_lora.py for eager calls this implementation would send to the native kernel.
    impl.autograd_twin = getattr(torch.ops.spare_kernels_cpu, f"{op}_autograd", None)
    impl.twin_dtypes = _KERNEL_DTYPES
    impl.native = True
    return impl


if _C is not None:
    for _op in OPS:
        if hasattr(torch.ops.spare_kernels_cpu, _op):
            register(_op, "cpu", devices=("cpu",))(_wrap(_op))
