"""Triton kernels for the masked LoRA conv2d op family (DESIGN §1, §4), and their launchers.

A conv weight ``(out, C/g, kh, kw)`` is the matrix ``(out, K)``, ``K = C/g·kh·kw``, columns ordered
``(c, kh, kw)`` row-major (``spare_kernels.maskfmt``); ``ΔW = s·M⊙(B·A)`` with ``A (r, C/g, kh, kw)`` seen
as ``(r, K)`` and applied to every group (``ΔW[o]`` only sees the inputs of ``o``'s group), ``B (out, r)``.
The launchers take exactly the arguments of ``backends/reference.py`` and keep its contract (``x`` NCHW;
outputs in the activation dtype, ``dA``/``dB`` in the adapters', an empty tensor for a gradient not
asked for). No autograd here: that is ``spare_kernels/ops``.

Every kernel is an implicit GEMM: patches of ``x`` (or of ``dy``) are gathered from NCHW on the fly
(stride, padding, dilation; masked loads for the padding), never the unfolded input in memory. Tiles put
pixels on their last axis: with Triton's default order for pointers of unknown contiguity (last axis
fastest), neighbouring threads then read neighbouring pixels of one channel plane (unverified on a GPU).

- ``_fwd_masked_conv_kernel`` (element / block masks): ``yᵀ`` tile (BN output channels × BM output
  pixels) of one group; the K loop walks (tap, BK input channels) and builds the effective weight tile
  ``W + s·M⊙(B·A)`` for those columns (``c·kh·kw + tap``) in registers exactly as linear's
  ``_fwd_masked_kernel`` does (``linear._ba_tile``, ``utils.mask_tile``), then dots it with the gathered
  patch tile. Taps outer, channels inner: a K step's gather needs one validity and offset per pixel,
  not per (pixel, column). Block masks skip the rank-r dot of tiles with every entry off; a K step's
  columns are ``kh·kw`` apart, so with ``kh·kw > 1`` a step meets several column blocks and skips less
  often than linear's (the rank-r dot is ``r/BM`` of the step's work; dA/dB, where skipping saves the
  most, tile the flattened ``(out, K)`` matrix and skip exactly).
- ``_fwd_factored_conv_kernel`` (row mask, no mask): the base conv GEMM and ``z = A·patches`` in the same
  K loop, ``s·diag(m)·(B·z)`` in the epilogue (no ``out×K`` tensor).
- ``_dx_masked_conv_kernel`` / ``_dx_factored_conv_kernel``: ``dx`` as a gather: for each input pixel,
  the sum over the taps whose stride alignment hits of ``W_effᵀ·dy`` at the output pixel the tap maps
  it to. Input pixels are split into the ``sh·sw`` stride phases (``ih ≡ rh mod sh``, ``iw ≡ rw mod sw``,
  one launch each); within a phase the aligned taps are the same for every pixel (an arithmetic
  progression per axis, computed on the host), so no tap is visited that a pixel cannot use (a 3×3
  stride-2 conv visits 9 taps per 4 input pixels, not 36). The factored variant adds one rank-r step
  ``A_tapᵀ·dz`` per tap, ``dz = (s·diag(m)·B)ᵀ·dy`` per output pixel computed once by torch (a 1×1
  transposed conv, ``r/out`` of dy's size) and shared with ``dA`` (recomputing it per tap inside the
  kernel would cost ``r/BN`` of the main GEMM per channel tile and kept a second accumulator live).
- ``_wgrad_masked_conv_kernel``: as linear's ``_wgrad_masked_kernel``: one program per (listed T×T tile
  of the ``(out, K)`` matrix, pixel split) accumulates ``G = dyᵀ·unfold(x)`` over its pixels in registers
  (``_g_tile``, shared with the conv saliency kernel), masks it and contracts it with A and B in the
  epilogue (``linear._wgrad_partials``) into per-program partials; linear's reduce kernels sum them in a
  fixed order (deterministic). Block masks list only the tiles overlapping an on block. A tile whose
  rows straddle groups runs its pixel loop once per group it touches, with the other rows masked.
- Row / no mask ``dA``/``dB``: factored, through torch convs (as the reference), sharing dx's ``dz``.

Composite path (``costmodel.choose_path``, as linear's; ``SPARE_KERNELS_PATH`` forces it): ``W_eff`` of the
``(out, K)`` matrix built once by linear's ``_weff_kernel``, then ``F.conv2d`` / the input-grad conv with it
(cuDNN), ``G`` from cuDNN's 16-bit wgrad (rounded to the activation dtype: see ``_composite_backward``)
and linear's mask-and-contract pass; row / no mask factored through torch convs.

groups > 1 run in the kernels: the forward and dx grids carry the group (tiles never straddle one);
the weight-gradient and saliency tiles are those of the ``(out, K)`` matrix (see above).

1×1 convolutions (stride 1, padding 0, groups 1) are not sent to the linear kernels: their NCHW input is
``(N, C, H·W)``, i.e. ``W·x_n`` per sample with pixels contiguous, which these kernels read in place
(every tap is valid, one per K step); the linear route would need ``x.permute(0, 2, 3, 1).contiguous()``
and the same back for ``y`` (two activation-sized copies per call, three in backward) to reach kernels
that do the same GEMM. Not measured (no GPU here); kept simple.

Sent to the reference (same contract): fp64 and other dtypes, ranks above ``utils.MAX_RANK``, empty
tensors, no output pixels, tensors of 2**31 elements or more (the kernels index with int32), a weight,
bias or ``dy`` of another dtype than ``x``, and ``x`` in channels_last (cuDNN takes it as is
and returns channels_last; these kernels would need a copy to NCHW). Other non-contiguous inputs are
made contiguous.

Precision as linear (and the reference): fp32 accumulation; fp32 dots at torch's matmul precision
(``utils.dot_precision``); with 16-bit activations the effective weight tile is rounded to the activation
dtype and the main dots run on 16-bit tensor cores; ``G`` and its contractions with A and B stay fp32.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.grad import conv2d_input, conv2d_weight

from ... import maskfmt as fmt
from ...utils import autocast
from .. import reference as _ref
from . import utils as U
from .linear import (_ba_tile, _dummy_u8, _fallback, _gemm_consts, _kernel_adapters, _mask_u8, _reduce_da_kernel,
                     _reduce_db_kernel, _row_factor, _tile_plan, _token_split, _wgrad_partials, as_dtype, build_weff,
                     choose, mask_contract, masked_B)
from .utils import any_on, grouped_tile, load_act, mask_tile, mm_operand, small_dot

NONE, ELEMENT, BLOCK, ROW = fmt.NONE, fmt.ELEMENT, fmt.BLOCK, fmt.ROW
GROUP_M: tl.constexpr = tl.constexpr(8)

# Autotune keys: the layer's geometry (the batch N bucketed to a power of two by utils.autotune) and, for the
# masked kernels, skip_empty (block masks skip off tiles: their own pick; the factored kernels lack it).
_FWD_KEY = ["N", "C", "H", "W", "OUT", "KH", "KW", "sh", "sw", "R_PAD", "DOT_PREC", "skip_empty"]
_DX_KEY = ["N", "C", "HR", "WR", "OUT", "KH", "KW", "sh", "sw", "R_PAD", "DOT_PREC", "skip_empty"]


# ===================================================================================== kernels
@triton.jit
def _out_pixels(rm, OH, OW, sh, sw, ph, pw):
    """Output pixel index -> (sample, pixel in the plane, top-left input row, input col) of its patch."""
    OHW = OH * OW
    nb = rm // OHW
    p = rm - nb * OHW
    oh = p // OW
    ow = p - oh * OW
    return nb, p, oh * sh - ph, ow * sw - pw


@U.autotune(configs=U.conv_gemm_configs("fwd_masked"), key=_FWD_KEY,
                 prune_configs_by={"early_config_prune": U.pruner(U.conv_table("fwd_masked"), "x_ptr")})
@triton.jit(do_not_specialize=["N"])
def _fwd_masked_conv_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, mask_ptr, y_ptr,
                            N, C, H, W, OUT, OH, OW, CG, OUTG, KH, KW, sh, sw, ph, pw, dh, dw,
                            r, mask_stride, row_div, col_div, bit_mask, skip_empty, scale, has_bias,
                            R_PAD: tl.constexpr, ACT: tl.constexpr, EMUL_BF16: tl.constexpr,
                            DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # yᵀ tile: BN output channels (of group grp) × BM output pixels; K loop over (tap, BK input channels).
    M = N * OH * OW
    KHW = KH * KW
    K = CG * KHW
    HW = H * W
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(OUTG, BN)
    pid = tl.program_id(0)
    grp = pid // (n_m * n_n)
    pid_m, pid_n = grouped_tile(pid % (n_m * n_n), n_m, n_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < OUTG
    ro = grp * OUTG + rn
    ro_m = tl.where(n_ok, ro, OUT)          # rows past the group read as off in the mask
    nb, p, ih0, iw0 = _out_pixels(rm, OH, OW, sh, sw, ph, pw)
    x_pix = x_ptr + ((nb * C + grp * CG) * HW + ih0 * W + iw0)
    n_cc = tl.cdiv(CG, BK)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for step in range(0, KHW * n_cc):
        tap = step // n_cc
        c = (step - tap * n_cc) * BK + rk
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * dh
        iw = iw0 + kw * dw
        p_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = c < CG
        xt = load_act(x_pix[None, :] + (c * HW + (kh * dh * W + kw * dw))[:, None],
                      c_ok[:, None] & p_ok[None, :], EMUL_BF16)                       # (BK, BM) patches
        cols = c * KHW + tap
        w = load_act(w_ptr + ro[:, None] * K + cols[None, :], n_ok[:, None] & c_ok[None, :],
                     EMUL_BF16).to(tl.float32)
        on = mask_tile(mask_ptr, mask_stride, ro_m, cols, OUT, K, row_div, col_div, bit_mask)
        if skip_empty:   # block masks: a tile with every block off is W alone (no rank-r dot)
            if any_on(on):
                d = _ba_tile(b_ptr, a_ptr, ro, cols, n_ok, c_ok, r, K, EMUL_BF16, DOT_PREC, R_PAD, BN, BK)
                w = w + tl.where(on, d * scale, 0.0)
        else:
            d = _ba_tile(b_ptr, a_ptr, ro, cols, n_ok, c_ok, r, K, EMUL_BF16, DOT_PREC, R_PAD, BN, BK)
            w = w + tl.where(on, d * scale, 0.0)
        acc = tl.dot(mm_operand(w, ACT, EMUL_BF16), xt, acc, input_precision=DOT_PREC)
    if has_bias:
        acc += tl.load(bias_ptr + ro, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + (nb * OUT * (OH * OW) + p)[None, :] + (ro * (OH * OW))[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@U.autotune(configs=U.conv_gemm_configs("fwd_factored"), key=_FWD_KEY,
                 prune_configs_by={"early_config_prune": U.pruner(U.conv_table("fwd_factored"), "x_ptr")})
@triton.jit(do_not_specialize=["N"])
def _fwd_factored_conv_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, row_ptr, y_ptr,
                              N, C, H, W, OUT, OH, OW, CG, OUTG, KH, KW, sh, sw, ph, pw, dh, dw,
                              r, scale, has_bias, has_row,
                              R_PAD: tl.constexpr, ACT: tl.constexpr, EMUL_BF16: tl.constexpr,
                              DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # yᵀ = W·patches + s·diag(m)·B·(A·patches): z = A·patches (R, BM) in the same K loop.
    M = N * OH * OW
    KHW = KH * KW
    K = CG * KHW
    HW = H * W
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(OUTG, BN)
    pid = tl.program_id(0)
    grp = pid // (n_m * n_n)
    pid_m, pid_n = grouped_tile(pid % (n_m * n_n), n_m, n_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    n_ok = rn < OUTG
    r_ok = rr < r
    ro = grp * OUTG + rn
    nb, p, ih0, iw0 = _out_pixels(rm, OH, OW, sh, sw, ph, pw)
    x_pix = x_ptr + ((nb * C + grp * CG) * HW + ih0 * W + iw0)
    n_cc = tl.cdiv(CG, BK)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    z = tl.zeros((R_PAD, BM), dtype=tl.float32)
    for step in range(0, KHW * n_cc):
        tap = step // n_cc
        c = (step - tap * n_cc) * BK + rk
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * dh
        iw = iw0 + kw * dw
        p_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c_ok = c < CG
        xt = load_act(x_pix[None, :] + (c * HW + (kh * dh * W + kw * dw))[:, None],
                      c_ok[:, None] & p_ok[None, :], EMUL_BF16)
        cols = c * KHW + tap
        w = load_act(w_ptr + ro[:, None] * K + cols[None, :], n_ok[:, None] & c_ok[None, :], EMUL_BF16)
        a = load_act(a_ptr + rr[:, None] * K + cols[None, :], r_ok[:, None] & c_ok[None, :], EMUL_BF16)
        acc = tl.dot(w, xt, acc, input_precision=DOT_PREC)
        z = tl.dot(a, xt, z, input_precision=DOT_PREC)
    b = load_act(b_ptr + ro[:, None] * r + rr[None, :], n_ok[:, None] & r_ok[None, :], EMUL_BF16)
    lo = small_dot(b, mm_operand(z, ACT, EMUL_BF16), DOT_PREC)                      # (BN, BM)
    if has_row:
        m = tl.load(row_ptr + ro, mask=n_ok, other=0)
        lo = tl.where((m != 0)[:, None], lo, 0.0)
    acc += lo * scale
    if has_bias:
        acc += tl.load(bias_ptr + ro, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + (nb * OUT * (OH * OW) + p)[None, :] + (ro * (OH * OW))[:, None]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _phase_pixels(rm, HR, WR):
    """Pixel index within a stride phase -> (sample, phase row, phase col)."""
    PHW = HR * WR
    nb = rm // PHW
    q = rm - nb * PHW
    jh = q // WR
    return nb, jh, q - jh * WR


@triton.jit
def _phase_tap(j, n_kw, kh0, kh_step, oh0, doh, kw0, kw_step, ow0, dow):
    """j-th aligned tap of a phase -> (kh, kw, output-row offset, output-col offset): the tap maps phase
    pixel (jh, jw) to output pixel (jh + oh_off, jw + ow_off)."""
    jkh = j // n_kw
    jkw = j - jkh * n_kw
    return kh0 + jkh * kh_step, kw0 + jkw * kw_step, oh0 - jkh * doh, ow0 - jkw * dow


@U.autotune(configs=U.conv_gemm_configs("dx_masked"), key=_DX_KEY,
                 prune_configs_by={"early_config_prune": U.pruner(U.conv_table("dx_masked"), "dy_ptr")})
@triton.jit(do_not_specialize=["N", "rh", "rw", "HR", "WR", "kh0", "kh_step", "n_kh", "oh0", "doh",
                               "kw0", "kw_step", "n_kw", "ow0", "dow"])
def _dx_masked_conv_kernel(dy_ptr, w_ptr, a_ptr, b_ptr, mask_ptr, dx_ptr,
                           N, C, H, W, OUT, OH, OW, CG, OUTG, KH, KW, sh, sw,
                           rh, rw, HR, WR, kh0, kh_step, n_kh, oh0, doh, kw0, kw_step, n_kw, ow0, dow,
                           r, mask_stride, row_div, col_div, bit_mask, skip_empty, scale,
                           R_PAD: tl.constexpr, ACT: tl.constexpr, EMUL_BF16: tl.constexpr,
                           DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # dxᵀ tile: BN input channels (of group grp) × BM input pixels of phase (rh, rw); K loop over (aligned
    # tap, BK output channels of the group): dxᵀ += W_eff[o, c, tap]ᵀ · dy[o, pixel the tap maps to].
    MR = N * HR * WR
    OHW = OH * OW
    KHW = KH * KW
    K = CG * KHW
    n_m = tl.cdiv(MR, BM)
    n_n = tl.cdiv(CG, BN)
    pid = tl.program_id(0)
    grp = pid // (n_m * n_n)
    pid_m, pid_n = grouped_tile(pid % (n_m * n_n), n_m, n_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rc = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < MR
    c_ok = rc < CG
    nb, jh, jw = _phase_pixels(rm, HR, WR)
    dy_pix = dy_ptr + (nb * OUT + grp * OUTG) * OHW
    n_oc = tl.cdiv(OUTG, BK)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for step in range(0, n_kh * n_kw * n_oc):
        j = step // n_oc
        o = (step - j * n_oc) * BK + rk
        kh, kw, oh_off, ow_off = _phase_tap(j, n_kw, kh0, kh_step, oh0, doh, kw0, kw_step, ow0, dow)
        oh = jh + oh_off
        ow = jw + ow_off
        p_ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        o_ok = o < OUTG
        dyt = load_act(dy_pix[None, :] + (oh * OW + ow)[None, :] + (o * OHW)[:, None],
                       o_ok[:, None] & p_ok[None, :], EMUL_BF16)                      # (BK, BM)
        ro = grp * OUTG + o
        ro_m = tl.where(o_ok, ro, OUT)
        cols = rc * KHW + (kh * KW + kw)
        w = load_act(w_ptr + ro[:, None] * K + cols[None, :], o_ok[:, None] & c_ok[None, :],
                     EMUL_BF16).to(tl.float32)
        on = mask_tile(mask_ptr, mask_stride, ro_m, cols, OUT, K, row_div, col_div, bit_mask)
        if skip_empty:
            if any_on(on):
                d = _ba_tile(b_ptr, a_ptr, ro, cols, o_ok, c_ok, r, K, EMUL_BF16, DOT_PREC, R_PAD, BK, BN)
                w = w + tl.where(on, d * scale, 0.0)
        else:
            d = _ba_tile(b_ptr, a_ptr, ro, cols, o_ok, c_ok, r, K, EMUL_BF16, DOT_PREC, R_PAD, BK, BN)
            w = w + tl.where(on, d * scale, 0.0)
        acc = tl.dot(tl.trans(mm_operand(w, ACT, EMUL_BF16)), dyt, acc, input_precision=DOT_PREC)
    HW = H * W
    pix = (nb * C + grp * CG) * HW + (rh + jh * sh) * W + (rw + jw * sw)
    dx_ptrs = dx_ptr + pix[None, :] + (rc * HW)[:, None]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=c_ok[:, None] & m_ok[None, :])


@triton.jit
def _dz_step(acc, dz_pix, a_ptr, pix, p_ok, cols, c_ok, c0, r, OHW, K, EMUL_BF16: tl.constexpr,
             DOT_PREC: tl.constexpr):
    """``acc += A[c0:c0+16, cols]ᵀ · dz[c0:c0+16, pixels]`` (ranks past ``r`` masked to zero)."""
    rc = c0 + tl.arange(0, 16)
    rc_ok = rc < r
    dzt = load_act(dz_pix[None, :] + pix[None, :] + (rc * OHW)[:, None], rc_ok[:, None] & p_ok[None, :], EMUL_BF16)
    at = load_act(a_ptr + rc[None, :] * K + cols[:, None], c_ok[:, None] & rc_ok[None, :], EMUL_BF16)
    return acc + small_dot(at, dzt, DOT_PREC)


@U.autotune(configs=U.conv_gemm_configs("dx_factored"), key=_DX_KEY,
                 prune_configs_by={"early_config_prune": U.pruner(U.conv_table("dx_factored"), "dy_ptr")})
@triton.jit(do_not_specialize=["N", "rh", "rw", "HR", "WR", "kh0", "kh_step", "n_kh", "oh0", "doh",
                               "kw0", "kw_step", "n_kw", "ow0", "dow"])
def _dx_factored_conv_kernel(dy_ptr, dz_ptr, w_ptr, a_ptr, dx_ptr,
                             N, C, H, W, OUT, OH, OW, CG, OUTG, KH, KW, sh, sw,
                             rh, rw, HR, WR, kh0, kh_step, n_kh, oh0, doh, kw0, kw_step, n_kw, ow0, dow, r,
                             R_PAD: tl.constexpr, ACT: tl.constexpr, EMUL_BF16: tl.constexpr,
                             DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # dxᵀ = Σ_taps W_tapᵀ·dy_tap + A_tapᵀ·dz_tap, dz = (s·diag(m)·B)ᵀ·dy per output pixel ((N, groups·r,
    # H', W'), computed once by the launcher and shared with dA): per tap, the K loop over the group's
    # output channels, then one rank-r step.
    MR = N * HR * WR
    OHW = OH * OW
    KHW = KH * KW
    K = CG * KHW
    n_m = tl.cdiv(MR, BM)
    n_n = tl.cdiv(CG, BN)
    pid = tl.program_id(0)
    grp = pid // (n_m * n_n)
    pid_m, pid_n = grouped_tile(pid % (n_m * n_n), n_m, n_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rc = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < MR
    c_ok = rc < CG
    nb, jh, jw = _phase_pixels(rm, HR, WR)
    dy_pix = dy_ptr + (nb * OUT + grp * OUTG) * OHW
    dz_pix = dz_ptr + (nb * (OUT // OUTG) + grp) * r * OHW
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for j in range(0, n_kh * n_kw):
        kh, kw, oh_off, ow_off = _phase_tap(j, n_kw, kh0, kh_step, oh0, doh, kw0, kw_step, ow0, dow)
        oh = jh + oh_off
        ow = jw + ow_off
        p_ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        pix = oh * OW + ow
        cols = rc * KHW + (kh * KW + kw)
        for o0 in range(0, OUTG, BK):
            o = o0 + rk
            o_ok = o < OUTG
            dyt = load_act(dy_pix[None, :] + pix[None, :] + (o * OHW)[:, None], o_ok[:, None] & p_ok[None, :],
                           EMUL_BF16)                                                 # (BK, BM)
            wt = load_act(w_ptr + (grp * OUTG + o)[None, :] * K + cols[:, None], c_ok[:, None] & o_ok[None, :],
                          EMUL_BF16)                                                  # (BN, BK) = W_tapᵀ
            acc = tl.dot(wt, dyt, acc, input_precision=DOT_PREC)
        if R_PAD <= 32:   # the rank step, 16 ranks at a time (as linear._ba_tile: a loop at 64)
            for c0 in tl.static_range(0, R_PAD, 16):
                acc = _dz_step(acc, dz_pix, a_ptr, pix, p_ok, cols, c_ok, c0, r, OHW, K, EMUL_BF16, DOT_PREC)
        else:
            for c0 in range(0, R_PAD, 16):
                acc = _dz_step(acc, dz_pix, a_ptr, pix, p_ok, cols, c_ok, c0, r, OHW, K, EMUL_BF16, DOT_PREC)
    HW = H * W
    pix = (nb * C + grp * CG) * HW + (rh + jh * sh) * W + (rw + jw * sw)
    dx_ptrs = dx_ptr + pix[None, :] + (rc * HW)[:, None]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=c_ok[:, None] & m_ok[None, :])


@triton.jit
def _g_tile(g, x_ptr, dy_ptr, t0, t1, o_first, ro, o_ok, ri, i_ok,
            C, H, W, OUT, OH, OW, CG, OUTG, KH, KW, sh, sw, ph, pw, dh, dw,
            EMUL_BF16: tl.constexpr, DOT_PREC: tl.constexpr, NR: tl.constexpr, BT: tl.constexpr):
    """``g += G[ro, ri]`` over the output pixels ``[t0, t1)`` (flattened over samples), ``G = dyᵀ·unfold(x)``
    for the ``NR`` rows ``ro`` (first row ``o_first``) and columns ``ri`` of the ``(out, K)`` weight matrix. The
    unfolded input is gathered per pixel step (implicit im2col); rows of several groups are handled one
    group at a time, the others masked. Shared by the weight-gradient and conv saliency kernels."""
    KHW = KH * KW
    HW = H * W
    OHW = OH * OW
    c = ri // KHW
    tap = ri - c * KHW
    kh = tap // KW
    khd = kh * dh
    kwd = (tap - kh * KW) * dw
    col_off = c * HW + khd * W + kwd                    # per column: channel plane and tap offset
    rt = tl.arange(0, BT)
    g_first = o_first // OUTG
    g_last = (tl.minimum(o_first + NR, OUT) - 1) // OUTG
    for grp in range(g_first, g_last + 1):
        o_in = o_ok & ((ro // OUTG) == grp)
        for t in range(t0, t1, BT):
            rm = t + rt
            t_ok = rm < t1
            nb, p, ih0, iw0 = _out_pixels(rm, OH, OW, sh, sw, ph, pw)
            nb = nb
            dyt = load_act(dy_ptr + (nb * OUT * OHW + p)[None, :] + (ro * OHW)[:, None],
                           o_in[:, None] & t_ok[None, :], EMUL_BF16)                   # (rows, BT)
            ih = ih0[None, :] + khd[:, None]
            iw = iw0[None, :] + kwd[:, None]
            ok = (i_ok[:, None] & t_ok[None, :]) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xt = load_act(x_ptr + ((nb * C + grp * CG) * HW + ih0 * W + iw0)[None, :] + col_off[:, None],
                          ok, EMUL_BF16)                                               # (cols, BT)
            g = tl.dot(dyt, tl.trans(xt), g, input_precision=DOT_PREC)
    return g


@triton.jit(do_not_specialize=["N", "n_listed", "tok_per_split"])
def _wgrad_masked_conv_kernel(x_ptr, dy_ptr, a_ptr, b_ptr, mask_ptr, tiles_ptr, pa_ptr, pb_ptr,
                              N, C, H, W, OUT, OH, OW, CG, OUTG, KH, KW, sh, sw, ph, pw, dh, dw,
                              r, mask_stride, row_div, col_div, bit_mask, n_q, n_listed, tok_per_split,
                              R_PAD: tl.constexpr, EMUL_BF16: tl.constexpr, DOT_PREC: tl.constexpr,
                              T: tl.constexpr, BT: tl.constexpr):
    # Program e = k·n_listed + j: pixel split k of the j-th listed T×T tile of the (out, K) matrix.
    pid = tl.program_id(0)
    k = pid // n_listed
    tile = tl.load(tiles_ptr + pid % n_listed)
    K = CG * KH * KW
    o_first = (tile // n_q) * T
    ro = o_first + tl.arange(0, T)
    ri = (tile % n_q) * T + tl.arange(0, T)
    o_ok = ro < OUT
    i_ok = ri < K
    on = mask_tile(mask_ptr, mask_stride, ro, ri, OUT, K, row_div, col_div, bit_mask)
    g = tl.zeros((T, T), dtype=tl.float32)
    if any_on(on):   # element masks: a tile without any entry on skips the pixel loop
        t0 = k * tok_per_split
        t1 = tl.minimum(t0 + tok_per_split, N * OH * OW)
        g = _g_tile(g, x_ptr, dy_ptr, t0, t1, o_first, ro, o_ok, ri, i_ok,
                    C, H, W, OUT, OH, OW, CG, OUTG, KH, KW, sh, sw, ph, pw, dh, dw, EMUL_BF16, DOT_PREC, T, BT)
        g = tl.where(on, g, 0.0)                                          # M⊙G, never written
    _wgrad_partials(g, pid, ro, ri, o_ok, i_ok, r, K, a_ptr, b_ptr, pa_ptr, pb_ptr, DOT_PREC, R_PAD, T)


# =================================================================================== launchers
def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Geom:
    """A conv's sizes as the kernels take them."""

    def __init__(self, x, weight, stride, padding, dilation, groups):
        self.N, self.C, self.H, self.W = x.shape
        self.OUT, self.CG, self.KH, self.KW = weight.shape
        self.sh, self.sw = _pair(stride)
        self.ph, self.pw = _pair(padding)
        self.dh, self.dw = _pair(dilation)
        self.groups = int(groups)
        self.OUTG = self.OUT // self.groups
        self.K = self.CG * self.KH * self.KW
        self.OH = (self.H + 2 * self.ph - self.dh * (self.KH - 1) - 1) // self.sh + 1
        self.OW = (self.W + 2 * self.pw - self.dw * (self.KW - 1) - 1) // self.sw + 1
        self.M = self.N * self.OH * self.OW

    def sizes(self):
        """``N, C, H, W, OUT, OH, OW, CG, OUTG, KH, KW``."""
        return (self.N, self.C, self.H, self.W, self.OUT, self.OH, self.OW, self.CG, self.OUTG, self.KH, self.KW)

    def conv(self):
        """``sh, sw, ph, pw, dh, dw``."""
        return self.sh, self.sw, self.ph, self.pw, self.dh, self.dw


