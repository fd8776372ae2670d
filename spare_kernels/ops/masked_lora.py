"""Masked LoRA linear and conv2d: ``y = x·(W + s·M⊙(B·A))ᵀ + b`` (DESIGN §1), defined once.

Each op is a ``torch.library`` custom op (one node for ``torch.compile``) with a fake
implementation, an autograd formula whose backward is itself a custom op, and an implementation
chosen per device by the backend registry. ``W`` and ``b`` are frozen in the kernels' contract;
if they do require grad, their (plain) gradients are formed here with ordinary torch ops.

Eager calls on plain tensors skip the custom-op layer: an ``autograd.Function`` calls the same
backend implementations with the same backward formula (on the native CPU backend, with a frozen
weight and bias, its C++ twin in ``csrc/cpu/autograd.cpp`` does, with no Python per call). The
custom-op round trip (schema parsing, the Python autograd shim, the dispatcher twice per direction)
costs ~150 µs per layer call on a CPU, more than the whole kernel of a small layer; graph capture
(``torch.compile``, fake tensors, functorch transforms) keeps using the custom ops.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn.grad import conv2d_weight

from ..backends import registry
from ..backends.registry import Entry, lookup
from ..utils import autocast as _autocast
from . import _checks as chk

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor

LIB = "spare_kernels"
_lib = torch.library.Library(LIB, "FRAGMENT")


def _maybe(t: Tensor) -> Optional[Tensor]:
    return None if t.numel() == 0 else t


def table_key(x: Tensor, weight: Tensor, lora_A: Tensor, kind: int) -> str:
    """The GPU table's key of a call (registry.lookup): mask kind, out, cols, rank, tokens (x's rows, or
    N·H·W of a conv input) rounded up to a power of two."""
    tokens = x.shape[0] if x.dim() == 2 else x.numel() // max(1, x.shape[1])
    return registry.shape_key(kind, weight.shape[0], weight.numel() // max(1, weight.shape[0]), lora_A.shape[0],
                              registry.tokens_bucket(tokens))


def _impl(op: str, x: Tensor, lora_A: Tensor, weight: Optional[Tensor] = None, kind: int = 0) -> Entry:
    # on CUDA the shape picks the backend (a measured table's entry, else the cost model's choice), unless
    # a backend is forced (then the key would be thrown away)
    shape = (table_key(x, weight, lora_A, kind)
             if weight is not None and x.device.type == "cuda" and registry.get_forced_backend() is None else None)
    return lookup(op, x.device.type, x.dtype, lora_A.dtype, shape)


def _eager(x: Tensor, *others: Optional[Tensor]) -> bool:
    """Plain eager tensors take the ``autograd.Function`` path (see the module docstring); a functorch
    transform over any input (e.g. ``torch.func.grad`` with respect to the adapter) takes the custom op."""
    # is_compiling() first: under dynamo it is a constant True and the rest is never traced.
    return (not torch.compiler.is_compiling() and type(x) is torch.Tensor and x.device.type != "meta"
            and not _is_wrapped(x) and not any(t is not None and _is_wrapped(t) for t in others))


def _native_autograd(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor):
    """The C++ autograd twin of the implementation the registry picks for ``op`` (the native CPU
    backend's, ``csrc/cpu/autograd.cpp``: the same kernels and gradients as ``_autograd``'s Function,
    with no Python per call) when this eager call can take it: the forward and backward entries chosen
    for ``x`` both name it (the twin's backward is chosen now, at forward time), and the weight and
    bias are frozen. Else None."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None
    twin = _impl(op, x, lora_A).autograd_twin
    return twin if twin is not None and _impl(f"{op}_backward", x, lora_A).autograd_twin is twin else None


def _differentiable_backward(op: str) -> None:
    """Define ``<op>_backward_differentiable``: the backward op's schema, run as the reference's formulas
    (differentiable torch ops) and registered CompositeImplicitAutograd, so autograd records them. The
    backward of a create_graph pass: the C++ twins call it through the dispatcher."""
    bwd = f"{op}_backward"
    schema = str(getattr(torch.ops.spare_kernels, bwd).default._schema)
    _lib.define(schema.replace(f"{LIB}::{bwd}(", f"{bwd}_differentiable(", 1))
    _lib.impl(f"{bwd}_differentiable", lambda *args: registry.reference(bwd)(*args), "CompositeImplicitAutograd")


def _autograd(name: str, op: str, setup, grads, custom_bwd):
    """Register ``op``'s custom-op autograd and return its eager twin: both save with ``setup`` and
    differentiate with ``grads(bwd, ctx, dy)``, the custom op through ``custom_bwd``, the eager
    ``autograd.Function`` through the backend implementation of ``<op>_backward`` directly.

    Double backward is exact on every backend: a backward run with ``create_graph`` (grad mode on
    inside it) whose backend's kernels are not differentiable (``Entry.double_backward`` False, and
    the opaque backward custom op) runs the reference's formulas instead, which autograd records."""
    bwd_op = f"{op}_backward"

    def no_autocast(bwd, ctx, dy):   # a backward may be called inside an autocast region
        with _autocast.off(dy):
            return grads(bwd, ctx, dy)

    def custom_backward(ctx, dy):
        return no_autocast(registry.reference(bwd_op) if torch.is_grad_enabled() else custom_bwd, ctx, dy)

    torch.library.register_autograd(f"{LIB}::{op}", custom_backward, setup_context=setup)

    def forward(ctx, *inputs):
        x, lora_A = inputs[0], inputs[3]
        weight, kind = inputs[1], inputs[6]
        y = _impl(op, x, lora_A, weight, kind).fn(*inputs)
        # Chosen now, in the caller's context: the backward may run in autograd's device thread,
        # which does not see a use_backend scope.
        ctx.bwd = _impl(bwd_op, x, lora_A, weight, kind)
        setup(ctx, inputs, y)
        return y

    def backward(ctx, dy):
        e = ctx.bwd
        fn = registry.reference(bwd_op) if torch.is_grad_enabled() and not e.double_backward else e.fn
        return no_autocast(fn, ctx, dy)

    # Built with type() so the autograd node is named after it (e.g. "_LinearFnBackward").
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


# ------------------------------------------------------------------------------------ linear op
@torch.library.custom_op(f"{LIB}::masked_lora_linear", mutates_args=())
def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
            mask: Optional[Tensor], kind: int, block_o: int, block_i: int, scale: float) -> Tensor:
    return _impl("masked_lora_linear", x, lora_A, weight, kind).fn(x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i,
                                                     scale)


