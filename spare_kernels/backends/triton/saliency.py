"""Triton kernels for linear and conv2d saliency (DESIGN §1): ``acc (out, in) fp32 += stat`` over a batch of samples,
``x (S, T, in)``, ``dy (S, T, out)``, per-sample gradient ``g_i = Σ_t dy_tᵀ·x_t``:

- ``grad_abs``: ``|Σ_i g_i|``; ``signed``: ``Σ_i g_i`` (one pass over all tokens of the G tile);
- ``sample_abs``: ``Σ_i |g_i|``; ``sample_sq``: ``Σ_i g_i²``.

One program per ``BO×BI`` weight tile loops over the samples; each sample's ``g_i`` tile is accumulated
over its tokens in registers, then ``|g_i|`` or ``g_i²`` is added to the tile's running statistic; one
read-modify-write of ``acc`` at the end. No per-sample gradient is ever in memory. With one token per
sample (``T == 1``) ``g_i = dy_iᵀ·x_i`` is rank one, so ``|g_i| = |dy_i|ᵀ·|x_i|`` and ``g_i² =
(dy_i²)ᵀ·(x_i²)``: the sample statistics become one GEMM over the samples.

Conv2d (``saliency_conv2d``): ``acc`` has the weight's shape ``(out, C/g, kh, kw)``, seen as the ``(out, K)``
matrix; ``g_i = Σ_{pixels of sample i} dy_pᵀ·unfold(x)_p``. Same scheme: one program per ``BO×BI`` tile of
that matrix loops over the samples, each ``g_i`` tile accumulated over the sample's output pixels with the
unfolded input gathered on the fly (``conv._g_tile``, the implicit im2col of the conv weight-gradient
kernel); ``grad_abs`` / ``signed`` in one pass over all pixels. No rank-one shortcut (a conv sample has
``H'·W'`` pixels; with one pixel the per-sample loop is still exact).

Split over samples (``sample_abs`` / ``sample_sq``): a weight with few tiles (a 320×320 attention projection
has 25 tiles of 64×64 for 132 SMs on an H100) would leave most of the GPU idle, and a sample's tokens
cannot be split (``|g_i|`` needs the whole ``g_i``). So the samples are split into ``G`` groups (grid =
tiles × groups, each program one tile and one group's consecutive samples, constexpr ``SPLIT``), each
program stores its tile's partial into a ``(G, out, in)`` fp32 buffer, and ``_saliency_reduce_kernel``
adds the partials to ``acc`` in group order: deterministic, no atomics. ``_groups`` picks ``G``.

Precision: as the reference (fp32 accumulation): 16-bit inputs go to 16-bit tensor-core dots with fp32
accumulation (exact products); abs / square and the rank-one GEMM in fp32.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from .. import reference as _ref
from . import utils as U
from .conv import _Geom, _g_tile, _not_for_kernels
from .utils import load_act

STATS = ("grad_abs", "signed", "sample_abs", "sample_sq")
# Kernel variants (constexpr): one pass over all tokens (grad_abs, signed), a loop over samples
# (sample_abs, sample_sq), the rank-one GEMM (sample stats with T == 1). abs vs square is a runtime flag
# (one elementwise op per sample tile), so the four statistics share three compiled variants.
ONE_PASS, PER_SAMPLE, RANK_ONE = 0, 1, 2
# SPLIT values each variant launches with (the one-pass statistics never split over samples).
SPLITS = {ONE_PASS: (False,), PER_SAMPLE: (False, True), RANK_ONE: (False, True)}


@U.autotune(configs=U.saliency_configs(), key=["T", "OUT", "IN", "VARIANT", "DOT_PREC", "SPLIT"],
                 prune_configs_by={"early_config_prune": U.pruner(U.saliency_configs, "x_ptr", "FP32_DOTS")},
                 restore_value=["acc_ptr"])   # benchmarking runs must not add to acc several times
@triton.jit(do_not_specialize=["S", "SPG"])
def _saliency_linear_kernel(acc_ptr, part_ptr, x_ptr, dy_ptr, S, T, OUT, IN, square, SPG,
                            VARIANT: tl.constexpr, SPLIT: tl.constexpr, FP32_DOTS: tl.constexpr,
                            EMUL_BF16: tl.constexpr, DOT_PREC: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
                            BT: tl.constexpr):
    # square: per-sample variants add g² (else |g|); the one-pass variant takes |G| if square == 0
    # (grad_abs) and G as is otherwise (signed). FP32_DOTS: the variant's dots are fp32 (rank one).
    # SPLIT (per-sample variants): samples [s0, s1) of group program_id(1), SPG per group, the partial
    # stored to part_ptr's group slice; else all samples and acc += the tile (constexpr: the unsplit
    # kernel keeps its registers).
    pid = tl.program_id(0)
    if SPLIT:
        s0 = tl.program_id(1) * SPG
        s1 = tl.minimum(S, s0 + SPG)
    else:
        s0 = 0
        s1 = S
    n_i = tl.cdiv(IN, BI)
    ro = (pid // n_i) * BO + tl.arange(0, BO)   # row-major over tiles: neighbours share dy columns
    ri = (pid % n_i) * BI + tl.arange(0, BI)
    rt = tl.arange(0, BT)
    o_ok = ro < OUT
    i_ok = ri < IN
    tot = tl.zeros((BO, BI), dtype=tl.float32)
    if VARIANT == 0:
        # grad_abs / signed: G over all S·T tokens at once (never split).
        NT = S * T
        dy_ptrs = dy_ptr + rt.to(tl.int64)[:, None] * OUT + ro[None, :]
        x_ptrs = x_ptr + rt.to(tl.int64)[:, None] * IN + ri[None, :]
        for t in range(0, NT, BT):
            t_ok = (t + rt) < NT
            dy = load_act(dy_ptrs, t_ok[:, None] & o_ok[None, :], EMUL_BF16)
            x = load_act(x_ptrs, t_ok[:, None] & i_ok[None, :], EMUL_BF16)
            tot = tl.dot(tl.trans(dy), x, tot, input_precision=DOT_PREC)
            dy_ptrs += BT * OUT
            x_ptrs += BT * IN
        if square == 0:
            tot = tl.abs(tot)
    elif VARIANT == 2:
        # T == 1: Σ_i |dy_i|ᵀ|x_i| (or squares) is one GEMM over the samples, in fp32 (squares of
        # 16-bit gradients would underflow in 16 bits).
        rows0 = (s0 + rt).to(tl.int64)
        dy_ptrs = dy_ptr + rows0[:, None] * OUT + ro[None, :]
        x_ptrs = x_ptr + rows0[:, None] * IN + ri[None, :]
        for s in range(s0, s1, BT):
            s_ok = (s + rt) < s1
            dy = tl.load(dy_ptrs, mask=s_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_ptrs, mask=s_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
            if square != 0:
                dy = dy * dy
                x = x * x
            else:
                dy = tl.abs(dy)
                x = tl.abs(x)
            tot = tl.dot(tl.trans(dy), x, tot, input_precision=DOT_PREC)
            dy_ptrs += BT * OUT
            x_ptrs += BT * IN
    else:
        for s in range(s0, s1):
            rows = (s * T + rt).to(tl.int64)   # (S·T)·max(in, out) can pass 2**31
            dy_ptrs = dy_ptr + rows[:, None] * OUT + ro[None, :]
            x_ptrs = x_ptr + rows[:, None] * IN + ri[None, :]
            g = tl.zeros((BO, BI), dtype=tl.float32)
            for t in range(0, T, BT):
                t_ok = (t + rt) < T
                dy = load_act(dy_ptrs, t_ok[:, None] & o_ok[None, :], EMUL_BF16)
                x = load_act(x_ptrs, t_ok[:, None] & i_ok[None, :], EMUL_BF16)
                g = tl.dot(tl.trans(dy), x, g, input_precision=DOT_PREC)   # g_i tile, registers only
                dy_ptrs += BT * OUT
                x_ptrs += BT * IN
            if square != 0:
                tot += g * g
            else:
                tot += tl.abs(g)
    offs = ro.to(tl.int64)[:, None] * IN + ri[None, :]
    ok = o_ok[:, None] & i_ok[None, :]
    if SPLIT:
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * OUT * IN + offs, tot, mask=ok)
    else:
        tl.store(acc_ptr + offs, tl.load(acc_ptr + offs, mask=ok, other=0.0) + tot, mask=ok)


@triton.jit(do_not_specialize=["G"])
def _saliency_reduce_kernel(acc_ptr, part_ptr, N, G, BLOCK: tl.constexpr):
    # acc[e] += Σ_g part[g, e], groups in order (deterministic).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    tot = tl.zeros((BLOCK,), dtype=tl.float32)
    for g in range(0, G):
        tot += tl.load(part_ptr + g * N + offs, mask=ok, other=0.0)
    tl.store(acc_ptr + offs, tl.load(acc_ptr + offs, mask=ok, other=0.0) + tot, mask=ok)


# Entries per reduction program: 1024 fp32 per pass of the group loop, 4 warps (8 per thread): a
# streaming pass, ≈ memory-bound at any size that fills the GPU.
REDUCE_BLOCK = 1024
# Programs per SM the split aims at: the saliency configs run 8 warps with two 64×64 fp32 tiles in
# registers, ≈ 2 programs per SM (estimate, not yet measured); one full wave.
PROGRAMS_PER_SM = 2
# Bound on the partials (G, out, in) fp32: 2^24 entries = 64 MiB, as the CUDA backend's scratch.
MAX_PARTIAL = 1 << 24
# The tile the group count is computed for: the default config's 64×64 (a 32×64 pick doubles the tiles,
# so a split computed for 64×64 is at most 2× more groups than needed).
SPLIT_TILE = 64


def _groups(S, out, cols, x):
    """(samples per group, groups): enough tile × group programs for PROGRAMS_PER_SM per SM, never more
    groups than samples, partials within MAX_PARTIAL; one group (no partials) when the tiles fill the GPU."""
    tiles = triton.cdiv(out, SPLIT_TILE) * triton.cdiv(cols, SPLIT_TILE)
    g = min(S, triton.cdiv(PROGRAMS_PER_SM * U.sm_count(x), tiles))
    if g > 1 and g * out * cols > MAX_PARTIAL:
        g = max(1, MAX_PARTIAL // (out * cols))
    g = max(1, g)
    spg = triton.cdiv(S, g)
    return spg, triton.cdiv(S, spg)


def _launch_split(S, out, cols, work, x, groups, per_sample, launch):
    """Run ``launch(part, spg, G)`` over sample groups, then the fixed-order reduction into ``work``.
    ``groups`` forces the group count (tests); None: :func:`_groups`. Only the per-sample statistics split
    (grad_abs / signed: one group)."""
    if not per_sample:
        spg, G = S, 1
    elif groups is None:
        spg, G = _groups(S, out, cols, x)
    else:
        spg = triton.cdiv(S, max(1, min(int(groups), S)))
        G = triton.cdiv(S, spg)
    if G == 1:
        launch(work, S, 1)      # part_ptr unused: acc += the tile, no partials
        return
    part = torch.empty((G, out * cols), dtype=torch.float32, device=work.device)   # every entry written
    launch(part, spg, G)
    n = out * cols
    _saliency_reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK),)](work, part, n, G, BLOCK=REDUCE_BLOCK, num_warps=4)


def saliency_linear(acc, x, dy, stat, groups=None):
    """``acc (out, in) fp32 += stat``; ``x (S, T, in)``, ``dy (S, T, out)`` (the reference's contract)."""
    if stat not in STATS:
        raise ValueError(f"stat: unknown {stat!r}")
    if (acc.dtype != torch.float32 or x.dtype not in U.ACT_DTYPES or dy.dtype != x.dtype
            or x.numel() == 0 or dy.numel() == 0 or acc.numel() == 0):
        # fp64 accumulators, mixed input dtypes and empty batches: the reference (same contract).
        return _ref.saliency_linear(acc, x, dy, stat)
    S, T, IN = x.shape
    OUT = dy.shape[2]
    per_sample = stat.startswith("sample_")
    variant = (RANK_ONE if T == 1 else PER_SAMPLE) if per_sample else ONE_PASS
    x, dy = x.contiguous(), dy.contiguous()
    work = acc if acc.is_contiguous() else acc.contiguous()
    fp32_dots = variant == RANK_ONE
    # fp32 dots (fp32 inputs, or the rank-one variant) follow torch's matmul precision.
    prec = U.dot_precision() if (x.dtype == torch.float32 or fp32_dots) else "ieee"

    def launch(part, spg, G):
        def grid(meta):
            return (triton.cdiv(OUT, meta["BO"]) * triton.cdiv(IN, meta["BI"]), G)

        _saliency_linear_kernel[grid](work, part, x, dy, S, T, OUT, IN, int(stat in ("signed", "sample_sq")), spg,
                                      VARIANT=variant, SPLIT=G > 1, FP32_DOTS=fp32_dots,
                                      EMUL_BF16=U.bf16_emulated(x.dtype), DOT_PREC=prec)

    with U.device_guard(x):
        _launch_split(S, OUT, IN, work, x, groups, per_sample, launch)
    if work is not acc:
        acc.copy_(work)


@U.autotune(configs=U.conv_saliency_configs(),
                 key=["C", "H", "W", "OUT", "KH", "KW", "sh", "sw", "VARIANT", "DOT_PREC", "SPLIT"],
                 prune_configs_by={"early_config_prune": U.pruner(U.conv_saliency_configs, "x_ptr")},
                 restore_value=["acc_ptr"])   # benchmarking runs must not add to acc several times
@triton.jit(do_not_specialize=["S", "SPG"])
def _saliency_conv_kernel(acc_ptr, part_ptr, x_ptr, dy_ptr, S, C, H, W, OUT, OH, OW, CG, OUTG, KH, KW,
                          sh, sw, ph, pw, dh, dw, square, SPG,
                          VARIANT: tl.constexpr, SPLIT: tl.constexpr, EMUL_BF16: tl.constexpr, DOT_PREC: tl.constexpr,
                          BO: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr):
    # square, SPG, SPLIT as in _saliency_linear_kernel; VARIANT ONE_PASS or PER_SAMPLE (pixels of a sample =
    # OH·OW).
    K = CG * KH * KW
    OHW = OH * OW
    pid = tl.program_id(0)
    if SPLIT:
        s0 = tl.program_id(1) * SPG
        s1 = tl.minimum(S, s0 + SPG)
    else:
        s0 = 0
        s1 = S
    n_i = tl.cdiv(K, BI)
    o_first = (pid // n_i) * BO
    ro = o_first + tl.arange(0, BO)
    ri = (pid % n_i) * BI + tl.arange(0, BI)
    o_ok = ro < OUT
    i_ok = ri < K
    tot = tl.zeros((BO, BI), dtype=tl.float32)
    if VARIANT == 0:
        tot = _g_tile(tot, x_ptr, dy_ptr, 0, S * OHW, o_first, ro, o_ok, ri, i_ok, C, H, W, OUT, OH, OW, CG, OUTG,
                      KH, KW, sh, sw, ph, pw, dh, dw, EMUL_BF16, DOT_PREC, BO, BT)
        if square == 0:
            tot = tl.abs(tot)
    else:
        for s in range(s0, s1):
            g = tl.zeros((BO, BI), dtype=tl.float32)           # g_i tile, registers only
            g = _g_tile(g, x_ptr, dy_ptr, s * OHW, (s + 1) * OHW, o_first, ro, o_ok, ri, i_ok, C, H, W, OUT, OH, OW,
                        CG, OUTG, KH, KW, sh, sw, ph, pw, dh, dw, EMUL_BF16, DOT_PREC, BO, BT)
            if square != 0:
                tot += g * g
            else:
                tot += tl.abs(g)
    offs = ro[:, None] * K + ri[None, :]
    ok = o_ok[:, None] & i_ok[None, :]
    if SPLIT:
        tl.store(part_ptr + tl.program_id(1).to(tl.int64) * OUT * K + offs, tot, mask=ok)
    else:
        tl.store(acc_ptr + offs, tl.load(acc_ptr + offs, mask=ok, other=0.0) + tot, mask=ok)


def _conv_splits(variant, dt, prec):
    """Whether a conv launch may split over samples: the per-sample variant, except with fp32 "ieee" dots
    (CUDA-core FMAs, registers at the limit: its split variant spilled 8-40 B on sm_90 in the AOT compile)."""
    return variant == PER_SAMPLE and not (dt == torch.float32 and prec == "ieee")


def saliency_conv2d(acc, x, dy, stat, stride, padding, dilation, groups, sample_groups=None):
    """``acc`` (weight shape, fp32) ``+= stat``; ``x (S, C, H, W)``, ``dy (S, out, H', W')`` (the reference's
    contract)."""
    if stat not in STATS:
        raise ValueError(f"stat: unknown {stat!r}")
    if (acc.dtype != torch.float32 or x.dtype not in U.ACT_DTYPES or dy.dtype != x.dtype or x.dim() != 4
            or x.numel() == 0 or dy.numel() == 0 or acc.numel() == 0
            or (not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last))):
        # fp64 accumulators, mixed input dtypes, empty batches, channels_last: the reference (same contract).
        return _ref.saliency_conv2d(acc, x, dy, stat, stride, padding, dilation, groups)
    g = _Geom(x, acc, stride, padding, dilation, groups)
    if _not_for_kernels(g):   # no output pixels, or int32 offsets would overflow
        return _ref.saliency_conv2d(acc, x, dy, stat, stride, padding, dilation, groups)
    x, dy = x.contiguous(), dy.contiguous()
    work = acc if acc.is_contiguous() else acc.contiguous()
    prec = U.dot_precision() if x.dtype == torch.float32 else "ieee"
    variant = PER_SAMPLE if stat.startswith("sample_") else ONE_PASS

    def launch(part, spg, G):
        def grid(meta):
            return (triton.cdiv(g.OUT, meta["BO"]) * triton.cdiv(g.K, meta["BI"]), G)

        _saliency_conv_kernel[grid](work, part, x, dy, *g.sizes(), *g.conv(), int(stat in ("signed", "sample_sq")),
                                    spg, VARIANT=variant, SPLIT=G > 1, EMUL_BF16=U.bf16_emulated(x.dtype),
                                    DOT_PREC=prec)

    with U.device_guard(x):
        _launch_split(x.shape[0], g.OUT, g.K, work, x, sample_groups, _conv_splits(variant, x.dtype, prec), launch)
    if work is not acc:
        acc.copy_(work)


def aot_specs():
    """Every specialisation ``saliency_linear`` and ``saliency_conv2d`` launch on a GPU (compiled by
    ``aot.py``): activation dtypes × variants × fp32 dot precisions where fp32 dots occur × the autotune set
    of the dot class × split or not (per-sample variants), and the split's reduction."""
    specs = []
    names = {ONE_PASS: "one-pass", PER_SAMPLE: "per-sample", RANK_ONE: "rank-one"}
    for dt in U.ACT_DTYPES:
        for variant in (ONE_PASS, PER_SAMPLE, RANK_ONE):
            fp32_dots = variant == RANK_ONE
            for prec in (("ieee", "tf32") if dt == torch.float32 or fp32_dots else ("ieee",)):
                cls = U.dot_class(dt, prec, fp32_dots)
                for split, cfg in itertools.product(SPLITS[variant], U.saliency_configs(cls)):
                    specs.append(U.make_spec(_saliency_linear_kernel, dict(
                        acc_ptr="*fp32", part_ptr="*fp32", x_ptr=U.ptr(dt), dy_ptr=U.ptr(dt), S="i32", T="i32",
                        OUT="i32", IN="i32", square="i32", SPG="i32"),
                        dict(VARIANT=variant, SPLIT=split, FP32_DOTS=fp32_dots, EMUL_BF16=False, DOT_PREC=prec,
                             **cfg.kwargs),
                        cfg.num_warps, cfg.num_stages,
                        f"{names[variant]}{' split' if split else ''} {U.SIG_DTYPES[dt]} {prec} "
                        f"{U.config_label(cfg)}"))
    conv_ints = {n: "i32" for n in ("S", "C", "H", "W", "OUT", "OH", "OW", "CG", "OUTG", "KH", "KW",
                                    "sh", "sw", "ph", "pw", "dh", "dw", "square", "SPG")}
    for dt in U.ACT_DTYPES:
        for variant in (ONE_PASS, PER_SAMPLE):
            for prec in (("ieee", "tf32") if dt == torch.float32 else ("ieee",)):
                splits = (False, True) if _conv_splits(variant, dt, prec) else (False,)
                for split, cfg in itertools.product(splits, U.conv_saliency_configs(U.dot_class(dt, prec))):
                    specs.append(U.make_spec(_saliency_conv_kernel, dict(
                        acc_ptr="*fp32", part_ptr="*fp32", x_ptr=U.ptr(dt), dy_ptr=U.ptr(dt), **conv_ints),
                        dict(VARIANT=variant, SPLIT=split, EMUL_BF16=False, DOT_PREC=prec, **cfg.kwargs),
                        cfg.num_warps, cfg.num_stages,
                        f"{names[variant]}{' split' if split else ''} {U.SIG_DTYPES[dt]} {prec} "
                        f"{U.config_label(cfg)}"))
    specs.append(U.make_spec(_saliency_reduce_kernel, dict(acc_ptr="*fp32", part_ptr="*fp32", N="i32", G="i32"),
                             dict(BLOCK=REDUCE_BLOCK), 4, 3, "sample-group reduction"))
    return specs
