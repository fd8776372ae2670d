"""How the ops meet ``torch.autocast``: as ``F.linear`` / ``F.conv2d`` do on the way in (``x``, weight
and bias cast to the autocast dtype; the adapters keep theirs, so fp32 adapters under bf16 activations
keep their precision), and never inside: the kernels and backward formulas choose their own precision
(fp32 work under bf16 activations), which autocast would cast down, also in a backward called inside
an autocast region. The C++ kernels guard themselves (``NoAutocast`` in ``csrc/cpu/spare_cpu.h``), the
reference backend runs under :func:`off`, and so do the ops' Python backward formulas."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor


# One call (~0.1 µs) answers the common case, autocast off everywhere, on every layer call.
_any_on = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for ``x``'s device, or None when autocast is off there."""
    if not _any_on():
        return None
    dev = x.device.type
    if not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return None
    return torch.get_autocast_dtype(dev)


def cast(dt: torch.dtype, *tensors):
    """What autocast does to ``F.linear``'s inputs: floating tensors other than fp64 to ``dt``."""
    return tuple(t.to(dt) if t is not None and t.is_floating_point() and t.dtype not in (dt, torch.float64)
                 else t for t in tensors)


def off(x: Tensor):
    """Autocast off for ``x``'s device, if it is on there."""
    if dtype(x) is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def call(fn, dt: torch.dtype, x: Tensor, weight: Tensor, bias, *args):
    """``fn(x, weight, bias, *args)`` with the three cast to ``dt`` (see :func:`cast`) and autocast
    off: what a layer does under autocast, after :func:`dtype` returned ``dt``."""
    x, weight, bias = cast(dt, x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        return fn(x, weight, bias, *args)