@_linear.register_fake
def _(x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op(f"{LIB}::masked_lora_linear_backward", mutates_args=())
def _linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                mask: Optional[Tensor], kind: int, block_o: int, block_i: int, scale: float,
                need_dx: bool, need_dA: bool, need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _impl("masked_lora_linear_backward", x, lora_A, weight, kind).fn(
        dy, x, weight, lora_A, lora_B, mask, kind, block_o, block_i, scale, need_dx, need_dA, need_dB)


@_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, mask, kind, block_o, block_i, scale, need_dx, need_dA, need_dB):
    return (x.new_empty(x.shape if need_dx else (0,)),
            lora_A.new_empty(lora_A.shape if need_dA else (0,)),
            lora_B.new_empty(lora_B.shape if need_dB else (0,)))


def _setup_linear(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, mask)
    ctx.args = (kind, block_o, block_i, scale)


def _linear_grads(bwd, ctx, dy):
    x, weight, lora_A, lora_B, mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    dy = dy.contiguous()
    dx, dA, dB = bwd(dy, x, weight, lora_A, lora_B, mask, *ctx.args, need[0], need[3], need[4])
    dW = dy.t().to(weight.dtype) @ x if need[1] else None
    db = dy.sum(0) if need[2] else None
    return _maybe(dx), dW, db, _maybe(dA), _maybe(dB), None, None, None, None, None


