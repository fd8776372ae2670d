"""Argument checks shared by the public op wrappers: errors name the argument, expected vs got."""
from __future__ import annotations

import math
import numbers

import torch

from .. import maskfmt as fmt
from ..masks import as_mask

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name, t, *, dim=None, dtype=None, floating=True, op=""):
    pre = f"{op}: " if op else ""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{pre}{name}: expected a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{pre}{name}: expected a floating-point tensor, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{pre}{name}: expected dtype {dtype}, got {t.dtype}")
    if dim is not None and t.dim() not in ((dim,) if isinstance(dim, int) else dim):
        raise ValueError(f"{pre}{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    return t


def shape(name, t, expected, what="", op=""):
    """``expected`` may hold ``None`` for a free dim."""
    got = tuple(t.shape)
    if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
        exp = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        pre = f"{op}: " if op else ""
        raise ValueError(f"{pre}{name}: expected shape {exp}{what}, got {got}")


def same_device(op, ref_name, ref, **others):
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name}: expected device {ref.device} (that of {ref_name}), got {t.device}")


def scale(op, s, name="scale"):
    """A finite real ``s`` as a float: a NaN or infinite scale would poison every output (and the
    backends disagree on how), so it is refused by name."""
    pre = f"{op}: " if op else ""
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise TypeError(f"{pre}{name}: expected a real number, got {type(s).__name__}")
    if not math.isfinite(s):
        raise ValueError(f"{pre}{name}: expected a finite number, got {s!r}")
    return float(s)


def wire_mask(op, mask, weight):
    """Any accepted ``mask=`` (None, a ``Mask``, a bool/uint8 tensor of the weight's shape) -> wire tuple."""
    if mask is None:
        return None, fmt.NONE, 0, 0
    if (isinstance(mask, torch.Tensor) and mask.dtype in (torch.bool, torch.uint8) and mask.shape == weight.shape
            and mask.device == weight.device):
        # a per-call dense mask, packed straight to the wire (what Mask.from_dense stores, without its
        # separate `!= 0` pass over a bool mask); anything else gets as_mask's checks and errors
        return fmt.pack_bits(mask.reshape(weight.shape[0], math.prod(weight.shape[1:]))), fmt.ELEMENT, 0, 0
    m = as_mask(mask, weight.shape, name="mask", op=op)
    if m.device != weight.device:
        raise ValueError(f"{op}: mask: expected device {weight.device} (that of weight), got {m.device}")
    return m.wire()


def pair(op, name, v):
    if isinstance(v, int) and not isinstance(v, bool):
        return [v, v]
    if (isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        return [int(v[0]), int(v[1])]
    raise ValueError(f"{op}: {name}: expected an int or a pair of ints, got {v!r}")
