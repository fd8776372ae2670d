"""CUDA backend (DESIGN §4): vendor GEMMs and convolutions through ATen (cuBLAS, cuDNN) plus CUDA
kernels for every mask-dependent step, from the extension ``spare_kernels._C_cuda`` (``csrc/cuda``).

The extension defines ``torch.ops.spare_kernels_cuda.<op>`` with the contract of ``reference.py``;
each is registered for CUDA tensors of fp32, fp16 and bf16 activations (fp32 accumulation). It also
holds the GPU top-k (``topk_*`` ops, used by :mod:`spare_kernels.topk`). Nothing here loads the
extension unless a CUDA device is present, so CPU-only use never loads libtorch_cuda's kernels.
Double backward: a ``create_graph`` backward runs the reference formulas (``Entry.double_backward``
False), as for ``cpu`` and ``triton``. Deterministic: the masked paths reduce dA / dB in a fixed order
(no atomics); the vendor GEMMs and convolutions follow ``torch.use_deterministic_algorithms``.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch

from .._version import extension_problem
from .registry import OPS, note_unavailable, register

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LIB = None
_WHY: Optional[str] = None


def _load():
    """``torch.ops.spare_kernels_cuda`` when the extension is built and a GPU is present, else None
    (the reason in :func:`why_unavailable`)."""
    global _LIB, _WHY
    if _LIB is not None or _WHY is not None:
        return _LIB
    if not torch.cuda.is_available():
        _WHY = "no CUDA device"
        return None
    # The record first: importing the extension runs its op registrations, which must not run
    # against another minor release of torch (another C++ ABI).
    problem = extension_problem("_C_cuda")
    if problem is not None:
        _WHY = problem
        return None
    try:
        importlib.import_module("spare_kernels._C_cuda")   # registers torch.ops.spare_kernels_cuda
    except ImportError as e:
        _WHY = (f"{extension_problem('_C_cuda', e)}; reinstall with torch's CUDA build and nvcc on "
                "PATH (pip install -v --no-build-isolation . shows why the build skipped it)")
        return None
    _LIB = torch.ops.spare_kernels_cuda
    return _LIB


def library():
    """The loaded ``torch.ops.spare_kernels_cuda`` namespace, or None."""
    return _load()


def why_unavailable() -> Optional[str]:
    _load()
    return _WHY


def _register() -> None:
    lib = _load()
    if lib is None:
        note_unavailable("cuda", _WHY)
        if torch.cuda.is_available():   # a GPU but no extension: say so once (triton still serves CUDA)
            warnings.warn(f"spare_kernels: the cuda backend is {_WHY}", RuntimeWarning, stacklevel=2)
        return
    for op in OPS:
        # adapters of another dtype (fp64) go to the reference, which accumulates in their precision
        register(op, "cuda", getattr(lib, op), devices=("cuda",), dtypes=DTYPES,
                 adapter_dtypes=None if op.startswith("saliency") else DTYPES)


_register()
