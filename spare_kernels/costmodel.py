"""Cost model of the masked-LoRA ops (DESIGN §3, §4): the FLOPs and bytes of every pass of every scheme,
and the time they imply on a named device.

A scheme is a list of :class:`Pass` es, one per kernel (or torch op) it runs, each counted from the code
that runs it (``benchmarks/baselines.py`` for the anchors, the backends for ours). A pass takes
``max(flops / rate, bytes / bandwidth)``: ``rate`` is the device's GEMM rate for the pass's operand class
(scaled by the last wave's occupancy on a GPU) or its vector rate for elementwise arithmetic. Two sums:

- :func:`bound`: the passes at the device's rates and nothing else: the lower bound that a scheme's
  kernels can approach (``benchmarks.gpu --report`` prints measured / bound);
- :func:`predict`: the bound plus each pass's fixed cost (a GPU kernel's launch and tail, a CPU op's
  dispatch and thread-pool start), what a run should measure. On the CPU it is validated against the
  ``cpu`` backend and the anchors (``python -m benchmarks.costmodel validate``).

Devices: :data:`H100` and :data:`H200` are constants with their sources; :func:`cpu_profile` measures this
machine (one fp32 GEMM rate, one streaming bandwidth, one per-op cost) once per process and thread count.

The registry asks :func:`choose_path` (Triton: composite or in-register fused tiles) and
:func:`choose_backend` (triton or cuda) where no measured GPU table lists a shape.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
import time
from typing import Optional

from . import maskfmt as fmt

PATHS = ("composite", "fused")
SCHEMES = ("floor", "peft", "spare_ref", "merged", "ours_element", "ours_block", "ours_row", "ours_dense")
# The mask each of our schemes carries (the others name anchors).
SCHEME_KIND = {"ours_element": fmt.ELEMENT, "ours_block": fmt.BLOCK, "ours_row": fmt.ROW, "ours_dense": fmt.NONE}


@dataclasses.dataclass(frozen=True)
class Device:
    """What bounds a pass on one device. Rates in FLOP/s, bandwidth in B/s, ``overhead`` in s per pass."""
    name: str
    mma16: float        # 16-bit-input GEMM, fp32 accumulate (tensor cores)
    gemm32: float       # fp32 GEMM (GPU: TF32 tensor cores, torch's default for conv; CPU: sgemm)
    vector: float       # elementwise fp32 arithmetic (CUDA cores / SIMD), FLOP/s (an FMA is 2)
    bandwidth: float    # streaming DRAM bandwidth
    overhead: float     # fixed cost per pass: launch + tail (GPU), dispatch + pool start (CPU)
    sms: int = 0        # GPU: streaming multiprocessors (wave quantisation); 0 on a CPU
    source: str = ""
    threads: int = 0    # CPU: the thread count it was measured with (the cpu engine's token split)
    # CPU: the GEMM rate by the GEMM's smallest dimension ((dim, FLOP/s), ascending), and the rate at which
    # a fresh allocation of at least ``fault_min`` bytes is written (its pages faulted in by the OS)
    gemm_curve: tuple = ()
    fault_rate: float = 0.0
    fault_min: float = 32 << 20


# H100 SXM5 (132 SMs, 1.98 GHz boost). mma16: 790 TFLOP/s, cuBLAS bf16 at large square sizes as measured
# in issue 26's review (the datasheet's dense peak is 989); gemm32: TF32 at the same fraction of its
# 495 peak; vector: 67 TFLOP/s fp32 FMA peak (datasheet), halved for the address and mask arithmetic
# that every elementwise kernel here interleaves (≈ 1 useful FMA per 2 issued instructions);
# bandwidth: 3.0 of the 3.35 TB/s HBM3 peak (≈ 90%: what streaming copies reach); overhead: 3 µs, a
# launch gap plus a tail wave between dependent kernels on one stream.
H100 = Device("NVIDIA H100 80GB HBM3", mma16=790e12, gemm32=395e12, vector=33.5e12, bandwidth=3.0e12,
              overhead=3e-6, sms=132,
              source="datasheet peaks; bf16 GEMM rate measured (issue 26 review); bandwidth 90% of 3.35 TB/s")
# H200: the same GH100 compute with HBM3e (4.8 TB/s datasheet, 90% streamed); 141 GB.
H200 = Device("NVIDIA H200", mma16=790e12, gemm32=395e12, vector=33.5e12, bandwidth=4.3e12, overhead=3e-6,
              sms=132, source="H100's compute figures; bandwidth 90% of 4.8 TB/s HBM3e")
DEVICES = {"h100": H100, "h200": H200}


# ----------------------------------------------------------------------------------------- passes
@dataclasses.dataclass(frozen=True)
class Pass:
    """One kernel: ``unit`` "mma16" / "gemm32" (a GEMM: ``mnk`` gives its shape for wave quantisation) or
    "vector" (elementwise / small contractions on vector units)."""
    name: str
    flops: float
    bytes: float
    unit: str = "vector"
    mnk: Optional[tuple] = None
    fresh: float = 0.0     # bytes of the new tensor it writes (a CPU allocation may fault its pages in)


# (tile rows, tile cols, per-SM rate relative to 128×128): an estimate (operand bytes per MMA grow as the
# tile shrinks; Hopper's wgmma wants ≥ 64-row tiles), to be replaced by the GPU check's measurement.
_GEMM_TILES = ((128, 128, 1.0), (128, 64, 0.85), (64, 64, 0.7))


def _curve_rate(curve, dim: float) -> float:
    """Log-linear in the smallest dimension between the measured points, flat beyond them."""
    if dim <= curve[0][0]:
        return curve[0][1]
    for (d0, r0), (d1, r1) in zip(curve, curve[1:]):
        if dim <= d1:
            w = math.log(dim / d0) / math.log(d1 / d0)
            return r0 * (r1 / r0) ** w
    return curve[-1][1]


def _rate(p: Pass, dev: Device) -> float:
    if p.unit == "vector":
        return dev.vector
    if dev.gemm_curve and p.mnk:
        return _curve_rate(dev.gemm_curve, min(p.mnk))
    rate = dev.mma16 if p.unit == "mma16" else dev.gemm32
    if dev.sms and p.mnk:
        # The last wave of 128×128 output tiles leaves SMs idle. A long K (≥ 2048: a weight gradient,
        # out × in from every token) is split over K in chunks of ≥ 512 (cuBLAS's split-K / stream-K):
        # the machine fills as far as those chunks go, with no last-wave loss.
        # Smaller output tiles fill more SMs at a lower per-SM rate (the fraction beside each tile: less
        # operand reuse per tensor-core op); the GEMM library picks the best.
        m, n, k = p.mnk
        best = 0.0
        for tm, tn, per_sm in _GEMM_TILES:
            tiles = math.ceil(m / tm) * math.ceil(n / tn)
            if k >= 2048:
                occ = min(1.0, tiles * (k // 512) / dev.sms)
            else:
                occ = tiles / (math.ceil(tiles / dev.sms) * dev.sms)
            best = max(best, occ * per_sm)
        rate *= best
    return rate


def pass_time(p: Pass, dev: Device, overhead: bool = True) -> float:
    t = max(p.flops / _rate(p, dev), p.bytes / dev.bandwidth)
    if dev.fault_rate and p.fresh >= dev.fault_min:
        # glibc maps an allocation past its mmap threshold's 32 MiB cap afresh each time: the new tensor's
        # pages fault in as it is written (measured here: ≈ 4-6 GB/s against 27 GB/s streamed into a
        # reused tensor). Between 16 and 32 MiB it depends on the allocator's history (the dynamic
        # threshold, trimming): measured 6-40 GB/s for the same pattern from run to run, not modelled.
        t += p.fresh / dev.fault_rate
    return t + (dev.overhead if overhead else 0.0)


class _Builder:
    """Counts passes for activations of ``e`` bytes per element (16-bit GEMMs run on ``mma16``, fp32 on
    ``gemm32``)."""

    def __init__(self, e: int):
        self.e, self.passes = e, []
        self.gemm_unit = "mma16" if e == 2 else "gemm32"

    def gemm(self, name, m, n, k, a=None, b=None, c=None, inplace=False):
        """``C (m×n) = A (m×k) · B (k×n)``; ``a``/``b``/``c`` bytes per element (default: ``e``; an
        ``inplace`` update reads and writes C: pass ``c = 2·e``)."""
        a, b, c = a or self.e, b or self.e, c or self.e
        self.passes.append(Pass(name, 2.0 * m * n * k, m * k * a + k * n * b + m * n * c, self.gemm_unit, (m, n, k),
                                fresh=0.0 if inplace else m * n * c))

    def vec(self, name, nbytes, flops=0.0, fresh=0.0):
        self.passes.append(Pass(name, float(flops), float(nbytes), fresh=float(fresh)))

    def ew(self, name, numel, reads, writes=1, e=None):
        """An elementwise op over ``numel`` entries reading ``reads`` and writing ``writes`` new tensors."""
        self.vec(name, numel * (reads + writes) * (e or self.e), numel, fresh=numel * writes * (e or self.e))


def linear_passes(scheme: str, n: int, out: int, cols: int, rank: int, *, density: float = 0.5,
                  block_density: float = 0.1, block=(64, 64), e: int = 2, path: str = "composite",
                  resident: bool = False, threads: int = 1, dy_fill: bool = False,
                  g_fraction: Optional[float] = None) -> list[Pass]:
    """The passes of one forward + backward of a Linear layer (``n`` tokens, weight ``out × cols``, rank
    ``rank``; ``x`` needs its gradient, A and B train, W is frozen) under ``scheme``.

    ``path``: our element/block masks as the composite (W_eff built in memory, vendor GEMMs, G in fp32,
    one mask-and-contract pass) or as fused tiles (W_eff tiles rebuilt in every token tile's K loop);
    block masks (``block`` = (bo, bi)) also ``"factored"``: rank r per block, no G at all.
    ``resident``: the CPU engine's tiling, where W_eff and G tiles live in cache and never reach DRAM
    (with ``threads`` > 1 it splits ≥ 1024 tokens over threads, each building every tile).
    ``dy_fill``: add the ``torch.ones_like(y)`` the layer benchmarks backpropagate."""
    b = _Builder(e)
    N, O, I, r = n, out, cols, rank
    W = O * I
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    if dy_fill:
        b.ew("dy = ones", N * O, 0)
    b.gemm("y = x·Wᵀ", N, O, I)
    if scheme == "floor":
        b.gemm("dx = dy·W", N, I, O)
    elif scheme == "peft":
        # peft: result + lora_B(lora_A(dropout(x))) * scaling; dropout is Identity at p = 0
        b.gemm("h = x·Aᵀ", N, r, I)
        b.gemm("u = h·Bᵀ", N, O, r)
        b.ew("u·s", N * O, 1)
        b.ew("y + u", N * O, 2)
        b.ew("du = dy·s", N * O, 1)
        b.gemm("dh = du·B", N, r, O)
        b.gemm("dB = duᵀ·h", O, r, N)
        b.gemm("dxa = dh·A", N, I, r)
        b.gemm("dA = dhᵀ·x", r, I, N)
        b.gemm("dx = dy·W", N, I, O)
        b.ew("dx + dxa", N * I, 2)
    elif scheme == "spare_ref":
        # base(x) + F.linear(x, (B@A)*s*M), M a uint8 mask cast at use (benchmarks/baselines.py)
        b.gemm("D = B·A", O, I, r)
        b.ew("D·s", W, 1)
        b.vec("M.to(dtype)", W * (1 + e))
        b.ew("D·M", W, 2)
        b.gemm("y2 = x·Dᵀ", N, O, I)
        b.ew("y + y2", N * O, 2)
        b.gemm("dx2 = dy·D", N, I, O)
        b.gemm("dD = dyᵀ·x", O, I, N)
        b.ew("dD·M", W, 2)
        b.ew("dD·s", W, 1)
        b.gemm("dB = dD·Aᵀ", O, r, I)
        b.gemm("dA = Bᵀ·dD", r, I, O)
        b.gemm("dx = dy·W", N, I, O)
        b.ew("dx + dx2", N * I, 2)
    elif scheme == "merged":
        b.gemm("D = B·A", O, I, r)
        b.ew("s·M", W, 1)
        b.ew("(s·M)·D", W, 2)
        b.ew("W_eff = W + …", W, 2)
        b.gemm("dx = dy·W_eff", N, I, O)
        b.gemm("dW = dyᵀ·x", O, I, N)
        b.ew("dD = dW·(s·M)", W, 2)
        b.gemm("dB = dD·Aᵀ", O, r, I)
        b.gemm("dA = Bᵀ·dD", r, I, O)
    elif scheme == "ours_block" and path == "factored":
        # A block mask is constant on bo × bi tiles, so ΔW's action factors through rank r per block
        # (the cpu backend's block path, csrc/cpu/linear.cpp): H_q = X_q·A_qᵀ per column block q,
        # y_p += s·(Σ_{q on} H_q)·B_pᵀ; backward D_p = dY_p·B_p, dX_q += s·(Σ_{p on} D_p)·A_q,
        # dA_q = s·(Σ_p D_p)ᵀ·X_q, dB_p = s·dY_pᵀ·(Σ_q H_q). No G, no out×in tensor: 2 GEMMs + rank-r passes.
        bo, bi = block
        nbp, nbq = math.ceil(O / bo), math.ceil(I / bi)
        mix = 2.0 * N * r * nbp * nbq
        b.gemm("H_q = X_q·A_qᵀ", N, r, I, c=4)
        b.vec("Hs = mix(H, tiles)", N * r * (nbq + nbp) * 4, mix)
        b.gemm("y_p += s·Hs_p·B_pᵀ", N, O, r, c=2 * e, inplace=True)
        b.gemm("D_p = dY_p·B_p", N, r, O, c=4)
        b.vec("E = mix(D, tilesᵀ)", N * r * (nbq + nbp) * 4, mix)
        b.gemm("dx = dy·W", N, I, O)
        b.gemm("dx_q += s·E_q·A_q", N, I, r, c=2 * e, inplace=True)
        b.gemm("dA_q = s·E_qᵀ·X_q", r, I, N)
        b.gemm("dB_p = s·dY_pᵀ·Hs_p", O, r, N)
    elif scheme in ("ours_dense", "ours_row"):
        # factored (never an out×in tensor): y += s·(x·Aᵀ)·(B⊙m)ᵀ; backward from dys = s·dy⊙m
        b.gemm("h = x·Aᵀ", N, r, I)
        b.gemm("y += h·(sB)ᵀ", N, O, r, c=2 * e, inplace=True)
        b.ew("dys = s·dy⊙m", N * O, 1)
        b.gemm("dh = dys·B", N, r, O)
        b.gemm("dB = dysᵀ·h", O, r, N)
        b.gemm("dA = dhᵀ·x", r, I, N)
        b.gemm("dx = dy·W", N, I, O)
        b.gemm("dx += dh·A", N, I, r, c=2 * e, inplace=True)
    else:   # ours_element / ours_block
        frac = density if scheme == "ours_element" else block_density   # weight entries whose delta is on
        # The composite computes all of G (Triton: one GEMM; cuda: over runs of on tile rows and their
        # column spans, ≈ all of W for random tiles); the fused wgrad only the listed (on) tiles.
        # ``g_fraction`` overrides either.
        listed = 1.0 if scheme == "ours_element" else block_density
        g_frac = g_fraction if g_fraction is not None else (1.0 if path == "composite" else listed)
        mask_bytes = W / 8 if scheme == "ours_element" else 0
        build_flops = 2.0 * r * W * (1.0 if scheme == "ours_element" else block_density) + 3.0 * W
        if resident and N <= 4:
            # the cpu engine's few-token path: one streaming pass over W and the mask per direction,
            # the effective row built in registers and dotted with (or axpy'd into) the T token rows
            b.passes[0] = Pass("y = x·W_effᵀ (streamed rows)", build_flops + 2.0 * N * W, W * e + mask_bytes)
            b.vec("dx, dA, dB (streamed rows)", W * e + mask_bytes, build_flops + 2.0 * N * W + 4.0 * r * W * frac)
            return b.passes
        if resident and threads > 1 and N >= 1024:
            build_flops *= threads   # token split: every thread builds every tile (docs/backends.md, CPU tuning)
        if path == "composite":
            w_write = 0 if resident else W * e
            b.passes.insert(0, Pass("W_eff = W + s·M⊙(B·A)", build_flops, W * e + mask_bytes + w_write))
            b.vec("W_eff (rebuilt for dx)", W * e + mask_bytes + w_write, build_flops)
            b.gemm("dx = dy·W_effᵀ", N, I, O)
            g_out = 0 if resident else 4
            b.passes.append(Pass("G = dyᵀ·x (fp32)", 2.0 * O * I * N * g_frac,
                                 (N * O * e + N * I * e) + W * g_out * g_frac, b.gemm_unit, (O, I, N)))
            # + the dA partials of every 16-row tile, written and re-read in a fixed order (deterministic)
            b.vec("dA, dB = contract(M⊙G)", W * g_frac * (g_out + r / 2) + mask_bytes, 4.0 * r * W * frac)
        else:
            # the K loop rebuilds each W_eff tile once per 128-token tile: ≈ 20 vector instructions per
            # weight entry (rank-16 chunk dots, mask bit gather, select, add, round) at the vector rate
            # (an issue slot each); every entry for element masks, the on tiles' for block masks
            rebuild = 20.0 * W * listed * math.ceil(N / 128)
            b.passes[0] = Pass("y = x·W_effᵀ (fused)", b.passes[0].flops, b.passes[0].bytes, b.gemm_unit,
                               b.passes[0].mnk)
            b.vec("W_eff tiles rebuilt per token tile (fwd)", mask_bytes * math.ceil(N / 128), rebuild)
            b.gemm("dx = dy·W_effᵀ (fused)", N, I, O)
            b.vec("W_eff tiles rebuilt per token tile (dx)", mask_bytes * math.ceil(N / 128), rebuild)
            b.passes.append(Pass("G on listed tiles, contracted in registers", 2.0 * O * I * N * g_frac,
                                 (N * O * e + N * I * e) * max(g_frac, 1.0 / max(1, math.ceil(O / 128))),
                                 b.gemm_unit, (O, I, N)))
            b.vec("dA, dB partials reduced", 4.0 * r * (O + I) * math.ceil(N / 128), 4.0 * r * W * frac)
    return b.passes


def saliency_passes(stat: str, samples: int, tokens: int, out: int, cols: int, *, e: int = 2,
                    fused: bool = True) -> list[Pass]:
    """One ``saliency_*`` accumulation of a layer: ``samples`` samples of ``tokens`` tokens (conv: pixels
    per sample; ``cols`` = C/g·kh·kw). ``grad_abs``/``signed``: one weight-gradient GEMM of the batch (fp32
    out) and an accumulate; ``sample_*``: the same GEMM's FLOPs split per sample, each sample's tile
    ``|·|``/squared into the accumulator where it is computed (``fused``), or per-sample gradients
    written in fp32 and re-read (``fused=False``: the scratch scheme)."""
    b = _Builder(e)
    N, W = samples * tokens, out * cols
    if stat in ("grad_abs", "signed"):
        b.passes.append(Pass("G = dyᵀ·x (fp32)", 2.0 * W * N, N * (out + cols) * e + 4 * W, b.gemm_unit, (out, cols, N)))
        b.ew("acc += f(G)", W, 2, e=4)
        return b.passes
    if stat not in ("sample_abs", "sample_sq"):
        raise ValueError(f"stat: expected grad_abs, signed, sample_abs or sample_sq, got {stat!r}")
    per = Pass("g_i = dy_iᵀ·x_i, acc += f(g_i) per tile", 2.0 * W * N, N * (out + cols) * e + 8 * W, b.gemm_unit,
               (out, cols, max(1, tokens)))
    if fused:
        b.passes.append(per)
    else:
        b.passes.append(Pass("g_i = dy_iᵀ·x_i (fp32, per sample)", per.flops, N * (out + cols) * e + 4 * W * samples,
                             b.gemm_unit, (out, cols, max(1, tokens))))
        b.ew("acc += f(g_i) (per sample)", W * samples, 2, e=4)
    return b.passes


def topk_passes(n_scores: int, n_tensors: int, *, compacted: bool = True) -> list[Pass]:
    """Exact top-k masks over ``n_scores`` fp32 scores in ``n_tensors`` tensors (radix select): one
    histogram pass over every score, then (``compacted``) the candidates of the chosen bin only, else
    three more full passes; one pass writing the bit-packed masks (reading the scores again)."""
    passes = [Pass("histogram, pass 1", n_scores * 2.0, 4.0 * n_scores)]
    if compacted:
        passes.append(Pass("compact the chosen bin's candidates", 0.0, 4.0 * n_scores * 0.01))
        passes.append(Pass("histograms 2-4 over the candidates", 0.0, 3 * 8.0 * n_scores * 0.01))
    else:
        passes += [Pass(f"histogram, pass {i}", n_scores * 2.0, 4.0 * n_scores) for i in (2, 3, 4)]
    passes.append(Pass("write packed masks", n_scores * 1.0, 4.0 * n_scores + n_scores / 8))
    return passes


def passes_time(passes, device=H100, overhead: bool = False) -> float:
    """Sum of :func:`pass_time` over ``passes``."""
    dev = device_profile(device)
    return sum(pass_time(p, dev, overhead) for p in passes)


def conv_as_linear(n_batch: int, h_out: int, w_out: int, out: int, cin_per_group: int, kh: int, kw: int):
    """A conv2d's GEMM view: (tokens = N·H'·W', out, cols = C/g·kh·kw)."""
    return n_batch * h_out * w_out, out, cin_per_group * kh * kw


# ----------------------------------------------------------------------------------------- totals
def _total(scheme, n, out, cols, rank, dev, overhead, path=None, **kw) -> float:
    def t(pth):
        return sum(pass_time(p, dev, overhead) for p in linear_passes(scheme, n, out, cols, rank, path=pth, **kw))
    if path is None and scheme in ("ours_element", "ours_block") and not kw.get("resident"):
        return min(t(p) for p in PATHS)   # the paths a GPU backend runs ("factored": ask for it by name)
    return t(path or "composite")


def bound(scheme: str, n: int, out: int, cols: int, rank: int, *, device=H100, e: int = 2, path=None,
          **kw) -> float:
    """Lower bound (s) of one Linear forward + backward under ``scheme`` on ``device``: every pass at the
    device's rates, no fixed costs. Our masks take the faster of the GPU paths (composite: 3 GEMM-sized
    passes + two W_eff builds + the contraction; fused tiles) unless ``path`` names one (block masks also
    ``"factored"``, the cpu backend's form)."""
    return _total(scheme, n, out, cols, rank, device_profile(device), False, path, e=e, **kw)


def predict(scheme: str, n: int, out: int, cols: int, rank: int, *, device=H100, e: int = 2, path=None,
            **kw) -> float:
    """Predicted time (s): :func:`bound` plus each pass's fixed cost."""
    return _total(scheme, n, out, cols, rank, device_profile(device), True, path, e=e, **kw)


def gemm_time(n: int, out: int, cols: int, *, device=H100, e: int = 2, fp32_out: bool = False) -> float:
    """Bound of one ``n × out × cols`` GEMM (the unit of DESIGN §3)."""
    b = _Builder(e)
    b.gemm("gemm", n, out, cols, c=4 if fp32_out else None)
    return pass_time(b.passes[0], device_profile(device), overhead=False)


# ----------------------------------------------------------------------------------------- choices
def choose_path(op: str, kind: int, n: int, out: int, cols: int, rank: int, *, density: float = 0.5,
                dtype=None, device="cuda", backend: str = "triton") -> str:
    # (``backend``: the asking backend; only Triton has two paths today)
    """``"composite"`` (one memory-bound ``W_eff`` build, vendor GEMMs, G in fp32, one mask-and-contract
    pass) or ``"fused"`` (in-register ``W_eff`` tiles in the GEMMs' K loops, G only on listed tiles) for one
    call of ``op`` (``"linear"`` / ``"conv2d"``: tokens ``n`` = N·H'·W', ``cols`` = C/g·kh·kw) with mask
    ``kind``; the one the model predicts faster on the device. ``SPARE_KERNELS_PATH`` forces one."""
    forced = os.environ.get("SPARE_KERNELS_PATH", "auto")
    if forced in PATHS:
        return forced
    if forced != "auto":
        raise ValueError(f"SPARE_KERNELS_PATH: expected one of {PATHS + ('auto',)}, got {forced!r}")
    if kind not in (fmt.ELEMENT, fmt.BLOCK):
        return "fused"     # row masks and no mask are factored on every path
    e = 4 if dtype is not None and getattr(dtype, "itemsize", 2) == 4 else 2
    return _choose_path(kind, int(n), int(out), int(cols), int(rank), round(float(density), 3), e,
                        _gpu_device(device))


@functools.lru_cache(maxsize=4096)   # called per op call by the launchers: the model runs once per shape
def _choose_path(kind, n, out, cols, rank, density, e, dev) -> str:
    scheme = "ours_element" if kind == fmt.ELEMENT else "ours_block"
    kw = dict(density=density, block_density=density, e=e)
    t = {p: sum(pass_time(q, dev) for q in linear_passes(scheme, n, out, cols, rank, path=p, **kw)) for p in PATHS}
    return min(PATHS, key=lambda p: (t[p], p != "composite"))


def choose_backend(op: str, kind: int, n: int, out: int, cols: int, rank: int, candidates, *,
                   density: float = 0.1, dtype=None, device="cuda") -> str:
    """The fastest of ``candidates`` (backend names, in priority order) for one call, where no measured
    table exists. ``cuda`` runs element and block masks as the composite (block G over runs of on tile
    rows, taken as all of W); ``triton`` takes whichever path :func:`choose_path` picks; ties keep the
    priority order."""
    if kind not in (fmt.ELEMENT, fmt.BLOCK):
        return candidates[0]
    dev = _gpu_device(device)
    e = 4 if dtype is not None and getattr(dtype, "itemsize", 2) == 4 else 2
    scheme = "ours_element" if kind == fmt.ELEMENT else "ours_block"
    kw = dict(density=0.5 if kind == fmt.ELEMENT else density, block_density=density, e=e)

    def t(path, **extra):
        return sum(pass_time(q, dev) for q in linear_passes(scheme, n, out, cols, rank, path=path, **kw, **extra))

    cost = {"cuda": t("composite"), "triton": min(t(p) for p in PATHS), "reference": float("inf")}
    best = min(cost.get(c, float("inf")) for c in candidates)
    return next(c for c in candidates if cost.get(c, float("inf")) <= best * 1.02)


def _gpu_device(device) -> Device:
    """The constants of the GPU ``device`` names (an H200 by name; every other GPU, and a CPU tensor run
    through Triton's interpreter, is modelled as an H100: the choice depends on ratios, not absolutes)."""
    if isinstance(device, Device):
        return device
    try:
        import torch
        d = torch.device(device) if not isinstance(device, torch.device) else device
    except (RuntimeError, TypeError, ValueError):
        return H100
    return _gpu_by_index(d.type, d.index)


@functools.lru_cache(maxsize=None)
def _gpu_by_index(kind: str, index) -> Device:
    name = ""
    try:
        import torch
        if kind == "cuda" and torch.cuda.is_available():
            name = torch.cuda.get_device_name(index)
    except (RuntimeError, AssertionError):
        pass
    return H200 if "H200" in name else H100


# ----------------------------------------------------------------------------------------- CPU profile
_PROFILES: dict = {}
_LOCK = threading.Lock()


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def cpu_probes():
    """``{name: closure}``: the micro-benchmarks a CPU profile is made of (see :func:`cpu_profile`), to
    time side by side with other work (``benchmarks.costmodel validate`` interleaves them with the layers
    it predicts, so that a load that comes and goes weighs on both alike)."""
    import torch
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    big = 16 << 20   # 64 MiB of fp32 per array: far beyond any cache here
    x, y, z = torch.ones(big), torch.ones(big), torch.empty(big)
    w, bb, aa, o = torch.rand(512, 512), torch.rand(512, 4), torch.rand(4, 512), torch.empty(512, 512)
    leaf = torch.ones(1, requires_grad=True)

    def chain():
        t = leaf
        for _ in range(20):
            t = t * 1.0
        t.backward()

    thin = {d: (torch.randn(d, 1280), torch.randn(1280, 1280)) for d in _CURVE_DIMS[:-1]}
    probes = {"probe_gemm32": lambda: torch.mm(a, b), "probe_stream": lambda: torch.add(x, y, out=z),
              "probe_vector": lambda: [torch.addmm(w, bb, aa, out=o) for _ in range(20)], "probe_overhead": chain,
              "probe_fault": lambda: torch.empty(big).fill_(1.0)}
    for d, (p, q) in thin.items():   # 4 calls: the weight warm in cache, as a layer's own GEMMs see it
        probes[f"probe_gemm_{d}"] = (lambda p=p, q=q: [torch.mm(p, q) for _ in range(4)])
    return probes


# The smallest GEMM dimensions the CPU profile measures a rate at (d × 1280 · 1280 × 1280, and 1024³):
# thin GEMMs (few tokens, a rank-sized side) run at a fraction of a square one's rate.
_CURVE_DIMS = (16, 64, 256, 1024)


def profile_from(times: dict, threads: int) -> Device:
    """A CPU :class:`Device` from the medians (s) of :func:`cpu_probes`' closures."""
    import platform
    g = 2 * 1024 ** 3 / times["probe_gemm32"]
    curve = tuple((d, 4 * 2.0 * d * 1280 * 1280 / times[f"probe_gemm_{d}"]) for d in _CURVE_DIMS[:-1]) + ((1024, g),)
    return Device(f"CPU {platform.processor() or platform.machine()} ({threads} thread(s))", mma16=g, gemm32=g,
                  vector=20 * 2 * 4 * 512 * 512 / times["probe_vector"],
                  bandwidth=3 * 4 * (16 << 20) / times["probe_stream"], overhead=times["probe_overhead"] / 40,
                  source="measured on this machine by spare_kernels.costmodel.cpu_profile", threads=threads,
                  gemm_curve=curve, fault_rate=4 * (16 << 20) / times["probe_fault"])


def cpu_profile(threads: Optional[int] = None, reps: int = 7) -> Device:
    """This CPU measured (once per process and thread count, ≈ 1 s): ``gemm32`` an fp32 1024² GEMM's rate
    (``mma16`` the same: 16-bit GEMMs are not modelled apart on a CPU) and ``gemm_curve`` the rate of thin
    GEMMs (d × 1280 · 1280 × 1280, d = 16, 64, 256), ``bandwidth`` a 64 MiB streaming add (3 arrays),
    ``fault_rate`` a fresh 64 MiB tensor filled, ``vector`` a rank-4 update of a cached 512² matrix (a
    W_eff build's arithmetic), ``overhead`` one tiny op forward and backward in an autograd graph, per op."""
    import torch
    threads = threads or torch.get_num_threads()
    with _LOCK:
        if threads in _PROFILES:
            return _PROFILES[threads]
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            times = {k: _median_time(f, reps) for k, f in cpu_probes().items()}
        finally:
            torch.set_num_threads(prev)
        dev = _PROFILES[threads] = profile_from(times, threads)
        return dev


def device_profile(device=None) -> Device:
    """The :class:`Device` for ``device`` (a torch device, its string, "h100"/"h200", or None: this CPU)."""
    if device is None:
        return cpu_profile()
    if isinstance(device, Device):
        return device
    if isinstance(device, str) and device.lower() in DEVICES:
        return DEVICES[device.lower()]
    import torch
    d = torch.device(device)
    return cpu_profile() if d.type == "cpu" else _gpu_device(d)