_LinearFn = _autograd("_LinearFn", "masked_lora_linear", _setup_linear, _linear_grads, _linear_bwd)
_differentiable_backward("masked_lora_linear")


def masked_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                       mask=None, scale: float = 1.0) -> Tensor:
    """``y = x·(W + scale·M⊙(B·A))ᵀ + b``.

    ``x`` ``(..., in)``, ``weight`` ``(out, in)``, ``bias`` ``(out,)`` or None, ``lora_A`` ``(r, in)``,
    ``lora_B`` ``(out, r)``. ``mask``: None (plain LoRA in factored form, no ``out×in`` tensor), a
    :class:`~spare_kernels.masks.Mask`, or a bool/uint8 tensor of the weight's shape (nonzero = on;
    packed on every call, so hold a ``Mask`` in hot loops). Adapters may be fp32 under bf16/fp16
    activations: the output has ``x``'s dtype, ``lora_A``/``lora_B`` gradients their own. Under
    ``torch.autocast`` ``x``, ``weight`` and ``bias`` are cast as for ``F.linear`` (the adapters are not).
    """
    op = "masked_lora_linear"
    chk.tensor("x", x, op=op)
    dt = _autocast.dtype(x)
    if dt is not None:   # cast as for F.linear, then run with autocast off
        return _autocast.call(masked_lora_linear, dt, x, weight, bias, lora_A, lora_B, mask, scale)
    if x.dim() < 1:
        raise ValueError(f"{op}: x: expected shape (..., in), got a 0-D tensor")
    chk.tensor("weight", weight, dim=2, dtype=x.dtype, op=op)
    out, inf = weight.shape
    chk.shape("weight", weight, (None, x.shape[-1]), f" (in = x.shape[-1] = {x.shape[-1]})", op=op)
    if bias is not None:
        chk.tensor("bias", bias, dtype=x.dtype, op=op)
        chk.shape("bias", bias, (out,), op=op)
    chk.tensor("lora_A", lora_A, dim=2, op=op)
    r = lora_A.shape[0]
    chk.shape("lora_A", lora_A, (None, inf), f" (r, in={inf})", op=op)
    chk.tensor("lora_B", lora_B, dtype=lora_A.dtype, op=op)
    chk.shape("lora_B", lora_B, (out, r), f" (out={out}, r={r} from lora_A)", op=op)
    if r < 1:
        raise ValueError(f"{op}: lora_A: expected rank r >= 1, got r = {r}")
    chk.same_device(op, "x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    return linear_checked(x, weight, bias, lora_A, lora_B, chk.wire_mask(op, mask, weight), chk.scale(op, scale))


def linear_checked(x, weight, bias, lora_A, lora_B, wire, scale: float) -> Tensor:
    """:func:`masked_lora_linear` on arguments already validated (``wire`` = ``Mask.wire()``): the
    entry of callers that own their weights and adapters (``spare_kernels.nn``), without the wrapper's
    Python checks on every call."""
    inf = weight.shape[1]
    if _eager(x, weight, bias, lora_A, lora_B):
        fn = _native_autograd("masked_lora_linear", x, weight, bias, lora_A) or _LinearFn.apply
    else:
        fn = _linear
    y = fn(x.reshape(-1, inf).contiguous(), weight.contiguous(), bias, lora_A.contiguous(), lora_B.contiguous(),
           *wire, scale)
    return y.view(*x.shape[:-1], weight.shape[0])


# ------------------------------------------------------------------------------------ conv2d op
@torch.library.custom_op(f"{LIB}::masked_lora_conv2d", mutates_args=())
def _conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
          mask: Optional[Tensor], kind: int, block_o: int, block_i: int, scale: float,
          stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    return _impl("masked_lora_conv2d", x, lora_A, weight, kind).fn(
        x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale, stride, padding, dilation, groups)


def _conv_out_hw(x_shape, w_shape, stride, padding, dilation):
    return [(x_shape[2 + d] + 2 * padding[d] - dilation[d] * (w_shape[2 + d] - 1) - 1) // stride[d] + 1
            for d in range(2)]


@_conv.register_fake
def _(x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale, stride, padding, dilation, groups):
    return x.new_empty(x.shape[0], weight.shape[0], *_conv_out_hw(x.shape, weight.shape, stride, padding, dilation))


@torch.library.custom_op(f"{LIB}::masked_lora_conv2d_backward", mutates_args=())
def _conv_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, mask: Optional[Tensor],
              kind: int, block_o: int, block_i: int, scale: float, stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int], groups: int,
              need_dx: bool, need_dA: bool, need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _impl("masked_lora_conv2d_backward", x, lora_A, weight, kind).fn(
        dy, x, weight, lora_A, lora_B, mask, kind, block_o, block_i, scale, stride, padding, dilation, groups,
        need_dx, need_dA, need_dB)


