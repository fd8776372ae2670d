"""Saliency statistics of a weight from one backward pass (DESIGN §1), defined once.

The first dim of ``x`` / ``grad_out`` is the sample; the rest (tokens, pixels) are summed within a
sample into its gradient ``g_i``. Statistics are fp32 of the weight's shape:
``grad_abs`` ``|Σ g_i|``, ``signed`` ``Σ g_i``, ``sample_abs`` ``Σ |g_i|``, ``sample_sq`` ``Σ g_i²``.
The ``sample_*`` statistics never hold per-sample gradients for the whole batch.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..backends import registry
from . import _checks as chk
from .masked_lora import _conv_out_hw, conv_args

STATS = ("grad_abs", "signed", "sample_abs", "sample_sq")


def table_key(stat: str, weight_shape: Sequence[int], x: Tensor) -> str:
    """The GPU table's key of a call (registry.lookup): stat, out, cols, samples, tokens (or pixels) per
    sample rounded up to a power of two."""
    per_sample = x.shape[1] if x.dim() == 3 else x.shape[2] * x.shape[3]
    return registry.shape_key(stat, weight_shape[0], math.prod(weight_shape[1:]), x.shape[0],
                              registry.tokens_bucket(per_sample))


def _impl(op: str, acc: Tensor, x: Tensor, stat: str):
    # the key only where a measured GPU table lists this op: no per-call work otherwise
    shape = table_key(stat, acc.shape, x) if x.device.type == "cuda" and op in registry.gpu_table() else None
    return registry.lookup(op, x.device.type, x.dtype, None, shape).fn


@torch.library.custom_op("spare_kernels::saliency_linear", mutates_args=("acc",))
def _sal_linear(acc: Tensor, x: Tensor, dy: Tensor, stat: str) -> None:
    _impl("saliency_linear", acc, x, stat)(acc, x, dy, stat)


@_sal_linear.register_fake
def _(acc, x, dy, stat):
    return None


@torch.library.custom_op("spare_kernels::saliency_conv2d", mutates_args=("acc",))
def _sal_conv(acc: Tensor, x: Tensor, dy: Tensor, stat: str, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], groups: int) -> None:
    _impl("saliency_conv2d", acc, x, stat)(acc, x, dy, stat, stride, padding, dilation, groups)


@_sal_conv.register_fake
def _(acc, x, dy, stat, stride, padding, dilation, groups):
    return None


def _check_stat(op, stat):
    if stat not in STATS:
        raise ValueError(f"{op}: stat: expected one of {STATS}, got {stat!r}")


def _check_out(op, out, shape, device):
    if out is None:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    chk.tensor("out", out, dtype=torch.float32, op=op)
    chk.shape("out", out, tuple(shape), " (the weight's shape)", op=op)
    if out.device != device:
        raise ValueError(f"{op}: out: expected device {device}, got {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: out: expected a contiguous tensor")
    return out


def saliency_linear(x: Tensor, grad_out: Tensor, stat: str = "sample_abs", out: Optional[Tensor] = None) -> Tensor:
    """Saliency of a Linear weight ``(out_features, in_features)``.

    ``x`` ``(S, ..., in)``, ``grad_out`` ``(S, ..., out)`` with the same middle dims. Returns fp32
    ``(out, in)``; with ``out=`` given, accumulates into it (``out += stat``) and returns it.
    """
    op = "saliency_linear"
    _check_stat(op, stat)
    chk.tensor("x", x, op=op)
    chk.tensor("grad_out", grad_out, dtype=x.dtype, op=op)
    if x.dim() < 2:
        raise ValueError(f"{op}: x: expected shape (S, ..., in) with a sample dim, got {tuple(x.shape)}")
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"{op}: grad_out: expected shape {tuple(x.shape[:-1])} + (out,) matching x, "
                         f"got {tuple(grad_out.shape)}")
    chk.same_device(op, "x", x, grad_out=grad_out, out=out)
    S = x.shape[0]
    acc = _check_out(op, out, (grad_out.shape[-1], x.shape[-1]), x.device)
    if S == 0 or x.numel() == 0:
        return acc
    _sal_linear(acc, x.reshape(S, -1, x.shape[-1]).contiguous(),
                grad_out.reshape(S, -1, grad_out.shape[-1]).contiguous(), stat)
    return acc


def saliency_conv2d(x: Tensor, grad_out: Tensor, weight_shape, stat: str = "sample_abs", stride=1, padding=0,
                    dilation=1, groups: int = 1, out: Optional[Tensor] = None) -> Tensor:
    """Saliency of a Conv2d weight of ``weight_shape`` ``(out, C/groups, kh, kw)``.

    ``x`` ``(S, C, H, W)``, ``grad_out`` ``(S, out, H', W')``; returns fp32 of ``weight_shape``
    (accumulated into ``out=`` when given).
    """
    op = "saliency_conv2d"
    _check_stat(op, stat)
    chk.tensor("x", x, dim=4, op=op)
    chk.tensor("grad_out", grad_out, dim=4, dtype=x.dtype, op=op)
    if (not isinstance(weight_shape, (tuple, list, torch.Size)) or len(weight_shape) != 4
            or not all(isinstance(v, int) and v > 0 for v in weight_shape)):
        raise ValueError(f"{op}: weight_shape: expected 4 positive ints (out, C/groups, kh, kw), got {weight_shape!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups: expected a positive int, got {groups!r}")
    weight_shape = tuple(int(v) for v in weight_shape)
    if x.shape[1] != weight_shape[1] * groups or weight_shape[0] % groups:
        raise ValueError(f"{op}: weight_shape: expected (out, C/groups={x.shape[1] // groups}, kh, kw) with out "
                         f"divisible by groups={groups} for x with C={x.shape[1]}, got {weight_shape}")
    stride, padding, dilation = conv_args(op, stride, padding, dilation, weight_shape[2:])
    hw = _conv_out_hw(x.shape, weight_shape, stride, padding, dilation)
    expected = (x.shape[0], weight_shape[0], *hw)
    if tuple(grad_out.shape) != expected:
        raise ValueError(f"{op}: grad_out: expected shape {expected} (the conv's output), got {tuple(grad_out.shape)}")
    chk.same_device(op, "x", x, grad_out=grad_out, out=out)
    acc = _check_out(op, out, weight_shape, x.device)
    if x.shape[0] == 0 or math.prod(x.shape) == 0:
        return acc
    _sal_conv(acc, x.contiguous(), grad_out.contiguous(), stat, stride, padding, dilation, groups)
    return acc


__all__ = ["STATS", "saliency_linear", "saliency_conv2d"]
