"""Triton GPU backend (DESIGN §4): fused masked LoRA and saliency kernels.

Registers the launchers of ``linear.py``, ``conv.py`` and ``saliency.py`` (signatures of
``backends/reference.py``) for CUDA tensors of fp32, fp16 and bf16 activations. Under
``TRITON_INTERPRET=1`` (set before spare_kernels first runs an op) the same kernels also serve CPU tensors
when the backend is forced (``SPARE_KERNELS_BACKEND=triton``): Triton's interpreter runs them, which is how
this backend is tested on machines without a GPU; it is never picked by default there. Nothing here
imports triton unless there is a CUDA device or the interpreter is on, so ``import spare_kernels`` and
CPU-only use never load it. ``python -m spare_kernels.backends.triton.aot`` compiles every kernel
ahead of time. Double backward: a ``create_graph`` backward runs the reference formulas (the kernels are
not differentiable; ``Entry.double_backward`` False).
"""
from __future__ import annotations

import importlib
import os

import torch

from ..registry import OPS, note_unavailable, register

MIN_VERSION = (3, 6)   # the GPU machines in use run triton 3.6 with torch 2.11
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# op -> (module, launcher): the kernels' files, one per op family
_LAUNCHERS = {
    "masked_lora_linear": ("linear", "masked_lora_linear"),
    "masked_lora_linear_backward": ("linear", "masked_lora_linear_backward"),
    "masked_lora_conv2d": ("conv", "masked_lora_conv2d"),
    "masked_lora_conv2d_backward": ("conv", "masked_lora_conv2d_backward"),
    "saliency_linear": ("saliency", "saliency_linear"),
    "saliency_conv2d": ("saliency", "saliency_conv2d"),
}


def interpreting() -> bool:
    """``TRITON_INTERPRET`` as triton itself parses it."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def _version(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def _why_not() -> str | None:
    """Why the backend cannot load here, or None."""
    if not (torch.cuda.is_available() or interpreting()):
        return ("no CUDA device (TRITON_INTERPRET=1, set before the first op, runs the kernels on CPU tensors "
                "through Triton's interpreter when the backend is forced)")
    try:
        triton = importlib.import_module("triton")
    except ImportError as e:
        return f"not installed: triton cannot be imported ({e}); pip install 'triton>={'.'.join(map(str, MIN_VERSION))}'"
    if _version(triton.__version__) < MIN_VERSION:
        return f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_VERSION))}"
    return None


def _register() -> None:
    why = _why_not()
    if why is not None:
        note_unavailable("triton", why)
        return
    cpu = ("cpu",) if interpreting() else ()
    for op in OPS:
        module, name = _LAUNCHERS[op]
        try:
            fn = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        except (ImportError, AttributeError):
            continue   # an op family whose kernels are not in this version: the registry falls back
        register(op, "triton", fn, devices=("cuda",), forced_devices=cpu, dtypes=DTYPES)


_register()