@_conv_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, mask, kind, block_o, block_i, scale, stride, padding, dilation, groups,
      need_dx, need_dA, need_dB):
    return (x.new_empty(x.shape if need_dx else (0,)),
            lora_A.new_empty(lora_A.shape if need_dA else (0,)),
            lora_B.new_empty(lora_B.shape if need_dB else (0,)))


def _setup_conv(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, mask, *args = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, mask)
    ctx.args = args


def _conv_grads(bwd, ctx, dy):
    x, weight, lora_A, lora_B, mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    dy = dy.contiguous()
    dx, dA, dB = bwd(dy, x, weight, lora_A, lora_B, mask, *ctx.args, need[0], need[3], need[4])
    stride, padding, dilation, groups = ctx.args[4:]
    dW = conv2d_weight(x, weight.shape, dy, stride, padding, dilation, groups) if need[1] else None
    db = dy.sum((0, 2, 3)) if need[2] else None
    return (_maybe(dx), dW, db, _maybe(dA), _maybe(dB)) + (None,) * 9


_ConvFn = _autograd("_ConvFn", "masked_lora_conv2d", _setup_conv, _conv_grads, _conv_bwd)
_differentiable_backward("masked_lora_conv2d")


def conv_padding(op, padding, kernel_size, stride, dilation):
    """An int, a pair, or nn.Conv2d's 'valid' / 'same' (symmetric only) -> ``[ph, pw]``."""
    if padding == "valid":
        return [0, 0]
    if padding == "same":
        if stride != [1, 1]:
            raise ValueError(f"{op}: padding: 'same' needs stride 1, got stride {stride}")
        pads = []
        for d in range(2):
            total = dilation[d] * (kernel_size[d] - 1)
            if total % 2:
                raise ValueError(f"{op}: padding: 'same' would be asymmetric for kernel {tuple(kernel_size)}"
                                 f" and dilation {dilation}; pass explicit ints")
            pads.append(total // 2)
        return pads
    return chk.pair(op, "padding", padding)


def conv_args(op, stride, padding, dilation, kernel_size):
    """``(stride, padding, dilation)`` as the ops take them, ``[h, w]`` int lists each (``padding`` may
    also be nn.Conv2d's 'valid' / 'same')."""
    stride, dilation = chk.pair(op, "stride", stride), chk.pair(op, "dilation", dilation)
    padding = conv_padding(op, padding, kernel_size, stride, dilation)
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: expected stride, dilation >= 1 and padding >= 0, "
                         f"got stride={stride}, padding={padding}, dilation={dilation}")
    return stride, padding, dilation


