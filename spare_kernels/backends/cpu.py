"""Native CPU backend: the C++ kernels of ``csrc/cpu`` (extension ``spare_kernels._C``).

The C++ side defines ``torch.ops.spare_kernels_cpu.<op>`` with exactly the backend contract of
``reference.py``. Each is registered for CPU tensors of the activation dtypes the kernels handle
(fp32, bf16) and adapters (fp32, bf16); the registry sends any other dtype (fp64 gradcheck, fp16) to
the reference.
"""
from __future__ import annotations

import importlib
import warnings

import torch

from .._version import extension_problem
from .registry import OPS, note_unavailable, register

# The kernels widen bf16 on load and compute in fp32; fp16 and fp64 are not compiled.
DTYPES = (torch.float32, torch.bfloat16)


def _load():
    """``(spare_kernels._C, None)``, or ``(None, why it is not used)``."""
    # The record first: importing the extension runs its op registrations, which must not run
    # against another minor release of torch (another C++ ABI).
    why = extension_problem("_C")
    if why is not None:
        return None, why
    try:
        return importlib.import_module("spare_kernels._C"), None   # registers torch.ops.spare_kernels_cpu
    except ImportError as e:  # built with SPARE_KERNELS_BUILD_EXT=0, no compiler, or against another torch
        return None, extension_problem("_C", e)


_C, _why = _load()
if _C is None:
    note_unavailable("cpu", _why)
    warnings.warn(f"spare_kernels: the cpu backend is unavailable ({_why}); using the pure-PyTorch reference backend on CPU. "
                  "Reinstall with a C++ compiler (and SPARE_KERNELS_BUILD_EXT unset) for the fast kernels.",
                  RuntimeWarning, stacklevel=2)



def library():
    """The loaded ``torch.ops.spare_kernels_cpu`` namespace, or None (the extension is not usable)."""
    return torch.ops.spare_kernels_cpu if _C is not None else None


if _C is not None:
    _lib = torch.ops.spare_kernels_cpu
    for _op in OPS:
        # The C++ autograd twins of the forward ops (csrc/cpu/autograd.cpp) run these forward and
        # backward kernels with no Python per call (a create_graph backward: the reference formulas);
        # both entries of a pair name the twin.
        _fwd = _op[:-len("_backward")] if _op.endswith("_backward") else _op
        register(_op, "cpu", getattr(_lib, _op), devices=("cpu",), dtypes=DTYPES,
                 adapter_dtypes=None if _op.startswith("saliency") else DTYPES,
                 autograd_twin=getattr(_lib, f"{_fwd}_autograd", None))