def _conv_fallback(x, weight, lora_A, dy=None) -> bool:
    """Cases sent to the reference (module docstring): those of linear, a weight (or dy) of another dtype
    than x, channels_last x, no output pixels."""
    if _fallback(x, lora_A) or x.dim() != 4 or weight.numel() == 0 or weight.dtype != x.dtype:
        return True
    if dy is not None and (dy.dtype != x.dtype or dy.numel() == 0):
        return True
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


_I32 = 2 ** 31


def _not_for_kernels(g: _Geom) -> bool:
    """No output pixels, or a tensor too large for the kernels' int32 offsets (every offset is an int32
    element index into x, y / dy or the weight: cheaper index math, fewer registers; a SD-1.5 UNet layer
    at batch 64 is ~10x below the limit): the reference."""
    if g.OH <= 0 or g.OW <= 0:
        return True
    return max(g.N * g.C * g.H * g.W, g.N * g.OUT * g.OH * g.OW, g.OUT * g.K) >= _I32


def masked_lora_conv2d(x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale,
                       stride, padding, dilation, groups):
    args = (mask, kind, block_o, block_i, scale, stride, padding, dilation, groups)
    if _conv_fallback(x, weight, lora_A) or (bias is not None and bias.dtype != x.dtype):
        return _ref.masked_lora_conv2d(x, weight, bias, lora_A, lora_B, *args)
    g = _Geom(x, weight, stride, padding, dilation, groups)
    if _not_for_kernels(g):
        return _ref.masked_lora_conv2d(x, weight, bias, lora_A, lora_B, *args)
    r = lora_A.shape[0]
    if kind not in (NONE, ELEMENT, BLOCK, ROW):
        raise ValueError(f"unknown mask kind {kind}")
    x, weight = x.contiguous(), weight.contiguous()
    if choose("conv2d", kind, g.M, g.OUT, g.K, r, mask, x) == "composite":
        with U.device_guard(x), autocast.off(x):   # its precision is its own, as the reference's
            return _composite_forward(x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale, g)
    A, B = _kernel_adapters(lora_A.reshape(r, g.K), lora_B, x.dtype)
    y = torch.empty(g.N, g.OUT, g.OH, g.OW, dtype=x.dtype, device=x.device)
    b = x if bias is None else bias.contiguous()
    consts = _gemm_consts(x.dtype, r)

    def grid(meta):
        return (g.groups * triton.cdiv(g.M, meta["BM"]) * triton.cdiv(g.OUTG, meta["BN"]),)

    with U.device_guard(x):
        if kind in (ELEMENT, BLOCK):
            m = _mask_u8(mask)
            _fwd_masked_conv_kernel[grid](x, weight, b, A, B, m, y, *g.sizes(), *g.conv(), r, m.stride(0),
                                          *U.mask_geometry(kind, block_o, block_i), int(kind == BLOCK), float(scale),
                                          int(bias is not None), **consts)
        elif kind in (NONE, ROW):
            row = _mask_u8(mask) if kind == ROW else _dummy_u8(x.device)
            _fwd_factored_conv_kernel[grid](x, weight, b, A, B, row, y, *g.sizes(), *g.conv(), r, float(scale),
                                            int(bias is not None), int(kind == ROW), **consts)
        else:
            raise ValueError(f"unknown mask kind {kind}")
    return y