def masked_lora_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                       mask=None, scale: float = 1.0, stride=1, padding=0, dilation=1, groups: int = 1) -> Tensor:
    """Conv2d with the masked LoRA delta ``ΔW[o,i,kh,kw] = Σ_r B[o,r]·A[r,i,kh,kw]`` (peft's conv LoRA).

    ``x`` ``(N, C, H, W)``, ``weight`` ``(out, C/groups, kh, kw)``, ``lora_A`` ``(r, C/groups, kh, kw)``,
    ``lora_B`` ``(out, r, 1, 1)`` or ``(out, r)``. ``mask`` as for :func:`masked_lora_linear`, of the
    weight's shape. With ``groups > 1`` each output channel's delta sees only its group's inputs.
    Under ``torch.autocast`` ``x``, ``weight`` and ``bias`` are cast as for ``F.conv2d``.
    """
    op = "masked_lora_conv2d"
    chk.tensor("x", x, dim=4, op=op)
    dt = _autocast.dtype(x)
    if dt is not None:   # cast as for F.conv2d, then run with autocast off
        return _autocast.call(masked_lora_conv2d, dt, x, weight, bias, lora_A, lora_B, mask, scale, stride, padding,
                              dilation, groups)
    chk.tensor("weight", weight, dim=4, dtype=x.dtype, op=op)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: groups: expected a positive int, got {groups!r}")
    out, cg, kh, kw = weight.shape
    if x.shape[1] != cg * groups:
        raise ValueError(f"{op}: weight: expected shape ({out}, C/groups={x.shape[1] // groups}, kh, kw) for "
                         f"x with C={x.shape[1]} and groups={groups}, got {tuple(weight.shape)}")
    if out % groups:
        raise ValueError(f"{op}: weight: out channels {out} not divisible by groups={groups}")
    if bias is not None:
        chk.tensor("bias", bias, dtype=x.dtype, op=op)
        chk.shape("bias", bias, (out,), op=op)
    chk.tensor("lora_A", lora_A, dim=4, op=op)
    r = lora_A.shape[0]
    chk.shape("lora_A", lora_A, (None, cg, kh, kw), " (r, C/groups, kh, kw)", op=op)
    if r < 1:
        raise ValueError(f"{op}: lora_A: expected rank r >= 1, got r = {r}")
    chk.tensor("lora_B", lora_B, dim=(2, 4), dtype=lora_A.dtype, op=op)
    chk.shape("lora_B", lora_B, (out, r) if lora_B.dim() == 2 else (out, r, 1, 1), f" (out={out}, r={r})", op=op)
    chk.same_device(op, "x", x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    wire = chk.wire_mask(op, mask, weight)
    s = chk.scale(op, scale)
    stride, padding, dilation = conv_args(op, stride, padding, dilation, weight.shape[2:])
    hw = _conv_out_hw(x.shape, weight.shape, stride, padding, dilation)
    if min(hw) < 1:
        raise ValueError(f"{op}: x: spatial size {tuple(x.shape[2:])} too small for kernel {(kh, kw)}, "
                         f"padding {padding}, dilation {dilation}")
    return conv2d_checked(x, weight, bias, lora_A, lora_B, wire, s, stride, padding, dilation, groups)


def conv2d_checked(x, weight, bias, lora_A, lora_B, wire, scale: float, stride, padding, dilation,
                   groups: int) -> Tensor:
    """:func:`masked_lora_conv2d` on arguments already validated (``wire`` = ``Mask.wire()``,
    ``stride``/``padding``/``dilation`` int pairs): see :func:`linear_checked`."""
    if _eager(x, weight, bias, lora_A, lora_B):
        native = _native_autograd("masked_lora_conv2d", x, weight, bias, lora_A)
        if native is not None:   # takes B as (out, r) or (out, r, 1, 1)
            return native(x.contiguous(), weight.contiguous(), bias, lora_A.contiguous(), lora_B.contiguous(),
                          *wire, scale, stride, padding, dilation, groups)
        fn = _ConvFn.apply
    else:
        fn = _conv
    return fn(x.contiguous(), weight.contiguous(), bias, lora_A.contiguous(),
              lora_B.reshape(lora_B.shape[0], lora_B.shape[1]).contiguous(), *wire, scale, stride, padding, dilation,
              groups)


__all__ = ["masked_lora_linear", "masked_lora_conv2d"]
