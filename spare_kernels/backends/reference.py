"""Pure-PyTorch reference of every op: the oracle all other backends are tested against.

Contract shared by all backends (the ops layer validates and normalises before calling):
``x`` is ``(N, in)`` for linear, ``(N, C, H, W)`` for conv; ``lora_B`` is ``(out, r)``;
``mask`` / ``kind`` / ``block_o`` / ``block_i`` are the wire mask of ``spare_kernels.maskfmt``.
Outputs take the activation dtype, ``dA`` / ``dB`` the adapter's dtype. Backward functions return
an empty tensor for a gradient that was not asked for.

Precision: masked (element / block) paths form the masked delta and contract the weight gradient
in fp32 (fp64 for fp64 inputs); factored paths (``NONE`` / ``ROW``) run in the activation dtype,
casting only the small factors, never the activations (on the CPU a fp16/bf16 convolution computes in
fp32 and rounds its result: :func:`_conv`).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from ..utils import autocast
from .. import maskfmt as fmt
from .registry import register


def _reference(op):
    """Register ``fn`` as ``op``'s reference, run with autocast off: its precision is its own (fp32 /
    fp64 accumulation), which autocast would cast down in a call under it (a direct ``torch.ops``
    call, a saliency hook or backward inside an autocast region)."""
    def deco(fn):
        @functools.wraps(fn)
        def run(*args):
            with autocast.off(args[0]):
                return fn(*args)
        # Built from differentiable torch ops: a create_graph backward through it is exact by itself.
        register(op, "reference", run, double_backward=True)
        return run
    return deco

def _none_to_empty(ref, *grads):
    # Custom ops may not return None nor one tensor twice: an unrequested gradient is a fresh empty.
    return tuple(ref.new_empty(0) if g is None else g for g in grads)


def _acc_dtype(*ts):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _dense_mask(mask, kind, bo, bi, rows, cols, device):
    m = fmt.expand(mask, kind, bo, bi, rows, cols)
    return None if m is None else m.to(device)


def _delta(A2, B, m, scale, dtype):
    """``scale · M ⊙ (B·A)`` as ``(out, cols)`` in ``dtype``."""
    d = B.to(dtype) @ A2.to(dtype)
    return d.mul_(scale).mul_(m)


def _row_scale(mask, kind, out, dtype, device):
    """Per-output-channel factor of the factored paths: ``None`` (all ones) or a ``(out,)`` tensor."""
    if kind == fmt.NONE:
        return None
    return mask.reshape(out).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------- linear
@_reference("masked_lora_linear")
def masked_lora_linear(x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale):
    out, cols = weight.shape
    if kind in (fmt.ELEMENT, fmt.BLOCK):
        acc = _acc_dtype(x, lora_A)
        m = _dense_mask(mask, kind, block_o, block_i, out, cols, x.device)
        w_eff = weight.to(acc) + _delta(lora_A, lora_B, m, scale, acc)
        b = None if bias is None else bias.to(acc)
        return F.linear(x.to(acc), w_eff, b).to(x.dtype)
    y = F.linear(x, weight, bias)
    h = x @ lora_A.to(x.dtype).t()                      # (N, r)
    lo = h @ lora_B.to(x.dtype).t()                     # (N, out)
    rs = _row_scale(mask, kind, out, x.dtype, x.device)
    if rs is not None:
        lo = lo * rs
    return y.add_(lo, alpha=scale)


@_reference("masked_lora_linear_backward")
def masked_lora_linear_backward(dy, x, weight, lora_A, lora_B, mask, kind, block_o, block_i, scale,
                                need_dx, need_dA, need_dB):
    out, cols = weight.shape
    dx = dA = dB = None
    if kind in (fmt.ELEMENT, fmt.BLOCK):
        acc = _acc_dtype(x, lora_A)
        m = _dense_mask(mask, kind, block_o, block_i, out, cols, x.device)
        if need_dA or need_dB:
            gm = (dy.to(acc).t() @ x.to(acc)).mul_(m)    # M ⊙ G, (out, in)
            if need_dB:
                dB = (scale * (gm @ lora_A.to(acc).t())).to(lora_B.dtype)
            if need_dA:
                dA = (scale * (lora_B.to(acc).t() @ gm)).to(lora_A.dtype)
        if need_dx:
            w_eff = weight.to(acc) + _delta(lora_A, lora_B, m, scale, acc)
            dx = (dy.to(acc) @ w_eff).to(x.dtype)
        return _none_to_empty(x, dx, dA, dB)
    A = lora_A.to(x.dtype)
    B = lora_B.to(x.dtype)
    rs = _row_scale(mask, kind, out, x.dtype, x.device)
    dys = dy * scale if rs is None else dy * (rs * scale)   # (N, out)
    dh = dys @ B                                              # (N, r)
    if need_dB:
        dB = (dys.t() @ (x @ A.t())).to(lora_B.dtype)
    if need_dA:
        dA = (dh.t() @ x).to(lora_A.dtype)
    if need_dx:
        dx = dy @ weight + dh @ A
    return _none_to_empty(x, dx, dA, dB)


# ---------------------------------------------------------------------------------------- conv2d
def _conv_A_factored(lora_A, groups, dtype):
    # A applied to every group: ΔW[o] only sees the inputs of o's group (see DESIGN §1).
    A = lora_A.to(dtype)
    return A.repeat(groups, 1, 1, 1) if groups > 1 else A


def _conv(fn, x, *args, **kw):
    """``fn`` (a convolution or its input / weight gradient) at ``x``'s precision: its inputs and result
    in ``x.dtype``, but fp16/bf16 on the CPU computed in fp32 and rounded once, as a correct
    low-precision convolution does. torch's own bf16 CPU convolution is wrong on some small shapes
    (torch 2.13: a (1, 6, 5, 3) input, a (2, 3, 1, 3) weight, stride (1, 2), groups 2 gives a 100%
    error, now and then 1e38 from uninitialised memory), which made this oracle, and the property test
    on it, fail at random."""
    if not (x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16)):
        return fn(*args, **kw)
    up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    return fn(*up, **kw).to(x.dtype)


@_reference("masked_lora_conv2d")
def masked_lora_conv2d(x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale,
                       stride, padding, dilation, groups):
    out = weight.shape[0]
    cols = weight[0].numel()
    if kind in (fmt.ELEMENT, fmt.BLOCK):
        acc = _acc_dtype(x, lora_A)
        m = _dense_mask(mask, kind, block_o, block_i, out, cols, x.device)
        w_eff = weight.to(acc) + _delta(lora_A.reshape(lora_A.shape[0], -1), lora_B, m, scale,
                                        acc).view(weight.shape)
        b = None if bias is None else bias.to(acc)
        return F.conv2d(x.to(acc), w_eff, b, stride, padding, dilation, groups).to(x.dtype)
    y = _conv(F.conv2d, x, x, weight, bias, stride, padding, dilation, groups)
    z = _conv(F.conv2d, x, x, _conv_A_factored(lora_A, groups, x.dtype), None, stride, padding, dilation, groups)
    lo = _conv(F.conv2d, x, z, lora_B.to(x.dtype)[:, :, None, None], None, 1, 0, 1, groups)
    rs = _row_scale(mask, kind, out, x.dtype, x.device)
    if rs is not None:
        lo = lo * rs.view(1, out, 1, 1)
    return y.add_(lo, alpha=scale)


@_reference("masked_lora_conv2d_backward")
def masked_lora_conv2d_backward(dy, x, weight, lora_A, lora_B, mask, kind, block_o, block_i, scale,
                                stride, padding, dilation, groups, need_dx, need_dA, need_dB):
    out = weight.shape[0]
    cols = weight[0].numel()
    r = lora_A.shape[0]
    dx = dA = dB = None
    if kind in (fmt.ELEMENT, fmt.BLOCK):
        acc = _acc_dtype(x, lora_A)
        m = _dense_mask(mask, kind, block_o, block_i, out, cols, x.device)
        A2 = lora_A.reshape(r, cols)
        if need_dA or need_dB:
            g = conv2d_weight(x.to(acc), weight.shape, dy.to(acc), stride, padding, dilation, groups)
            gm = g.reshape(out, cols).mul_(m)
            if need_dB:
                dB = (scale * (gm @ A2.to(acc).t())).to(lora_B.dtype)
            if need_dA:
                dA = (scale * (lora_B.to(acc).t() @ gm)).view(lora_A.shape).to(lora_A.dtype)
        if need_dx:
            w_eff = weight.to(acc) + _delta(A2, lora_B, m, scale, acc).view(weight.shape)
            dx = conv2d_input(x.shape, w_eff, dy.to(acc), stride, padding, dilation, groups).to(x.dtype)
        return _none_to_empty(x, dx, dA, dB)
    Af = _conv_A_factored(lora_A, groups, x.dtype)
    B4 = lora_B.to(x.dtype)[:, :, None, None]
    rs = _row_scale(mask, kind, out, x.dtype, x.device)
    dys = dy * scale if rs is None else dy * (rs * scale).view(1, out, 1, 1)
    z_shape = (x.shape[0], groups * r) + tuple(dy.shape[2:])
    dz = _conv(conv2d_input, x, z_shape, B4, dys, 1, 0, 1, groups)
    if need_dB:
        z = _conv(F.conv2d, x, x, Af, None, stride, padding, dilation, groups)
        dB = _conv(conv2d_weight, x, z, B4.shape, dys, 1, 0, 1, groups).reshape(out, r).to(lora_B.dtype)
    if need_dA:
        dAf = _conv(conv2d_weight, x, x, Af.shape, dz, stride, padding, dilation, groups)
        dA = dAf.view(groups, *lora_A.shape).sum(0).to(lora_A.dtype)
    if need_dx:
        dx = (_conv(conv2d_input, x, x.shape, weight, dy, stride, padding, dilation, groups)
              + _conv(conv2d_input, x, x.shape, Af, dz, stride, padding, dilation, groups))
    return _none_to_empty(x, dx, dA, dB)


# -------------------------------------------------------------------------------------- saliency
def _accumulate(acc, g, stat):
    if stat in ("grad_abs", "sample_abs"):
        acc.add_(g.abs_())
    elif stat == "signed":
        acc.add_(g)
    elif stat == "sample_sq":
        acc.add_(g.square_())
    else:
        raise ValueError(f"stat: unknown {stat!r}")


@_reference("saliency_linear")
def saliency_linear(acc, x, dy, stat):
    """``acc (out, in) fp32 += stat``; ``x (S, T, in)``, ``dy (S, T, out)``."""
    x = x.to(acc.dtype)
    dy = dy.to(acc.dtype)
    S, T, _ = x.shape
    if stat in ("grad_abs", "signed"):
        _accumulate(acc, dy.reshape(S * T, -1).t() @ x.reshape(S * T, -1), stat)
    elif T == 1:
        # g_i = dy_i ⊗ x_i is rank one: |g_i| = |dy_i|⊗|x_i|, g_i² = dy_i²⊗x_i², one GEMM for the batch.
        a, b = (dy[:, 0].abs(), x[:, 0].abs()) if stat == "sample_abs" else (dy[:, 0] ** 2, x[:, 0] ** 2)
        acc.addmm_(a.t(), b)
    else:
        for i in range(S):                       # one weight-sized temporary, never (S, out, in)
            _accumulate(acc, dy[i].t() @ x[i], stat)


@_reference("saliency_conv2d")
def saliency_conv2d(acc, x, dy, stat, stride, padding, dilation, groups):
    """``acc`` (weight shape, fp32) ``+= stat``; ``x (S, C, H, W)``, ``dy (S, out, H', W')``."""
    x = x.to(acc.dtype)
    dy = dy.to(acc.dtype)
    shape = acc.shape
    if stat in ("grad_abs", "signed"):
        _accumulate(acc, conv2d_weight(x, shape, dy, stride, padding, dilation, groups), stat)
    else:
        for i in range(x.shape[0]):
            g = conv2d_weight(x[i:i + 1], shape, dy[i:i + 1], stride, padding, dilation, groups)
            _accumulate(acc, g, stat)