def _axis_phases(n, s, p, d, k):
    """Stride phases of one axis: ``(residue, pixels, k0, k_step, n_k, o0, do)`` per residue ``ρ < min(s, n)``:
    the taps ``t`` with ``(ρ + p - t·d) ≡ 0 (mod s)`` are ``k0 + i·k_step``, ``i < n_k`` (a linear congruence's
    solutions: an arithmetic progression), and tap ``i`` maps phase index ``j`` (input ``ρ + s·j``) to output
    ``j + o0 - i·do``."""
    out = []
    for rho in range(min(s, n)):
        taps = [t for t in range(k) if (rho + p - t * d) % s == 0]
        k0 = taps[0] if taps else 0
        step = taps[1] - taps[0] if len(taps) > 1 else 1
        assert taps == list(range(k0, k0 + step * len(taps), step))[:len(taps)]
        o0 = (rho + p - k0 * d) // s
        do = step * d // s
        out.append((rho, (n - rho + s - 1) // s, k0, step, len(taps), o0, do))
    return out


def _dx_phases(g: _Geom):
    """Every stride phase of the input plane with its aligned taps, as the dx kernels take them
    (``rh, rw, HR, WR, kh0, kh_step, n_kh, oh0, doh, kw0, kw_step, n_kw, ow0, dow``)."""
    hs = _axis_phases(g.H, g.sh, g.ph, g.dh, g.KH)
    ws = _axis_phases(g.W, g.sw, g.pw, g.dw, g.KW)
    for rh, HR, kh0, khs, nkh, oh0, doh in hs:
        for rw, WR, kw0, kws, nkw, ow0, dow in ws:
            yield rh, rw, HR, WR, kh0, khs, nkh, oh0, doh, kw0, kws, nkw, ow0, dow


def _dx(dy, x, weight, A, B, mask, kind, block_o, block_i, scale, g: _Geom, dz=None):
    """``dx``, one launch per stride phase; ``dz`` (row / no mask) from :func:`_dz`."""
    r = A.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    consts = _gemm_consts(x.dtype, r)
    if kind in (ELEMENT, BLOCK):
        m = _mask_u8(mask)
        ptrs = (dy, weight, A, B, m, dx)
        tail = (r, m.stride(0), *U.mask_geometry(kind, block_o, block_i), int(kind == BLOCK), float(scale))
        kernel = _dx_masked_conv_kernel
    else:
        ptrs = (dy, dz, weight, A, dx)
        tail = (r,)
        kernel = _dx_factored_conv_kernel
    for ph in _dx_phases(g):
        MR = g.N * ph[2] * ph[3]

        def grid(meta, MR=MR):
            return (g.groups * triton.cdiv(MR, meta["BM"]) * triton.cdiv(g.CG, meta["BN"]),)

        kernel[grid](*ptrs, *g.sizes(), g.sh, g.sw, *ph, *tail, **consts)
    return dx


def _dz(dy, lora_B, rs, g: _Geom):
    """``dz = (s·diag(m)·B)ᵀ·dy`` per output pixel, ``(N, groups·r, H', W')`` in the activation dtype (as the
    reference's ``dz``): a 1×1 transposed conv (torch), ``r/out`` of ``dy``'s size; shared by dx and dA."""
    r = lora_B.shape[1]
    Bs = (lora_B.to(torch.float32) * rs[:, None]).to(dy.dtype)[:, :, None, None]
    return conv2d_input((g.N, g.groups * r, g.OH, g.OW), Bs, dy, groups=g.groups).contiguous()


def _wgrad_masked(dy, x, lora_A, lora_B, mask, kind, block_o, block_i, scale, need_dA, need_dB, g: _Geom):
    r = lora_A.shape[0]
    dev = x.device
    T = U.wgrad_tile(kind, block_o, block_i)
    R_PAD = U.rank_pad(r)
    m = _mask_u8(mask)
    tiles, rowptr, colptr, colidx = _tile_plan(mask, kind, block_o, block_i, g.OUT, g.K, T)
    n_listed = tiles.numel()
    if n_listed == 0:   # every block off
        return (torch.zeros_like(lora_A) if need_dA else None), (torch.zeros_like(lora_B) if need_dB else None)
    dA = torch.empty(r, g.K, dtype=torch.float32, device=dev) if need_dA else None
    dB = torch.empty(lora_B.shape, dtype=torch.float32, device=dev) if need_dB else None
    prec = U.dot_precision() if x.dtype == torch.float32 else "ieee"
    BT, warps, stages = U.conv_wgrad_params(U.dot_class(x.dtype, prec), T)
    n_split = _token_split(g.M, n_listed, x)
    tok = triton.cdiv(triton.cdiv(g.M, n_split), BT) * BT
    n_split = triton.cdiv(g.M, tok)
    E = n_listed * n_split
    pb = torch.empty(E, T, R_PAD, dtype=torch.float32, device=dev)
    pa = torch.empty(E, R_PAD, T, dtype=torch.float32, device=dev)
    A32 = lora_A.reshape(r, g.K).to(torch.float32).contiguous()
    B32 = lora_B.to(torch.float32).contiguous()
    _wgrad_masked_conv_kernel[(E,)](x, dy, A32, B32, m, tiles, pa, pb, *g.sizes(), *g.conv(), r, m.stride(0),
                                    *U.mask_geometry(kind, block_o, block_i), triton.cdiv(g.K, T), n_listed, tok,
                                    R_PAD=R_PAD, EMUL_BF16=U.bf16_emulated(x.dtype), DOT_PREC=prec, T=T, BT=BT,
                                    num_warps=warps, num_stages=stages)
    if need_dB:
        _reduce_db_kernel[(triton.cdiv(g.OUT, T),)](pb, rowptr, dB, g.OUT, r, n_listed, n_split, float(scale),
                                                   R_PAD=R_PAD, T=T, num_warps=U.REDUCE_WARPS)
    if need_dA:
        _reduce_da_kernel[(triton.cdiv(g.K, T),)](pa, colptr, colidx, dA, g.K, r, n_listed, n_split, float(scale),
                                                 R_PAD=R_PAD, T=T, num_warps=U.REDUCE_WARPS)
    return ((dA.view(lora_A.shape).to(lora_A.dtype) if need_dA else None),
            (dB.to(lora_B.dtype) if need_dB else None))


def _wgrad_factored(dy, x, lora_A, lora_B, rs, dz, need_dA, need_dB, g: _Geom):
    """Row / no mask, through torch convs in the activation dtype (as the reference), with the scale and
    row mask on the small side (no dy-sized temporary): ``dB = s·diag(m)·(dy ⋆ z)``, ``z = conv(x, A)``
    (the row factor applied in fp32 to the ``(out, r)`` result), and ``dA = Σ_groups x ⋆ dz`` (the group
    sum in fp32)."""
    dt = x.dtype
    r = lora_A.shape[0]
    Af = _ref._conv_A_factored(lora_A, g.groups, dt)
    conv = dict(stride=(g.sh, g.sw), padding=(g.ph, g.pw), dilation=(g.dh, g.dw), groups=g.groups)
    dA = dB = None
    if need_dB:
        z = F.conv2d(x, Af, None, **conv)                                       # (N, groups·r, H', W')
        gz = conv2d_weight(z, (g.OUT, r, 1, 1), dy, groups=g.groups).reshape(g.OUT, r)
        dB = (gz.to(torch.float32) * rs[:, None]).to(lora_B.dtype)
    if need_dA:
        dAf = conv2d_weight(x, Af.shape, dz, **conv)
        dA = dAf.view(g.groups, *lora_A.shape).to(torch.float32).sum(0).to(lora_A.dtype)
    return dA, dB


# ------------------------------------------------------------------------------ composite path
# As linear's (``linear.build_weff``, ``linear.mask_contract``): W_eff of the (out, K) matrix built once, the
# convolutions are cuDNN's through ATen (forward, input-grad), and G comes from cuDNN's 16-bit wgrad (aten
# convolution_backward on the 16-bit x and dy, fp32 accumulation inside, G rounded to the activation dtype:
# what stock autocast training gets for a conv weight's gradient; the reference computes G in fp32 from the
# same 16-bit values, so dA / dB differ from it by G's rounding, 2^-9 relative per entry at bf16, 2^-11 at
# fp16, which the tests' dtype-scaled bounds cover; fp16 G can also overflow above 65504 where an fp32 G
# would not, as in stock fp16 training). W_eff is rebuilt in backward, not kept (linear's note).
def _conv_kw(g: _Geom):
    return dict(stride=(g.sh, g.sw), padding=(g.ph, g.pw), dilation=(g.dh, g.dw), groups=g.groups)


_DET_LOCK = threading.Lock()
_det_depth = 0
_det_saved = False


@contextlib.contextmanager
def _cudnn_deterministic():
    """cuDNN's wgrad picks algorithms with atomics unless told not to: dA / dB must be bitwise repeatable
    (DESIGN §4), so the composite's wgrad runs with ``cudnn.deterministic`` on (the deterministic algorithms
    may be slower: not measured, no GPU here). The flag is process-global and autograd runs one backward
    thread per device: the first caller in saves it and the last out restores it, under a lock, so that
    overlapping calls neither see it off nor leave it on."""
    global _det_depth, _det_saved
    c = torch.backends.cudnn
    with _DET_LOCK:
        if _det_depth == 0:
            _det_saved = c.deterministic
        _det_depth += 1
        c.deterministic = True
    try:
        yield
    finally:
        with _DET_LOCK:
            _det_depth -= 1
            if _det_depth == 0:
                c.deterministic = _det_saved


def _composite_forward(x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale, g: _Geom):
    dt = x.dtype
    if kind in (ELEMENT, BLOCK):
        w_eff = build_weff(weight, lora_A, lora_B, mask, kind, block_o, block_i, scale, dt).view(weight.shape)
        return F.conv2d(x, w_eff, as_dtype(bias, dt), **_conv_kw(g))
    # Row / no mask: factored (no out×K tensor): conv(x, W) + s·conv1x1(conv(x, A), diag(m)·B).
    y = F.conv2d(x, weight, as_dtype(bias, dt), **_conv_kw(g))
    z = F.conv2d(x, _ref._conv_A_factored(lora_A, g.groups, dt), None, **_conv_kw(g))
    lo = F.conv2d(z, masked_B(lora_B, mask, kind, dt)[:, :, None, None], None, 1, 0, 1, g.groups)
    return y.add_(lo, alpha=float(scale))


def _composite_backward(dy, x, weight, lora_A, lora_B, mask, kind, block_o, block_i, scale,
                        need_dx, need_dA, need_dB, g: _Geom):
    dt = x.dtype
    kw = _conv_kw(g)
    dx = dA = dB = None
    if kind in (ELEMENT, BLOCK):
        if need_dx:
            w_eff = build_weff(weight, lora_A, lora_B, mask, kind, block_o, block_i, scale, dt).view(weight.shape)
            dx = conv2d_input(x.shape, w_eff, dy, **kw)
        if need_dA or need_dB:
            with _cudnn_deterministic():
                G = conv2d_weight(x, weight.shape, dy, **kw)            # 16-bit in, activation dtype out
            dA, dB = mask_contract(G.reshape(g.OUT, g.K), lora_A, lora_B, mask, kind, block_o, block_i, scale,
                                   need_dA, need_dB, dt)
        return dx, dA, dB
    rs = _row_factor(mask, kind, scale, g.OUT, x.device, torch.float32)
    dz = _dz(dy, lora_B, rs, g) if need_dx or need_dA else None
    if need_dx:
        dx = conv2d_input(x.shape, weight, dy, **kw)
        dx.add_(conv2d_input(x.shape, _ref._conv_A_factored(lora_A, g.groups, dt), dz, **kw))
    if need_dA or need_dB:
        dA, dB = _wgrad_factored(dy, x, lora_A, lora_B, rs, dz, need_dA, need_dB, g)
    return dx, dA, dB


def masked_lora_conv2d_backward(dy, x, weight, lora_A, lora_B, mask, kind, block_o, block_i, scale,
                                stride, padding, dilation, groups, need_dx, need_dA, need_dB):
    args = (mask, kind, block_o, block_i, scale, stride, padding, dilation, groups, need_dx, need_dA, need_dB)
    if _conv_fallback(x, weight, lora_A, dy):
        return _ref.masked_lora_conv2d_backward(dy, x, weight, lora_A, lora_B, *args)
    g = _Geom(x, weight, stride, padding, dilation, groups)
    if _not_for_kernels(g):
        return _ref.masked_lora_conv2d_backward(dy, x, weight, lora_A, lora_B, *args)
    if kind not in (NONE, ELEMENT, BLOCK, ROW):
        raise ValueError(f"unknown mask kind {kind}")
    dy, x = dy.contiguous(), x.contiguous()
    if choose("conv2d", kind, g.M, g.OUT, g.K, lora_A.shape[0], mask, x) == "composite":
        with U.device_guard(x), autocast.off(x):   # its precision is its own, as the reference's
            grads = _composite_backward(dy, x, weight.contiguous(), lora_A, lora_B, mask, kind, block_o, block_i,
                                        scale, need_dx, need_dA, need_dB, g)
        return _ref._none_to_empty(x, *grads)
    dx = dA = dB = None
    factored = kind in (NONE, ROW)
    with U.device_guard(x):
        rs = _row_factor(mask, kind, scale, g.OUT, x.device, torch.float32) if factored else None
        dz = _dz(dy, lora_B, rs, g) if factored and (need_dx or need_dA) else None
        if need_dx:
            r = lora_A.shape[0]
            # The factored kernel reads dz, B folded into it: no copy of B for it.
            A, B = _kernel_adapters(lora_A.reshape(r, g.K), None if factored else lora_B, x.dtype)
            dx = _dx(dy, x, weight.contiguous(), A, B, mask, kind, block_o, block_i, scale, g, dz)
        if need_dA or need_dB:
            if factored:
                dA, dB = _wgrad_factored(dy, x, lora_A, lora_B, rs, dz, need_dA, need_dB, g)
            else:
                dA, dB = _wgrad_masked(dy, x, lora_A, lora_B, mask, kind, block_o, block_i, scale, need_dA, need_dB, g)
    return _ref._none_to_empty(x, dx, dA, dB)


# ============================================================================ AOT specialisations
_SIZES = ("N", "C", "H", "W", "OUT", "OH", "OW", "CG", "OUTG", "KH", "KW")
_CONV = ("sh", "sw", "ph", "pw", "dh", "dw")
_PHASE = ("rh", "rw", "HR", "WR", "kh0", "kh_step", "n_kh", "oh0", "doh", "kw0", "kw_step", "n_kw", "ow0", "dow")


def aot_specs():
    """Every specialisation the launchers above can launch on a GPU (``aot.py`` compiles them all), as
    linear's: activation dtypes × fp32 dot precisions where fp32 dots occur × padded ranks × the kernel's
    autotune set for the launch's dot class and rank (``utils.conv_gemm_configs``); the weight-gradient
    tiles. The reduce kernels are linear's (compiled by its list). Mask kinds are runtime arguments;
    EMUL_BF16 is interpreter-only."""
    i32, f32, u8 = "i32", "fp32", "*u8"
    ints = lambda names: {n: i32 for n in names}   # noqa: E731
    geo = dict(mask_stride=i32, row_div=i32, col_div=i32, bit_mask=i32)

    def gemm_types(p):
        return {
            "fwd_masked": (_fwd_masked_conv_kernel, dict(
                x_ptr=p, w_ptr=p, bias_ptr=p, a_ptr=p, b_ptr=p, mask_ptr=u8, y_ptr=p, **ints(_SIZES + _CONV), r=i32,
                **geo, skip_empty=i32, scale=f32, has_bias=i32)),
            "fwd_factored": (_fwd_factored_conv_kernel, dict(
                x_ptr=p, w_ptr=p, bias_ptr=p, a_ptr=p, b_ptr=p, row_ptr=u8, y_ptr=p, **ints(_SIZES + _CONV), r=i32,
                scale=f32, has_bias=i32, has_row=i32)),
            "dx_masked": (_dx_masked_conv_kernel, dict(
                dy_ptr=p, w_ptr=p, a_ptr=p, b_ptr=p, mask_ptr=u8, dx_ptr=p, **ints(_SIZES + ("sh", "sw") + _PHASE),
                r=i32, **geo, skip_empty=i32, scale=f32)),
            "dx_factored": (_dx_factored_conv_kernel, dict(
                dy_ptr=p, dz_ptr=p, w_ptr=p, a_ptr=p, dx_ptr=p, **ints(_SIZES + ("sh", "sw") + _PHASE), r=i32)),
        }

    specs = []
    for dt in U.ACT_DTYPES:
        p, name = U.ptr(dt), U.SIG_DTYPES[dt]
        for prec in (("ieee", "tf32") if dt == torch.float32 else ("ieee",)):
            cls = U.dot_class(dt, prec)
            for R in U.RANK_PADS:
                base = dict(R_PAD=R, EMUL_BF16=False, DOT_PREC=prec)
                for kernel, (fn, types) in gemm_types(p).items():
                    for cfg in U.conv_gemm_configs(kernel, cls, R):
                        lab = f"{name} {prec} R{R} {U.config_label(cfg)}"
                        specs.append(U.make_spec(fn, types, dict(base, ACT=U.tl_dtype(dt), **cfg.kwargs),
                                                 cfg.num_warps, cfg.num_stages, lab))
                for T in U.WGRAD_TILES:
                    BT, warps, stages = U.conv_wgrad_params(cls, T)
                    specs.append(U.make_spec(_wgrad_masked_conv_kernel, dict(
                        x_ptr=p, dy_ptr=p, a_ptr="*fp32", b_ptr="*fp32", mask_ptr=u8, tiles_ptr="*i32",
                        pa_ptr="*fp32", pb_ptr="*fp32", **ints(_SIZES + _CONV), r=i32, **geo,
                        n_q=i32, n_listed=i32, tok_per_split=i32),
                        dict(base, T=T, BT=BT), warps, stages, f"{name} {prec} R{R} T{T} BT{BT}-w{warps}-s{stages}"))
    return specs
