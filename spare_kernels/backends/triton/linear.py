"""Triton kernels for the masked LoRA linear op family (DESIGN §1, §4), and their launchers.

``y = x·(W + s·M⊙(B·A))ᵀ + b``; backward ``dx = dy·W_eff``, ``dB = s·(M⊙G)·Aᵀ``, ``dA = s·Bᵀ·(M⊙G)``
with ``G = dyᵀ·x``. The launchers take exactly the arguments of ``backends/reference.py`` and keep its
contract (outputs in the activation dtype, ``dA``/``dB`` in the adapters', an empty tensor for a
gradient not asked for). No autograd here: that is ``spare_kernels/ops``.

Kernels (the mask kind is a runtime argument: ``utils.mask_tile`` reads element and block masks with one
formula, so one compiled variant serves both):
- ``_fwd_masked_kernel`` (element / block masks): one tiled GEMM over (token tile, output tile) whose K
  loop builds the effective weight tile ``W + s·M⊙(B·A)`` in registers (a rank-r ``tl.dot`` of B and A
  tiles, 16 ranks at a time; the mask bits; ``tl.where``; the add) and dots it with the x tile. No
  ``out×in`` tensor is written. With block masks a tile whose entries are all off skips the rank-r dot
  (a scalar branch; when the blocks contain the tile this is exact tile skipping).
- ``_fwd_factored_kernel`` (row mask, no mask): ``x·Wᵀ`` and ``h = x·Aᵀ`` in the same K loop, then
  ``s·(h·Bᵀ)·diag(m)`` in the epilogue.
- ``_dx_masked_kernel`` / ``_dx_factored_kernel``: the same for ``dx = dy·W_eff`` (K loop over outputs).
- ``_wgrad_masked_kernel``: one program per (listed weight tile, token split) accumulates ``G = dyᵀ·x``
  over its tokens in registers, masks it and contracts it with A and B in the epilogue into per-program
  partials; ``_reduce_db_kernel`` / ``_reduce_da_kernel`` sum the partials in a fixed order. Block masks
  list only the tiles that overlap an on block, so that side's cost falls with density.

Two paths per call, picked by ``spare_kernels.costmodel.choose_path`` (``SPARE_KERNELS_PATH`` forces one):
"fused" (the kernels above: the W_eff tile rebuilt in registers per token tile, which wins with few token
tiles and with sparse block masks) and "composite" (many tokens): ``_weff_kernel`` builds ``W_eff`` once
(memory-bound, ≈ 4 B per weight entry), the forward and ``dx`` are one vendor GEMM each with it (rebuilt
in backward, not kept), ``G = dyᵀ·x`` is one vendor GEMM with fp32 output, and ``_mask_contract_kernel``
masks and contracts G into the same partials, reduced by the same kernels. Row / no mask: the factored
form through vendor GEMMs (``x·Wᵀ + s·(x·Aᵀ)·(diag(m)·B)ᵀ``, no ``out×in`` tensor).

Precision (as ``reference.py``: fp32 accumulation everywhere; fp32 dots at torch's matmul precision,
``utils.dot_precision``). With 16-bit activations the effective weight tile is rounded to the activation
dtype and the main dot runs on 16-bit tensor cores (what ``F.linear(x, W_eff.to(x.dtype))`` computes);
the adapters are rounded to the activation dtype for the rank-r dot (below the W_eff tile's own
rounding). ``G`` and its contractions with A and B stay fp32. Small fp32 epilogue contractions (over the
rank or a weight tile) that would run at ``"ieee"`` run at ``"tf32x3"`` instead (``utils.small_dot``:
about fp32's accuracy; an FMA dot over K = 64 spills).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ... import maskfmt as fmt
from ...utils import autocast
from .. import reference as _ref
from . import utils as U
from .utils import any_on, grouped_tile, load_act, mask_tile, mm_operand, small_dot

NONE, ELEMENT, BLOCK, ROW = fmt.NONE, fmt.ELEMENT, fmt.BLOCK, fmt.ROW
GROUP_M: tl.constexpr = tl.constexpr(8)


# ===================================================================================== kernels
@triton.jit
def _ba_chunk(d, c, b_ptr, a_ptr, rows, cols, row_ok, col_ok, r, a_stride, EMUL_BF16: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """``d += B[rows, c:c+16]·A[c:c+16, cols]``."""
    rc = c + tl.arange(0, 16)
    rc_ok = rc < r
    b = load_act(b_ptr + rows[:, None] * r + rc[None, :], row_ok[:, None] & rc_ok[None, :], EMUL_BF16)
    a = load_act(a_ptr + rc[:, None] * a_stride + cols[None, :], rc_ok[:, None] & col_ok[None, :], EMUL_BF16)
    return tl.dot(b, a, d, input_precision=DOT_PREC)


@triton.jit
def _ba_tile(b_ptr, a_ptr, rows, cols, row_ok, col_ok, r, a_stride, EMUL_BF16: tl.constexpr,
             DOT_PREC: tl.constexpr, R_PAD: tl.constexpr, NR: tl.constexpr, NC: tl.constexpr):
    """``(B·A)[rows, cols]`` (fp32, ``NR × NC``) as a rank-r dot in chunks of 16 ranks: each chunk's B
    (NR, 16) and A (16, NC) tiles are read (from L1/L2: the same few KiB every K step) right before their
    dot, so no (NR, R) / (R, NC) operand stays live in registers across the K loop. Up to 32 ranks the
    chunks are unrolled (the K loop stays a single loop, which Triton software-pipelines); at 64 they
    are a loop (unrolled, four chunks spill), which costs the K loop its pipelining."""
    d = tl.zeros((NR, NC), dtype=tl.float32)
    if R_PAD <= 32:
        for c in tl.static_range(0, R_PAD, 16):
            d = _ba_chunk(d, c, b_ptr, a_ptr, rows, cols, row_ok, col_ok, r, a_stride, EMUL_BF16, DOT_PREC)
    else:
        for c in range(0, R_PAD, 16):
            d = _ba_chunk(d, c, b_ptr, a_ptr, rows, cols, row_ok, col_ok, r, a_stride, EMUL_BF16, DOT_PREC)
    return d


@U.autotune(configs=U.gemm_configs(), key=["N", "OUT", "IN", "R_PAD", "DOT_PREC", "skip_empty"],
                 prune_configs_by={"early_config_prune": U.pruner(U.gemm_configs, "x_ptr")})
@triton.jit(do_not_specialize=["N"])
def _fwd_masked_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, mask_ptr, y_ptr,
                       N, OUT, IN, r, mask_stride, row_div, col_div, bit_mask, skip_empty, scale, has_bias,
                       R_PAD: tl.constexpr, ACT: tl.constexpr, EMUL_BF16: tl.constexpr,
                       DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(OUT, BN), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < N
    n_ok = rn < OUT
    rn64 = rn.to(tl.int64)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * IN + rk[None, :]
    w_ptrs = w_ptr + rn64[:, None] * IN + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, IN, BK):
        kk = k0 + rk
        k_ok = kk < IN
        x = load_act(x_ptrs, m_ok[:, None] & k_ok[None, :], EMUL_BF16)
        w = load_act(w_ptrs, n_ok[:, None] & k_ok[None, :], EMUL_BF16).to(tl.float32)
        on = mask_tile(mask_ptr, mask_stride, rn64, kk, OUT, IN, row_div, col_div, bit_mask)
        if skip_empty:   # block masks: a tile with every block off is W alone (no rank-r dot)
            if any_on(on):
                d = _ba_tile(b_ptr, a_ptr, rn64, kk, n_ok, k_ok, r, IN, EMUL_BF16, DOT_PREC, R_PAD, BN, BK)
                w = w + tl.where(on, d * scale, 0.0)
        else:
            d = _ba_tile(b_ptr, a_ptr, rn64, kk, n_ok, k_ok, r, IN, EMUL_BF16, DOT_PREC, R_PAD, BN, BK)
            w = w + tl.where(on, d * scale, 0.0)
        acc = tl.dot(x, tl.trans(mm_operand(w, ACT, EMUL_BF16)), acc, input_precision=DOT_PREC)
        x_ptrs += BK
        w_ptrs += BK
    if has_bias:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * OUT + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@U.autotune(configs=U.gemm_configs(), key=["N", "OUT", "IN", "R_PAD", "DOT_PREC", "skip_empty"],
                 prune_configs_by={"early_config_prune": U.pruner(U.gemm_configs, "x_ptr")})
@triton.jit(do_not_specialize=["N"])
def _fwd_factored_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, row_ptr, y_ptr,
                         N, OUT, IN, r, scale, has_bias, has_row,
                         R_PAD: tl.constexpr, ACT: tl.constexpr, EMUL_BF16: tl.constexpr, DOT_PREC: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(OUT, BN), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < N
    n_ok = rn < OUT
    r_ok = rr < r
    rn64 = rn.to(tl.int64)
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * IN + rk[None, :]
    w_ptrs = w_ptr + rn64[:, None] * IN + rk[None, :]
    a_ptrs = a_ptr + rr[:, None] * IN + rk[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    h = tl.zeros((BM, R_PAD), dtype=tl.float32)                         # x·Aᵀ, same K loop
    for k0 in range(0, IN, BK):
        k_ok = (k0 + rk) < IN
        x = load_act(x_ptrs, m_ok[:, None] & k_ok[None, :], EMUL_BF16)
        w = load_act(w_ptrs, n_ok[:, None] & k_ok[None, :], EMUL_BF16)
        a = load_act(a_ptrs, r_ok[:, None] & k_ok[None, :], EMUL_BF16)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PREC)
        h = tl.dot(x, tl.trans(a), h, input_precision=DOT_PREC)
        x_ptrs += BK
        w_ptrs += BK
        a_ptrs += BK
    b = load_act(b_ptr + rn64[:, None] * r + rr[None, :], n_ok[:, None] & r_ok[None, :], EMUL_BF16)
    lo = small_dot(mm_operand(h, ACT, EMUL_BF16), tl.trans(b), DOT_PREC)   # (BM, BN)
    if has_row:
        m = tl.load(row_ptr + rn, mask=n_ok, other=0)
        lo = tl.where((m != 0)[None, :], lo, 0.0)
    acc += lo * scale
    if has_bias:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * OUT + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@U.autotune(configs=U.gemm_configs(), key=["N", "OUT", "IN", "R_PAD", "DOT_PREC", "skip_empty"],
                 prune_configs_by={"early_config_prune": U.pruner(U.gemm_configs, "dy_ptr")})
@triton.jit(do_not_specialize=["N"])
def _dx_masked_kernel(dy_ptr, w_ptr, a_ptr, b_ptr, mask_ptr, dx_ptr,
                      N, OUT, IN, r, mask_stride, row_div, col_div, bit_mask, skip_empty, scale,
                      R_PAD: tl.constexpr, ACT: tl.constexpr, EMUL_BF16: tl.constexpr,
                      DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # Tiles: BM tokens × BN input features; K loop over BK outputs (the W_eff tile is (BK, BN)).
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(IN, BN), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    ri = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < N
    i_ok = ri < IN
    dy_ptrs = dy_ptr + rm.to(tl.int64)[:, None] * OUT + rk[None, :]
    w_ptrs = w_ptr + rk.to(tl.int64)[:, None] * IN + ri[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for o0 in range(0, OUT, BK):
        ro = o0 + rk
        ro64 = ro.to(tl.int64)
        o_ok = ro < OUT
        dy = load_act(dy_ptrs, m_ok[:, None] & o_ok[None, :], EMUL_BF16)
        w = load_act(w_ptrs, o_ok[:, None] & i_ok[None, :], EMUL_BF16).to(tl.float32)
        on = mask_tile(mask_ptr, mask_stride, ro64, ri, OUT, IN, row_div, col_div, bit_mask)
        if skip_empty:   # block masks: a tile with every block off is W alone (no rank-r dot)
            if any_on(on):
                d = _ba_tile(b_ptr, a_ptr, ro64, ri, o_ok, i_ok, r, IN, EMUL_BF16, DOT_PREC, R_PAD, BK, BN)
                w = w + tl.where(on, d * scale, 0.0)
        else:
            d = _ba_tile(b_ptr, a_ptr, ro64, ri, o_ok, i_ok, r, IN, EMUL_BF16, DOT_PREC, R_PAD, BK, BN)
            w = w + tl.where(on, d * scale, 0.0)
        acc = tl.dot(dy, mm_operand(w, ACT, EMUL_BF16), acc, input_precision=DOT_PREC)
        dy_ptrs += BK
        w_ptrs += BK * IN
    dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * IN + ri[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & i_ok[None, :])


@U.autotune(configs=U.gemm_configs(), key=["N", "OUT", "IN", "R_PAD", "DOT_PREC", "skip_empty"],
                 prune_configs_by={"early_config_prune": U.pruner(U.gemm_configs, "dy_ptr")})
@triton.jit(do_not_specialize=["N"])
def _dx_factored_kernel(dy_ptr, w_ptr, a_ptr, b_ptr, row_ptr, dx_ptr,
                        N, OUT, IN, r, scale, has_row,
                        R_PAD: tl.constexpr, ACT: tl.constexpr, EMUL_BF16: tl.constexpr, DOT_PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # dx = dy·W + s·((dy·diag(m))·B)·A: dh = (dy·diag(m))·B accumulates in the K loop of dy·W.
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(N, BM), tl.cdiv(IN, BN), GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    ri = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < N
    i_ok = ri < IN
    r_ok = rr < r
    dy_ptrs = dy_ptr + rm.to(tl.int64)[:, None] * OUT + rk[None, :]
    w_ptrs = w_ptr + rk.to(tl.int64)[:, None] * IN + ri[None, :]
    b_ptrs = b_ptr + rk.to(tl.int64)[:, None] * r + rr[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    dh = tl.zeros((BM, R_PAD), dtype=tl.float32)
    for o0 in range(0, OUT, BK):
        ro = o0 + rk
        o_ok = ro < OUT
        dy = load_act(dy_ptrs, m_ok[:, None] & o_ok[None, :], EMUL_BF16)
        w = load_act(w_ptrs, o_ok[:, None] & i_ok[None, :], EMUL_BF16)
        bt = load_act(b_ptrs, o_ok[:, None] & r_ok[None, :], EMUL_BF16)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PREC)
        if has_row:
            m = tl.load(row_ptr + ro, mask=o_ok, other=0)
            dym = tl.where((m != 0)[None, :], dy, tl.zeros_like(dy))
        else:
            dym = dy
        dh = tl.dot(dym, bt, dh, input_precision=DOT_PREC)
        dy_ptrs += BK
        w_ptrs += BK * IN
        b_ptrs += BK * r
    a = load_act(a_ptr + rr[:, None] * IN + ri[None, :], r_ok[:, None] & i_ok[None, :], EMUL_BF16)
    acc += small_dot(mm_operand(dh, ACT, EMUL_BF16), a, DOT_PREC) * scale
    dx_ptrs = dx_ptr + rm.to(tl.int64)[:, None] * IN + ri[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & i_ok[None, :])


@triton.jit
def _wgrad_partials(g, pid, ro64, ri, o_ok, i_ok, r, IN, a_ptr, b_ptr, pa_ptr, pb_ptr, DOT_PREC: tl.constexpr,
                    R_PAD: tl.constexpr, T: tl.constexpr):
    """Epilogue of the weight-gradient kernels (linear and conv): program ``pid``'s ``(T, R)`` / ``(R, T)``
    partials of ``M⊙G`` (``g``, already masked) for rows ``ro64`` and cols ``ri`` of the ``(out, IN)`` weight
    matrix; ``a_ptr`` / ``b_ptr`` are fp32 ``(r, IN)`` / ``(out, r)``."""
    # Epilogue contractions in fp32 (adapters passed as fp32), 16 ranks at a time (one chunk of A and B
    # live beside G, not all R; a runtime loop: unrolled, the chunks' split operands spill on sm_80):
    # (M⊙G)·Aᵀ -> (T, R) and Bᵀ·(M⊙G) -> (R, T) partials of this program.
    e = pid.to(tl.int64) * (T * R_PAD)
    rt_ = tl.arange(0, T)
    for c in range(0, R_PAD, 16):
        rc = c + tl.arange(0, 16)
        rc_ok = rc < r
        a = tl.load(a_ptr + rc[:, None] * IN + ri[None, :], mask=rc_ok[:, None] & i_ok[None, :], other=0.0)
        b = tl.load(b_ptr + ro64[:, None] * r + rc[None, :], mask=o_ok[:, None] & rc_ok[None, :], other=0.0)
        pb = small_dot(g, tl.trans(a), DOT_PREC)                          # (T, 16)
        pa = small_dot(tl.trans(b), g, DOT_PREC)                          # (16, T)
        tl.store(pb_ptr + e + rt_[:, None] * R_PAD + rc[None, :], pb)
        tl.store(pa_ptr + e + rc[:, None] * T + rt_[None, :], pa)


@triton.jit(do_not_specialize=["N", "n_listed", "tok_per_split"])
def _wgrad_masked_kernel(x_ptr, dy_ptr, a_ptr, b_ptr, mask_ptr, tiles_ptr, pa_ptr, pb_ptr,
                         N, OUT, IN, r, mask_stride, row_div, col_div, bit_mask, n_q, n_listed, tok_per_split,
                         R_PAD: tl.constexpr, EMUL_BF16: tl.constexpr, DOT_PREC: tl.constexpr,
                         T: tl.constexpr, BT: tl.constexpr):
    # Program e = k·n_listed + j: token split k (outer, so programs running together read the same
    # tokens from L2) of the j-th listed T×T weight tile.
    pid = tl.program_id(0)
    k = pid // n_listed
    tile = tl.load(tiles_ptr + pid % n_listed)
    ro = (tile // n_q) * T + tl.arange(0, T)
    ri = (tile % n_q) * T + tl.arange(0, T)
    rt = tl.arange(0, BT)
    o_ok = ro < OUT
    i_ok = ri < IN
    ro64 = ro.to(tl.int64)
    on = mask_tile(mask_ptr, mask_stride, ro64, ri, OUT, IN, row_div, col_div, bit_mask)
    g = tl.zeros((T, T), dtype=tl.float32)
    if any_on(on):   # element masks: a tile without any entry on skips the token loop
        t0 = k * tok_per_split
        t1 = tl.minimum(t0 + tok_per_split, N)
        rows = (t0 + rt).to(tl.int64)
        dy_ptrs = dy_ptr + rows[:, None] * OUT + ro[None, :]
        x_ptrs = x_ptr + rows[:, None] * IN + ri[None, :]
        for t in range(t0, t1, BT):
            t_ok = (t + rt) < t1
            dy = load_act(dy_ptrs, t_ok[:, None] & o_ok[None, :], EMUL_BF16)
            x = load_act(x_ptrs, t_ok[:, None] & i_ok[None, :], EMUL_BF16)
            g = tl.dot(tl.trans(dy), x, g, input_precision=DOT_PREC)      # G tile += dyᵀ·x
            dy_ptrs += BT * OUT
            x_ptrs += BT * IN
        g = tl.where(on, g, 0.0)                                          # M⊙G, never written
    _wgrad_partials(g, pid, ro64, ri, o_ok, i_ok, r, IN, a_ptr, b_ptr, pa_ptr, pb_ptr, DOT_PREC, R_PAD, T)


@triton.jit(do_not_specialize=["n_listed", "n_split"])
def _reduce_db_kernel(pb_ptr, rowptr_ptr, db_ptr, OUT, r, n_listed, n_split, scale,
                      R_PAD: tl.constexpr, T: tl.constexpr):
    # dB rows of tile row p = s · Σ over splits and over the listed tiles of row p (contiguous in the
    # row-major tile list) of their (T, R) partials: a fixed order, so bitwise deterministic.
    p = tl.program_id(0)
    j0 = tl.load(rowptr_ptr + p)
    j1 = tl.load(rowptr_ptr + p + 1)
    ri = tl.arange(0, T)
    rr = tl.arange(0, R_PAD)
    offs = ri[:, None] * R_PAD + rr[None, :]
    acc = tl.zeros((T, R_PAD), dtype=tl.float32)
    for k in range(0, n_split):
        for j in range(j0, j1):
            e = (k * n_listed + j).to(tl.int64) * (T * R_PAD)
            acc += tl.load(pb_ptr + e + offs)
    rows = p * T + ri
    ptrs = db_ptr + rows.to(tl.int64)[:, None] * r + rr[None, :]
    tl.store(ptrs, (acc * scale).to(db_ptr.dtype.element_ty), mask=(rows < OUT)[:, None] & (rr < r)[None, :])


@triton.jit(do_not_specialize=["n_listed", "n_split"])
def _reduce_da_kernel(pa_ptr, colptr_ptr, colidx_ptr, da_ptr, IN, r, n_listed, n_split, scale,
                      R_PAD: tl.constexpr, T: tl.constexpr):
    # dA columns of tile column q: the listed tiles of column q, in row order (colidx), every split.
    q = tl.program_id(0)
    c0 = tl.load(colptr_ptr + q)
    c1 = tl.load(colptr_ptr + q + 1)
    rr = tl.arange(0, R_PAD)
    ci = tl.arange(0, T)
    offs = rr[:, None] * T + ci[None, :]
    acc = tl.zeros((R_PAD, T), dtype=tl.float32)
    for k in range(0, n_split):
        for c in range(c0, c1):
            j = tl.load(colidx_ptr + c)
            e = (k * n_listed + j).to(tl.int64) * (T * R_PAD)
            acc += tl.load(pa_ptr + e + offs)
    cols = q * T + ci
    ptrs = da_ptr + rr[:, None] * IN + cols[None, :]
    tl.store(ptrs, (acc * scale).to(da_ptr.dtype.element_ty), mask=(rr < r)[:, None] & (cols < IN)[None, :])


# ============================================================================ composite-path kernels
# The composite path (DESIGN §4; ``costmodel.choose_path`` picks it): the rank-r delta is merged into the
# weight ONCE per call by a memory-bound kernel, the GEMMs are the vendor's (cuBLAS / cuDNN through ATen),
# and G = dyᵀ·x (one vendor GEMM) is masked and contracted into dA / dB by one more memory-bound pass.
# Why: the fused tiles above rebuild the W_eff tile in every (token tile, output tile) K step, ≈ 20
# CUDA-core instructions per weight entry per token tile (bf16 load + convert, per-entry mask byte
# address + load + shift + test, the rank-r dot's accumulator and its layout conversion, where, add,
# round) against 128 tensor-core MACs per entry per 128-token tile: on an H100 SM (128 fp32 lanes/clk,
# ~1024 bf16 MACs/clk) that is 0.16 clk of CUDA-core issue against 0.125 clk of tensor work, so the
# rebuild alone costs about as much as the GEMM; the build here costs ≈ 4 B per weight entry once.
@triton.jit
def _weff_kernel(w_ptr, a_ptr, b_ptr, mask_ptr, out_ptr, OUT, IN, r, mask_stride, row_div, col_div, bit_mask,
                 skip_empty, scale, R_PAD: tl.constexpr, W_EMUL: tl.constexpr, DOT_PREC: tl.constexpr,
                 BO: tl.constexpr, BI: tl.constexpr):
    """``W_eff = W + s·M⊙(B·A)`` for one BO×BI tile, rounded once to the output (activation) dtype: the
    rounding of ``reference.py``'s merged weight (W and the rank-r product in fp32; A and B are fp32 here,
    their dot at ``DOT_PREC`` — ``small_dot``: "ieee" runs as "tf32x3", about fp32's accuracy)."""
    pid = tl.program_id(0)
    n_i = tl.cdiv(IN, BI)
    ro = (pid // n_i) * BO + tl.arange(0, BO)
    ri = (pid % n_i) * BI + tl.arange(0, BI)
    o_ok = ro < OUT
    i_ok = ri < IN
    ok = o_ok[:, None] & i_ok[None, :]
    offs = ro[:, None] * IN + ri[None, :]     # int32: the launcher sends weights of 2**31 entries to torch
    w = load_act(w_ptr + offs, ok, W_EMUL).to(tl.float32)
    on = mask_tile(mask_ptr, mask_stride, ro, ri, OUT, IN, row_div, col_div, bit_mask)
    if (skip_empty == 0) | any_on(on):   # block masks: a tile with every block off is W alone
        d = tl.zeros((BO, BI), dtype=tl.float32)
        for c in range(0, R_PAD, 16):      # 16 ranks at a time: one chunk of A and B live, not R
            rc = c + tl.arange(0, 16)
            rc_ok = rc < r
            b = tl.load(b_ptr + ro[:, None] * r + rc[None, :], mask=o_ok[:, None] & rc_ok[None, :], other=0.0)
            a = tl.load(a_ptr + rc[:, None] * IN + ri[None, :], mask=rc_ok[:, None] & i_ok[None, :], other=0.0)
            d += small_dot(b, a, DOT_PREC)
        w = w + tl.where(on, d * scale, 0.0)
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["n_listed"])
def _mask_contract_kernel(g_ptr, a_ptr, b_ptr, mask_ptr, tiles_ptr, pa_ptr, pb_ptr, OUT, IN, r, mask_stride,
                          row_div, col_div, bit_mask, n_q, n_listed, R_PAD: tl.constexpr, G_EMUL: tl.constexpr,
                          DOT_PREC: tl.constexpr, T: tl.constexpr):
    """One program per listed T×T tile of a materialised ``G`` (``(OUT, IN)``, fp32 from linear's GEMM or
    16-bit from conv's wgrad): ``M⊙G`` contracted with A and B into this tile's partials
    (``_wgrad_partials``, the fused weight-gradient kernel's epilogue); ``_reduce_db_kernel`` /
    ``_reduce_da_kernel`` sum them in a fixed order (deterministic)."""
    pid = tl.program_id(0)
    tile = tl.load(tiles_ptr + pid)
    ro = (tile // n_q) * T + tl.arange(0, T)
    ri = (tile % n_q) * T + tl.arange(0, T)
    o_ok = ro < OUT
    i_ok = ri < IN
    ro64 = ro.to(tl.int64)
    on = mask_tile(mask_ptr, mask_stride, ro64, ri, OUT, IN, row_div, col_div, bit_mask)
    g = tl.zeros((T, T), dtype=tl.float32)
    if any_on(on):   # an element-mask tile with nothing on reads no G
        g = load_act(g_ptr + ro64[:, None] * IN + ri[None, :], on, G_EMUL).to(tl.float32)   # off entries: 0
    _wgrad_partials(g, pid, ro64, ri, o_ok, i_ok, r, IN, a_ptr, b_ptr, pa_ptr, pb_ptr, DOT_PREC, R_PAD, T)


# =================================================================================== launchers
def _fallback(x, lora_A) -> bool:
    """Cases the kernels do not take, sent to the reference (same contract): fp64 (gradcheck), ranks
    above ``utils.MAX_RANK``, empty dimensions (and, in backward, a ``dy`` dtype other than ``x``'s)."""
    return (x.dtype not in U.ACT_DTYPES or lora_A.dtype not in U.ACT_DTYPES
            or lora_A.shape[0] > U.MAX_RANK or x.numel() == 0 or lora_A.numel() == 0)


def _kernel_adapters(lora_A, lora_B, dt):
    """A, B as the GEMM kernels read them: in the activation dtype (a copy of r·(in+out) entries only
    for fp32 adapters under 16-bit activations; the kernels round them so anyway). ``lora_B`` None: None."""
    return lora_A.to(dt).contiguous(), None if lora_B is None else lora_B.to(dt).contiguous()


def _mask_u8(mask):
    """Element (uint8) or block / row (bool) mask data as a contiguous uint8 tensor (a view for bool)."""
    m = mask.contiguous()
    return m.view(torch.uint8) if m.dtype == torch.bool else m


_DUMMY: dict = {}


def _dummy_u8(device):
    """A one-byte tensor for an unused pointer argument (never read)."""
    t = _DUMMY.get(device)
    if t is None:
        t = _DUMMY[device] = torch.zeros(1, dtype=torch.uint8, device=device)
    return t


def _gemm_consts(dt, r):
    # 16-bit activations: every dot of these kernels has 16-bit operands, so DOT_PREC is unused; one
    # fixed value keeps one compiled variant.
    return dict(R_PAD=U.rank_pad(r), ACT=U.tl_dtype(dt), EMUL_BF16=U.bf16_emulated(dt),
                DOT_PREC=U.dot_precision() if dt == torch.float32 else "ieee")


def masked_lora_linear(x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale):
    if _fallback(x, lora_A) or weight.shape[0] == 0:
        return _ref.masked_lora_linear(x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale)
    N, IN = x.shape
    OUT, r = lora_B.shape
    if kind not in (NONE, ELEMENT, BLOCK, ROW):
        raise ValueError(f"unknown mask kind {kind}")
    if choose("linear", kind, N, OUT, IN, r, mask, x) == "composite":
        with U.device_guard(x), autocast.off(x):   # its precision is its own, as the reference's
            return _composite_forward(x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale)
    x, weight = x.contiguous(), weight.contiguous()
    A, B = _kernel_adapters(lora_A, lora_B, x.dtype)
    y = torch.empty(N, OUT, dtype=x.dtype, device=x.device)
    b = x if bias is None else bias.contiguous()
    consts = _gemm_consts(x.dtype, r)

    def grid(meta):
        return (triton.cdiv(N, meta["BM"]) * triton.cdiv(OUT, meta["BN"]),)

    with U.device_guard(x):
        if kind in (ELEMENT, BLOCK):
            m = _mask_u8(mask)
            _fwd_masked_kernel[grid](x, weight, b, A, B, m, y, N, OUT, IN, r, m.stride(0),
                                     *U.mask_geometry(kind, block_o, block_i), int(kind == BLOCK), float(scale),
                                     int(bias is not None), **consts)
        elif kind in (NONE, ROW):
            row = _mask_u8(mask) if kind == ROW else _dummy_u8(x.device)
            _fwd_factored_kernel[grid](x, weight, b, A, B, row, y, N, OUT, IN, r, float(scale),
                                       int(bias is not None), int(kind == ROW), **consts)
        else:
            raise ValueError(f"unknown mask kind {kind}")
    return y


def _dx(dy, x, weight, A, B, mask, kind, block_o, block_i, scale):
    N, OUT = dy.shape
    IN = x.shape[1]
    r = A.shape[0]
    dx = torch.empty(N, IN, dtype=x.dtype, device=x.device)
    consts = _gemm_consts(x.dtype, r)

    def grid(meta):
        return (triton.cdiv(N, meta["BM"]) * triton.cdiv(IN, meta["BN"]),)

    if kind in (ELEMENT, BLOCK):
        m = _mask_u8(mask)
        _dx_masked_kernel[grid](dy, weight, A, B, m, dx, N, OUT, IN, r, m.stride(0),
                                *U.mask_geometry(kind, block_o, block_i), int(kind == BLOCK), float(scale), **consts)
    else:
        row = _mask_u8(mask) if kind == ROW else _dummy_u8(x.device)
        _dx_factored_kernel[grid](dy, weight, A, B, row, dx, N, OUT, IN, r, float(scale), int(kind == ROW),
                                  **consts)
    return dx


# ---- weight-gradient tile plans: which T×T tiles get a program, and the reduction's index lists
_PLANS: dict = {}
_PLANS_MAX = 256


def _tile_plan(mask, kind, block_o, block_i, out, cols, T):
    """``(tiles, rowptr, colptr, colidx)`` (int32, on the mask's device): ``tiles`` the row-major list of
    T×T weight tiles that get a program (element: all; block: those overlapping an on block, so the
    weight-side cost falls with density); ``rowptr`` (n_p + 1) the CSR segments of ``tiles`` per tile
    row; ``colidx`` the positions in ``tiles`` grouped by tile column (row order kept), ``colptr``
    (n_q + 1) their segments.

    Block plans need the number of on tiles on the host (one sync); they are cached per mask tensor
    (keyed on its storage, its version counter, and a weak reference that proves it is the same
    tensor), so a training loop with a fixed mask pays it once."""
    dev = mask.device
    n_p, n_q = triton.cdiv(out, T), triton.cdiv(cols, T)
    if kind == ELEMENT:
        key = ("element", out, cols, T, dev)
    else:
        try:
            version = mask._version
        except RuntimeError:   # inference tensors keep no version counter: no caching
            version = None
        key = None if version is None else \
            ("block", mask.data_ptr(), version, tuple(mask.shape), block_o, block_i, out, cols, T, dev)
    hit = _PLANS.get(key) if key is not None else None
    if hit is not None and (hit[0] is None or hit[0]() is mask):
        return hit[1]
    if kind == ELEMENT:
        tiles = torch.arange(n_p * n_q, dtype=torch.int32, device=dev)
    else:
        # Tile p covers rows [p·T, p·T + T); block b covers [b·bo, b·bo + bo): overlap matrices, then
        # a tile is on iff some overlapping block is on (exact for any block size).
        def overlap(n_t, n_b, bs, extent):
            t0 = torch.arange(n_t, device=dev)[:, None] * T
            b0 = torch.arange(n_b, device=dev)[None, :] * bs
            return ((b0 < torch.clamp(t0 + T, max=extent)) & (b0 + bs > t0)).float()
        flags = mask.reshape(mask.shape[0], -1).float()
        on = overlap(n_p, flags.shape[0], block_o, out) @ flags @ overlap(n_q, flags.shape[1], block_i, cols).t()
        tiles = (on.reshape(-1) > 0).nonzero().reshape(-1).to(torch.int32)
    p, q = tiles // n_q, tiles % n_q
    rowptr = torch.zeros(n_p + 1, dtype=torch.int32, device=dev)
    rowptr[1:] = torch.bincount(p, minlength=n_p).cumsum(0)
    colptr = torch.zeros(n_q + 1, dtype=torch.int32, device=dev)
    colptr[1:] = torch.bincount(q, minlength=n_q).cumsum(0)
    colidx = torch.sort(q, stable=True).indices.to(torch.int32)
    plan = (tiles, rowptr, colptr, colidx)
    if key is None:
        return plan
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = (None if kind == ELEMENT else weakref.ref(mask), plan)
    return plan


_WGRAD_MIN_TOKENS = 512   # tokens per split at least: each split pays the (T, r) epilogue dots


def _token_split(N, n_listed, device_tensor) -> int:
    """Token splits of the weight-gradient programs: enough programs for two waves over the GPU's SMs,
    but never fewer than ``_WGRAD_MIN_TOKENS`` tokens per split. The split partials are summed like
    the tile partials (masking and contraction are linear in G)."""
    want = triton.cdiv(2 * U.sm_count(device_tensor), n_listed)
    return max(1, min(want, N // _WGRAD_MIN_TOKENS))


def _wgrad_masked(dy, x, lora_A, lora_B, mask, kind, block_o, block_i, scale, need_dA, need_dB):
    N, OUT = dy.shape
    IN = x.shape[1]
    r = lora_A.shape[0]
    dev = x.device
    T = U.wgrad_tile(kind, block_o, block_i)
    R_PAD = U.rank_pad(r)
    m = _mask_u8(mask)
    tiles, rowptr, colptr, colidx = _tile_plan(mask, kind, block_o, block_i, OUT, IN, T)   # keyed on mask itself
    n_listed = tiles.numel()
    # The reduce kernels write fp32; the (r, in) / (out, r) results are cast to the adapters' dtype.
    dA = torch.empty(lora_A.shape, dtype=torch.float32, device=dev) if need_dA else None
    dB = torch.empty(lora_B.shape, dtype=torch.float32, device=dev) if need_dB else None
    if n_listed == 0:   # every block off
        return (torch.zeros_like(lora_A) if need_dA else None), (torch.zeros_like(lora_B) if need_dB else None)
    # fp32 activations: G's dots follow torch's matmul precision. 16-bit: G's dots are 16-bit (exact
    # products); the small fp32 epilogue contractions then run at "ieee" whatever torch's setting.
    prec = U.dot_precision() if x.dtype == torch.float32 else "ieee"
    BT, warps, stages = U.wgrad_params(U.dot_class(x.dtype, prec))
    n_split = _token_split(N, n_listed, x)
    tok = triton.cdiv(triton.cdiv(N, n_split), BT) * BT
    n_split = triton.cdiv(N, tok)
    E = n_listed * n_split
    # Deterministic reduction: per-program partials (E, T, R) / (E, R, T), summed in a fixed order by
    # the reduce kernels (fp32 atomics would make dA/dB differ run to run). Their size scales with the
    # launched tiles, i.e. with the block mask's density: (R/T)·(on fraction) of an fp32 weight each.
    pb = torch.empty(E, T, R_PAD, dtype=torch.float32, device=dev)
    pa = torch.empty(E, R_PAD, T, dtype=torch.float32, device=dev)
    A32 = lora_A.to(torch.float32).contiguous()
    B32 = lora_B.to(torch.float32).contiguous()
    _wgrad_masked_kernel[(E,)](x, dy, A32, B32, m, tiles, pa, pb, N, OUT, IN, r, m.stride(0),
                               *U.mask_geometry(kind, block_o, block_i), triton.cdiv(IN, T), n_listed, tok,
                               R_PAD=R_PAD, EMUL_BF16=U.bf16_emulated(x.dtype),
                               DOT_PREC=prec, T=T, BT=BT, num_warps=warps, num_stages=stages)
    if need_dB:
        _reduce_db_kernel[(triton.cdiv(OUT, T),)](pb, rowptr, dB, OUT, r, n_listed, n_split, float(scale),
                                                 R_PAD=R_PAD, T=T, num_warps=U.REDUCE_WARPS)
    if need_dA:
        _reduce_da_kernel[(triton.cdiv(IN, T),)](pa, colptr, colidx, dA, IN, r, n_listed, n_split, float(scale),
                                                R_PAD=R_PAD, T=T, num_warps=U.REDUCE_WARPS)
    return (dA.to(lora_A.dtype) if need_dA else None), (dB.to(lora_B.dtype) if need_dB else None)


def _row_factor(mask, kind, scale, out, device, dtype):
    """``s·m`` per output channel in ``dtype``, the factor of the factored paths (``m`` all ones for
    ``NONE``)."""
    if kind == NONE:
        return torch.full((out,), float(scale), dtype=dtype, device=device)
    return mask.reshape(-1).to(dtype) * scale


def _wgrad_factored(dy, x, lora_A, lora_B, mask, kind, scale, need_dA, need_dB):
    """Row / no mask: ``dB = s·diag(m)·dyᵀ·(x·Aᵀ)``, ``dA = (dy·(s·diag(m)·B))ᵀ·x``, small torch GEMMs in
    the activation dtype (as the reference), no ``(N, out)`` temporary."""
    dt = x.dtype
    A = lora_A.to(dt)
    B = lora_B.to(dt)
    rs = _row_factor(mask, kind, scale, B.shape[0], x.device, dt)
    dA = dB = None
    if need_dB:
        dB = ((dy.t() @ (x @ A.t())) * rs[:, None]).to(lora_B.dtype)
    if need_dA:
        dA = ((dy @ (B * rs[:, None])).t() @ x).to(lora_A.dtype)
    return dA, dB


# ------------------------------------------------------------------------------ composite path
# W_eff build tile: 64×64 on a GPU (a 16 KiB fp32 tile over 4 warps, 32 registers a thread; a 1280×1280
# weight gives 400 programs, 3 per H100 SM; a 320×320 one 25, launch-bound either way at 0.4 MB);
# one large tile under the interpreter (it pays per program).
_WEFF_TILE = (128, 128) if U.INTERPRET else (64, 64)
_WEFF_WARPS = 8     # 4 warps: 128-231 registers a thread and 16 B of spills (fp32 tf32, rank 32, sm_80)
_STAGES = 1         # no K loop to pipeline (the rank loop is 1-4 steps of KiB-sized A / B chunks)
# Mask-and-contract: 8 warps hold the fp32 T×T G tile (16 registers a thread at T 64) and one 16-rank
# chunk of the epilogue's operands, as the fused weight-gradient kernel's epilogue (``_wgrad_partials``).
_CONTRACT_WARPS = 8
_WEFF_MAX = 2 ** 31   # weights of this many entries or more: W_eff built by torch (int32 offsets in the kernel)
_DENSITY: dict = {}


def _block_density(mask) -> float:
    """Fraction of a block mask's blocks that are on (for the cost model), cached per mask tensor like
    :func:`_tile_plan` (one host sync per mask version, not per call)."""
    try:
        version = mask._version
    except RuntimeError:
        version = None
    key = None if version is None else (mask.data_ptr(), version, tuple(mask.shape), mask.device)
    hit = _DENSITY.get(key) if key is not None else None
    if hit is not None and hit[0]() is mask:
        return hit[1]
    d = float(mask.float().mean()) if mask.numel() else 0.0
    if key is not None:
        if len(_DENSITY) >= _PLANS_MAX:
            _DENSITY.pop(next(iter(_DENSITY)))
        _DENSITY[key] = (weakref.ref(mask), d)
    return d


def choose(op, kind, n, out, cols, r, mask, x) -> str:
    """``"composite"`` or ``"fused"`` for one call (``spare_kernels.costmodel.choose_path``;
    ``SPARE_KERNELS_PATH`` forces one)."""
    from ... import costmodel
    # A block mask's density is known cheaply (cached); an element mask's would need a popcount per call:
    # the model's default stands in for it.
    kw = dict(density=_block_density(mask)) if kind == BLOCK else {}
    return costmodel.choose_path(op, kind, n, out, cols, r, dtype=x.dtype, device=x.device, backend="triton", **kw)


def build_weff(weight, lora_A, lora_B, mask, kind, block_o, block_i, scale, dtype):
    """``W + s·M⊙(B·A)`` as an ``(out, cols)`` tensor in ``dtype`` (``weight`` any ``(out, …)`` shape, viewed as
    ``(out, cols)``; ``lora_A`` ``(r, …)`` likewise), element or block masks: one memory-bound pass, ≈ 4 B
    per weight entry at 16 bits (read W, write W_eff, 1/8 B of mask bits; A and B are KiBs)."""
    out = weight.shape[0]
    w = weight.reshape(out, -1).contiguous()
    cols = w.shape[1]
    r = lora_A.shape[0]
    A32 = lora_A.reshape(r, cols).to(torch.float32).contiguous()
    B32 = lora_B.to(torch.float32).contiguous()
    if out * cols >= _WEFF_MAX:   # past the kernel's int32 offsets: torch (fp32, then one rounding)
        m = fmt.expand(mask, kind, block_o, block_i, out, cols).to(w.device)
        return (w.to(torch.float32) + (B32 @ A32).mul_(float(scale)).mul_(m)).to(dtype)
    w_eff = torch.empty(out, cols, dtype=dtype, device=w.device)
    m = _mask_u8(mask)
    BO, BI = _WEFF_TILE
    with U.device_guard(w):
        _weff_kernel[(triton.cdiv(out, BO) * triton.cdiv(cols, BI),)](
            w, A32, B32, m, w_eff, out, cols, r, m.stride(0), *U.mask_geometry(kind, block_o, block_i),
            int(kind == BLOCK), float(scale), R_PAD=U.rank_pad(r), W_EMUL=U.bf16_emulated(w.dtype),
            DOT_PREC=U.dot_precision() if dtype == torch.float32 else "ieee", BO=BO, BI=BI, num_warps=_WEFF_WARPS,
            num_stages=_STAGES)
    return w_eff


_WARNED_MM_DTYPE = []


def grad_weight_f32(dy, x):
    """``G = dyᵀ·x`` in fp32 as one vendor GEMM. 16-bit on CUDA: ``torch.mm(a, b, out_dtype=torch.float32)``
    (``aten::mm.dtype``, CUDA only: 16-bit operands, fp32 accumulation and output, no fp32 copies of the
    activations); fp32: ``torch.mm`` at torch's matmul precision, as the reference. On CPU tensors (the
    interpreter's tests) the fp32 upcast, the same math."""
    if dy.dtype == torch.float32:
        return torch.mm(dy.t(), x)
    if dy.is_cuda:
        try:
            return torch.mm(dy.t(), x, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError) as e:   # a torch without aten::mm.dtype
            if not _WARNED_MM_DTYPE:
                _WARNED_MM_DTYPE.append(1)
                import warnings
                warnings.warn(f"triton backend: torch.mm(..., out_dtype=torch.float32) failed ({e}); G = dyᵀ·x "
                              "falls back to fp32 copies of dy and x", RuntimeWarning, stacklevel=2)
    return torch.mm(dy.t().to(torch.float32), x.to(torch.float32))


def mask_contract(G, lora_A, lora_B, mask, kind, block_o, block_i, scale, need_dA, need_dB, act_dtype):
    """``dA = s·Bᵀ·(M⊙G)``, ``dB = s·(M⊙G)·Aᵀ`` from a materialised ``G`` (``(out, cols)``, fp32 or 16-bit),
    element or block masks: one pass over G's listed tiles (block masks: the tiles overlapping an on block)
    into per-tile partials, summed by the reduce kernels in a fixed order (bitwise deterministic). ``dA``
    takes ``lora_A``'s shape and dtype, ``dB`` ``lora_B``'s. ``act_dtype`` picks the fp32 dots' precision
    (the fused kernels' rule)."""
    OUT, IN = G.shape
    r = lora_A.shape[0]
    dev = G.device
    T = U.wgrad_tile(kind, block_o, block_i)
    R_PAD = U.rank_pad(r)
    tiles, rowptr, colptr, colidx = _tile_plan(mask, kind, block_o, block_i, OUT, IN, T)
    n_listed = tiles.numel()
    if n_listed == 0:   # every block off
        return (torch.zeros_like(lora_A) if need_dA else None), (torch.zeros_like(lora_B) if need_dB else None)
    m = _mask_u8(mask)
    pb = torch.empty(n_listed, T, R_PAD, dtype=torch.float32, device=dev)
    pa = torch.empty(n_listed, R_PAD, T, dtype=torch.float32, device=dev)
    A32 = lora_A.reshape(r, IN).to(torch.float32).contiguous()
    B32 = lora_B.to(torch.float32).contiguous()
    G = G.contiguous()
    dA = torch.empty(r, IN, dtype=torch.float32, device=dev) if need_dA else None
    dB = torch.empty(OUT, r, dtype=torch.float32, device=dev) if need_dB else None
    with U.device_guard(G):
        _mask_contract_kernel[(n_listed,)](G, A32, B32, m, tiles, pa, pb, OUT, IN, r, m.stride(0),
                                           *U.mask_geometry(kind, block_o, block_i), triton.cdiv(IN, T), n_listed,
                                           R_PAD=R_PAD, G_EMUL=U.bf16_emulated(G.dtype),
                                           DOT_PREC=U.dot_precision() if act_dtype == torch.float32 else "ieee",
                                           T=T, num_warps=_CONTRACT_WARPS, num_stages=_STAGES)
        if need_dB:
            _reduce_db_kernel[(triton.cdiv(OUT, T),)](pb, rowptr, dB, OUT, r, n_listed, 1, float(scale),
                                                     R_PAD=R_PAD, T=T, num_warps=U.REDUCE_WARPS)
        if need_dA:
            _reduce_da_kernel[(triton.cdiv(IN, T),)](pa, colptr, colidx, dA, IN, r, n_listed, 1, float(scale),
                                                    R_PAD=R_PAD, T=T, num_warps=U.REDUCE_WARPS)
    return ((dA.view(lora_A.shape).to(lora_A.dtype) if need_dA else None),
            (dB.to(lora_B.dtype) if need_dB else None))


def masked_B(lora_B, mask, kind, dtype):
    """``diag(m)·B`` in ``dtype`` (exact: m is 0/1; ``B`` itself for ``NONE``), for the factored composite."""
    B = lora_B.to(dtype)
    return B if kind == NONE else B * mask.reshape(-1, 1).to(dtype)


def as_dtype(t, dtype):
    return None if t is None else (t if t.dtype == dtype else t.to(dtype))


# Keep W_eff from the forward for the backward's dx, or rebuild it? Rebuilt: keeping it is an out×in tensor
# per patched layer alive from forward to backward, for SD-1.5 at bf16 178 MiB with SPARE's attention
# targets (93.5 M weights) and 1.6 GiB with every Linear and Conv2d (859 M; diffusers' config, counted on the
# meta device), while the rebuild costs ≈ 4 B per entry of memory traffic (≈ 2.5 µs for a 1280×1280 layer at
# ~2.7 TB/s). (The op's backward also receives only W, A, B and the mask, not forward's intermediates.)
def _composite_forward(x, weight, bias, lora_A, lora_B, mask, kind, block_o, block_i, scale):
    dt = x.dtype
    if kind in (ELEMENT, BLOCK):
        w_eff = build_weff(weight, lora_A, lora_B, mask, kind, block_o, block_i, scale, dt)
        return F.linear(x, w_eff, as_dtype(bias, dt))
    # Row / no mask: factored through vendor GEMMs, never an out×in tensor (DESIGN §1): x·Wᵀ + b, then the
    # rank-r term added in the GEMM's epilogue (addmm's alpha: s applied to the fp32 accumulator).
    y = F.linear(x, as_dtype(weight, dt), as_dtype(bias, dt))
    h = x @ lora_A.to(dt).t()                                            # (N, r)
    return y.addmm_(h, masked_B(lora_B, mask, kind, dt).t(), alpha=float(scale))


def _composite_backward(dy, x, weight, lora_A, lora_B, mask, kind, block_o, block_i, scale,
                        need_dx, need_dA, need_dB):
    dt = x.dtype
    dx = dA = dB = None
    if kind in (ELEMENT, BLOCK):
        if need_dx:
            dx = torch.mm(dy, build_weff(weight, lora_A, lora_B, mask, kind, block_o, block_i, scale, dt))
        if need_dA or need_dB:
            dA, dB = mask_contract(grad_weight_f32(dy, x), lora_A, lora_B, mask, kind, block_o, block_i, scale,
                                   need_dA, need_dB, dt)
        return dx, dA, dB
    if need_dx:   # dy·W + s·(dy·diag(m)·B)·A
        dx = torch.mm(dy, as_dtype(weight, dt))
        dx.addmm_(torch.mm(dy, masked_B(lora_B, mask, kind, dt)), lora_A.to(dt), alpha=float(scale))
    if need_dA or need_dB:
        dA, dB = _wgrad_factored(dy, x, lora_A, lora_B, mask, kind, scale, need_dA, need_dB)
    return dx, dA, dB


def masked_lora_linear_backward(dy, x, weight, lora_A, lora_B, mask, kind, block_o, block_i, scale,
                                need_dx, need_dA, need_dB):
    if _fallback(x, lora_A) or weight.shape[0] == 0 or dy.dtype != x.dtype:
        return _ref.masked_lora_linear_backward(dy, x, weight, lora_A, lora_B, mask, kind, block_o, block_i,
                                                scale, need_dx, need_dA, need_dB)
    if kind not in (NONE, ELEMENT, BLOCK, ROW):
        raise ValueError(f"unknown mask kind {kind}")
    dy, x = dy.contiguous(), x.contiguous()
    if choose("linear", kind, x.shape[0], weight.shape[0], x.shape[1], lora_A.shape[0], mask, x) == "composite":
        with U.device_guard(x), autocast.off(x):   # its precision is its own, as the reference's
            grads = _composite_backward(dy, x, weight, lora_A, lora_B, mask, kind, block_o, block_i, scale,
                                        need_dx, need_dA, need_dB)
        return _ref._none_to_empty(x, *grads)
    dx = dA = dB = None
    with U.device_guard(x):
        if need_dx:
            A, B = _kernel_adapters(lora_A, lora_B, x.dtype)
            dx = _dx(dy, x, weight.contiguous(), A, B, mask, kind, block_o, block_i, scale)
        if need_dA or need_dB:
            if kind in (ELEMENT, BLOCK):
                dA, dB = _wgrad_masked(dy, x, lora_A, lora_B, mask, kind, block_o, block_i, scale, need_dA, need_dB)
            else:
                dA, dB = _wgrad_factored(dy, x, lora_A, lora_B, mask, kind, scale, need_dA, need_dB)
    return _ref._none_to_empty(x, dx, dA, dB)


# ============================================================================ AOT specialisations
def aot_specs():
    """Every specialisation the launchers above can launch on a GPU (``aot.py`` compiles them all):
    activation dtypes × fp32 dot precisions where fp32 dots occur (both of torch's settings) × padded
    ranks × the autotune set of the launch's dot class and rank; the weight-gradient tiles; the reduce
    kernels. Mask kinds are runtime arguments (``utils.mask_geometry``); EMUL_BF16 is an interpreter-only
    switch, always False here."""
    specs = []
    i32, f32, u8 = "i32", "fp32", "*u8"
    geo = dict(mask_stride=i32, row_div=i32, col_div=i32, bit_mask=i32)
    for dt in U.ACT_DTYPES:
        p, name = U.ptr(dt), U.SIG_DTYPES[dt]
        for prec in (("ieee", "tf32") if dt == torch.float32 else ("ieee",)):
            cls = U.dot_class(dt, prec)
            BT, warps, stages = U.wgrad_params(cls)
            for R in U.RANK_PADS:
                base = dict(R_PAD=R, EMUL_BF16=False, DOT_PREC=prec)
                for cfg in U.gemm_configs(cls, R):
                    c = dict(base, ACT=U.tl_dtype(dt), **cfg.kwargs)
                    lab = f"{name} {prec} R{R} {U.config_label(cfg)}"
                    specs.append(U.make_spec(_fwd_masked_kernel, dict(
                        x_ptr=p, w_ptr=p, bias_ptr=p, a_ptr=p, b_ptr=p, mask_ptr=u8, y_ptr=p, N=i32, OUT=i32,
                        IN=i32, r=i32, **geo, skip_empty=i32, scale=f32, has_bias=i32),
                        c, cfg.num_warps, cfg.num_stages, lab))
                    specs.append(U.make_spec(_dx_masked_kernel, dict(
                        dy_ptr=p, w_ptr=p, a_ptr=p, b_ptr=p, mask_ptr=u8, dx_ptr=p, N=i32, OUT=i32, IN=i32,
                        r=i32, **geo, skip_empty=i32, scale=f32), c, cfg.num_warps, cfg.num_stages, lab))
                    specs.append(U.make_spec(_fwd_factored_kernel, dict(
                        x_ptr=p, w_ptr=p, bias_ptr=p, a_ptr=p, b_ptr=p, row_ptr=u8, y_ptr=p, N=i32, OUT=i32,
                        IN=i32, r=i32, scale=f32, has_bias=i32, has_row=i32), c, cfg.num_warps, cfg.num_stages, lab))
                    specs.append(U.make_spec(_dx_factored_kernel, dict(
                        dy_ptr=p, w_ptr=p, a_ptr=p, b_ptr=p, row_ptr=u8, dx_ptr=p, N=i32, OUT=i32, IN=i32, r=i32,
                        scale=f32, has_row=i32), c, cfg.num_warps, cfg.num_stages, lab))
                for T in U.WGRAD_TILES:
                    specs.append(U.make_spec(_wgrad_masked_kernel, dict(
                        x_ptr=p, dy_ptr=p, a_ptr="*fp32", b_ptr="*fp32", mask_ptr=u8, tiles_ptr="*i32",
                        pa_ptr="*fp32", pb_ptr="*fp32", N=i32, OUT=i32, IN=i32, r=i32, **geo,
                        n_q=i32, n_listed=i32, tok_per_split=i32),
                        dict(base, T=T, BT=BT), warps, stages, f"{name} {prec} R{R} T{T} BT{BT}-w{warps}-s{stages}"))
    for R in U.RANK_PADS:
        for T in U.WGRAD_TILES:
            lab = f"R{R} T{T}"   # 3 stages: the launchers pass none (Triton's default)
            specs.append(U.make_spec(_reduce_db_kernel, dict(
                pb_ptr="*fp32", rowptr_ptr="*i32", db_ptr="*fp32", OUT=i32, r=i32, n_listed=i32,
                n_split=i32, scale=f32), dict(R_PAD=R, T=T), U.REDUCE_WARPS, 3, lab))
            specs.append(U.make_spec(_reduce_da_kernel, dict(
                pa_ptr="*fp32", colptr_ptr="*i32", colidx_ptr="*i32", da_ptr="*fp32", IN=i32, r=i32,
                n_listed=i32, n_split=i32, scale=f32), dict(R_PAD=R, T=T), U.REDUCE_WARPS, 3, lab))
    return specs + composite_aot_specs()


def composite_aot_specs():
    """The composite path's kernels as the launchers launch them: the W_eff build per activation dtype (the
    weight's and the output's) × fp32 dot precision (fp32 activations: torch's two settings) × padded rank;
    the mask-and-contract pass per G dtype (fp32 from linear's GEMM, the activation dtype from conv's wgrad)
    × precision × padded rank × weight-gradient tile."""
    specs = []
    i32, f32 = "i32", "fp32"
    geo = dict(mask_stride=i32, row_div=i32, col_div=i32, bit_mask=i32)
    BO, BI = _WEFF_TILE
    for dt in U.ACT_DTYPES:
        p, name = U.ptr(dt), U.SIG_DTYPES[dt]
        for prec in (("ieee", "tf32") if dt == torch.float32 else ("ieee",)):
            for R in U.RANK_PADS:
                specs.append(U.make_spec(_weff_kernel, dict(
                    w_ptr=p, a_ptr="*fp32", b_ptr="*fp32", mask_ptr="*u8", out_ptr=p, OUT=i32, IN=i32, r=i32,
                    **geo, skip_empty=i32, scale=f32), dict(R_PAD=R, W_EMUL=False, DOT_PREC=prec, BO=BO, BI=BI),
                    _WEFF_WARPS, _STAGES, f"{name} {prec} R{R} BO{BO}-BI{BI}-w{_WEFF_WARPS}"))
                for T in U.WGRAD_TILES:
                    specs.append(U.make_spec(_mask_contract_kernel, dict(
                        g_ptr=p, a_ptr="*fp32", b_ptr="*fp32", mask_ptr="*u8", tiles_ptr="*i32", pa_ptr="*fp32",
                        pb_ptr="*fp32", OUT=i32, IN=i32, r=i32, **geo, n_q=i32, n_listed=i32),
                        dict(R_PAD=R, G_EMUL=False, DOT_PREC=prec, T=T), _CONTRACT_WARPS, _STAGES,
                        f"G {name} {prec} R{R} T{T}-w{_CONTRACT_WARPS}"))
    return specs
