"""Exact top-k selection of saliency masks: :func:`topk_masks` (also importable from
:mod:`spare_kernels.masks`).

Three engines compute the same masks bit for bit:

- the generic engine (any device, every granularity and float dtype; the reference): a radix select
  with 16-bit digits over chunks of at most ``2**20`` units, in torch ops; off the CPU (e.g. CUDA
  without ``_C_cuda``) its chunk loops never wait for the device: histograms, NaN flags, tie ranks and
  the selected count stay there and are read a fixed number of times per pass (``_sync_free``);
- the native CPU engine (``csrc/cpu/topk.cpp``, op ``spare_kernels_cpu::topk_select``), when every
  score tensor is on the CPU and ``spare_kernels._C`` has the op (``_NATIVE = False`` forces the
  generic engine): element masks of contiguous fp32/fp16/bf16/fp64 tensors, and block/row/module
  masks whose float64 unit means (computed by the generic engine's own code, so bit-identical) number
  at most ``_NATIVE_UNITS`` in the call. A radix select over all tensors at once (never a
  concatenation), each pass ONE parallel region whose workers claim items of ~2^16 entries
  dynamically and count into worker-local histograms (steady under load: no per-chunk torch ops);
  top digit 16 bits (11 with more than ``_NATIVE_WIDE_GROUPS`` groups), then 11-bit digits over the
  keys of the chosen bins, which are written to a candidate array once they fit ``_NATIVE_CAND_BYTES``
  (later digits and the tie count then read only them); early stop when a bin holds exactly the keys
  still needed; a last pass writes the packed masks. 32-bit fp32 scores: 2 reads of the scores to
  select (one when the top bin is exact), one to pack. Extra memory: the masks, worker histograms
  (threads x 256 KB), group histograms, per-item tables (~80 bytes per 2^16 entries) and at most
  ``_NATIVE_CAND_BYTES`` of candidates;
- the GPU engine (:func:`_device_topk`), for element masks when every score tensor is a contiguous
  fp32/fp16/bf16 CUDA tensor on one device and ``torch.ops.spare_kernels_cuda`` has the ``topk_*``
  ops (``csrc/cuda/topk.cu``; bodies in ``csrc/cuda/topk_kernels.h``).

The GPU engine. Keys are ``_Keys(torch.float32)``'s (order-preserving, ``-0.0 == +0.0``), made
unsigned. All tensors go through every launch together, by a device table of descriptors (pointer,
bytes, cols, row bytes, dtype, first blocks, output offset, first entry), never a concatenation; the
table is built in one vectorised step (one row of Python ints per tensor), uploaded pinned and
non-blocking, and the first launch follows it at once. Every mask is a view into ONE flat uint8
buffer (each tensor's rows at a 16-byte aligned offset); the views are made while the first pass runs.

- ``global`` (the window path): ``topk_sample`` reads 2^20 keys, one per stratum of the concatenated
  entries; two order statistics of the sample (a device sort, no sync) bound a window of keys around
  the k-th (± 6 binomial sigmas of its rank in the sample: ~0.26% of the entries at density 0.05).
  ONE pass, ``topk_window``, counts per tensor the keys above the window and the NaNs, and writes the
  window's keys and their tensors to a candidate array. If the k-th key lies in the window (and the
  array did not overflow), it is the r-th largest candidate: radix passes of ``topk_cand_histogram``
  over the candidates only (the radix path's rules, 8.8 MB a pass at 860 M scores), then the
  per-tensor count of keys equal to it. Syncs: 1 + at most 4 small passes + 1. A miss falls back to
  the radix path: exact either way.
- the radix path (``per_module``, or a missed window): radix select with 8-bit digits, at most 4
  passes. Pass 0 (``topk_histogram``): per tensor the 256-bin histogram of the top digit (and NaNs);
  the host picks the digit (``global``: summed over tensors; ``per_module``: per tensor). Pass 1
  (``topk_compact``): the histogram of the next digit of the keys in the chosen bin, and those keys
  written to per-tensor segments of a candidate array (sized exactly from pass 0) when they take at
  most 1/8 of the scores' bytes; passes 2-3 (``topk_cand_histogram``) then read only the candidates
  (else ``topk_histogram`` over all scores again). A group stops early when the chosen bin holds
  exactly the keys still needed. One sync per pass: the host reads the histogram to pick the digit and
  size the next grid (picking it on the device would need grids sized for the worst case).

Ties (both paths): every key above the threshold is on; the keys equal to it go, in dict order, to the
tensors before the one where they run out (all of theirs), none after it; for a tensor where they are
cut (at most one per group), ``topk_equal_counts`` counts ties per chunk, ``cumsum`` scans that small
array, and the pack kernel ranks ties within its chunk by a block scan. ``topk_pack`` writes the packed
uint8 mask rows into the flat buffer (one thread per output byte).

Cost at SD-1.5's 860 M fp32 scores in 686 tensors, H100 (~3 TB/s), predicted (compiled, not yet run on
a GPU): the window path reads the scores twice (window pass, pack) ≈ 2 × 1.15 ms, + the sample and its
sort (~0.1 ms) + the candidates' passes (~0.05 ms) + ~15 launches and up to 6 syncs (~0.2 ms) + the
host setup before the first launch (0.8 ms measured on this project's CPU host, against 2.5-7 ms
before: 686 output allocations) ≈ 3.5 ms. Extra device memory: tables ``n·(72 + 16 + 257·8)`` bytes;
the sample (4 MB, ~12 MB more while it is sorted), then the candidates (8 bytes each, capacity 1.2×
the expected window: ~21 MB at 860 M) and the tie count's temporaries (~5 bytes a candidate): ~32 MB
≈ 0.9% of the fp32 scores; the radix path's candidates at most 1/8 of the scores' bytes;
``16·ceil(B_cut / 256)`` bytes of tie counts; plus the output masks (1/32 of fp32 scores).
"""
from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Mapping

import torch

from . import maskfmt as fmt
from .masks import SCOPES, Mask, _check_block, _check_granularity, _matrix_shape, _tile_sizes

# ===================================================================================== CPU / generic engine
_CHUNK = 1 << 20          # entries per processing chunk: bounds the extra memory of every pass
_CACHE_UNITS = 1 << 20    # tile/row/module scores are kept between passes when there are at most this many
_DIGIT = 16               # radix digit width: histograms of 65536 bins
_NBINS = 1 << _DIGIT


class _Keys:
    """Order-preserving map float -> signed int for one float width (32 or 64 bits).

    ``key(x) = bits(x)`` for ``x >= +0.0`` and ``-bits(|x|) - 1`` for negative ``x`` (one's
    complement: strictly monotone on non-NaN floats), except that ``-0.0`` gets ``+0.0``'s key 0
    (they compare equal, so they tie); key ``-1`` is then unused."""

    def __init__(self, ftype):
        self.ftype = ftype
        if ftype == torch.float64:
            self.itype, self.bits, self.inf = torch.int64, 64, 0x7FF0000000000000
            self._pack, self._unpack = "<q", "<d"
        else:
            self.itype, self.bits, self.inf = torch.int32, 32, 0x7F800000
            self._pack, self._unpack = "<i", "<f"
        self.mag = (1 << (self.bits - 1)) - 1
        self.levels = self.bits // _DIGIT
        self.min_key, self.max_key = -self.inf - 1, self.inf      # keys of -inf and +inf
        shift0 = self.bits - _DIGIT
        # NaN keys lie beyond them: bins up to -inf's and from +inf's on may hold NaNs
        self.nan_lo = (self.min_key >> shift0) + _NBINS // 2 + 1
        self.nan_hi = (self.max_key >> shift0) + _NBINS // 2

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of a 1-D float tensor of ``ftype`` (one int buffer of its size, one bool temp)."""
        xi = x.contiguous().view(self.itype)
        k = xi >> (self.bits - 1)                     # 0 or -1 (all ones)
        k.bitwise_and_(self.mag).bitwise_xor_(xi)     # negative: flip the magnitude bits
        k.masked_fill_(k == -1, 0)                    # -0.0 -> +0.0's key
        return k

    def digit(self, k: torch.Tensor, level: int) -> torch.Tensor:
        """Radix digit ``level`` (0 = most significant) of keys ``k``, in ``[0, 65536)``; in place."""
        shift = self.bits - _DIGIT * (level + 1)
        if shift:
            k.bitwise_right_shift_(shift)
        if level == 0:
            return k.add_(_NBINS // 2)                # signed top digit -> [0, 65536)
        return k.bitwise_and_(_NBINS - 1)

    def _float(self, key: int) -> float:
        b = key if key >= 0 else key ^ self.mag
        return struct.unpack(self._unpack, struct.pack(self._pack, b))[0]

    def to_float(self, key: int) -> float:
        """The float of a key in use (a threshold)."""
        return self._float(key)

    def bounds(self, lo: int, hi: int):
        """``(lo_f, hi_f)``: the floats ``x`` with ``lo_f <= x <= hi_f`` are exactly those whose key
        is in ``[lo, hi]`` (clamped to the keys of ±inf; the unused key -1 maps to the side's
        neighbour)."""
        lo, hi = max(lo, self.min_key), min(hi, self.max_key)
        lo_f = self._float(0 if lo == -1 else lo)
        hi_f = self._float(-2 if hi == -1 else hi)
        return lo_f, hi_f


def _rect(x: torch.Tensor, cols: int, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """Rows ``r0:r1``, cols ``c0:c1`` of ``x`` viewed as ``(rows, cols)``; a view when ``x`` is
    contiguous, else a copy of only those rows."""
    m = x[r0:r1].reshape(r1 - r0, cols)
    return m if (c0 == 0 and c1 == cols) else m[:, c0:c1]


class _Source:
    """One score tensor seen as a sequence of unit scores (row-major unit order), in chunks.

    ``chunks()`` yields ``(scores, slot)``: a 1-D float tensor of unit scores and where they go in the
    mask data: ``(r0, r1, c0, c1)`` for element masks (``c0`` a multiple of 8), ``(u0, u1)`` (a flat
    range of the unit grid) for the others. Every call yields the same values in the same order."""

    def __init__(self, name, x, granularity, block, chunk, cache_units):
        self.name, self.x, self.g, self.block, self.chunk = name, x, granularity, block, chunk
        self.rows, self.cols = _matrix_shape(x.shape)
        self.device = x.device
        if granularity == "element":
            self.units = self.rows * self.cols
        elif granularity == "block":
            self.grid = (-(-self.rows // block[0]), -(-self.cols // block[1]))
            self.units = self.grid[0] * self.grid[1]
        elif granularity == "row":
            self.units = self.rows if self.cols else 0          # rows of an empty tensor: no units
        else:
            self.units = 1 if x.numel() else 0
        self.cache = None
        self.cacheable = granularity != "element" and self.units <= cache_units

    def fill_cache(self):
        parts = [s for s, _ in self._unit_chunks()]
        self.cache = torch.cat(parts) if parts else torch.empty(0, dtype=torch.float64, device=self.device)

    def chunks(self):
        if self.g == "element":
            yield from self._element_chunks()
        elif self.cache is not None:
            for u0 in range(0, self.units, self.chunk):
                u1 = min(self.units, u0 + self.chunk)
                yield self.cache[u0:u1], (u0, u1)
        else:
            yield from self._coalesce(self._unit_chunks())

    # -- element: rectangles of whole rows, or byte-aligned pieces of one long row
    def _element_chunks(self):
        rows, cols, chunk, x = self.rows, self.cols, self.chunk, self.x
        if rows * cols == 0:
            return
        if cols <= chunk:
            step = max(1, chunk // cols)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                yield _rect(x, cols, r0, r1, 0, cols).reshape(-1), (r0, r1, 0, cols)
        else:
            cstep = max(8, chunk // 8 * 8)
            for r in range(rows):
                for c0 in range(0, cols, cstep):
                    c1 = min(cols, c0 + cstep)
                    yield _rect(x, cols, r, r + 1, c0, c1).reshape(-1), (r, r + 1, c0, c1)

    # -- block / row / module: means in float64, computed chunk by chunk
    def _unit_chunks(self):
        # the float64 sums upcast their input: read a quarter chunk at a time (2 MB of float64)
        rows, cols, chunk, x = self.rows, self.cols, max(1, self.chunk // 4), self.x
        f64 = torch.float64
        if self.units == 0:
            return
        if self.g == "block":
            bo, bi = self.block
            pr, pc = self.grid
            if bo * cols <= chunk:
                band = max(1, chunk // (bo * cols))
                for p0 in range(0, pr, band):
                    p1 = min(pr, p0 + band)
                    r = _rect(x, cols, p0 * bo, min(rows, p1 * bo), 0, cols)
                    yield _tile_means(r, bo, bi).reshape(-1), (p0 * pc, p1 * pc)
            else:
                group = max(1, chunk // (bo * bi))
                for p in range(pr):
                    for q0 in range(0, pc, group):
                        q1 = min(pc, q0 + group)
                        r = _rect(x, cols, p * bo, min(rows, (p + 1) * bo), q0 * bi, min(cols, q1 * bi))
                        yield _tile_means(r, bo, bi).reshape(-1), (p * pc + q0, p * pc + q1)
        elif self.g == "row":
            if cols <= chunk:
                step = max(1, chunk // cols)
                for r0 in range(0, rows, step):
                    r1 = min(rows, r0 + step)
                    yield _rect(x, cols, r0, r1, 0, cols).sum(1, dtype=f64) / cols, (r0, r1)
            else:
                for r in range(rows):
                    s = sum(_rect(x, cols, r, r + 1, c0, min(cols, c0 + chunk)).sum(dtype=f64)
                            for c0 in range(0, cols, chunk))
                    yield (s / cols).reshape(1), (r, r + 1)
        else:  # module
            s = torch.zeros((), dtype=f64, device=self.device)
            step = max(1, chunk // cols) if cols <= chunk else 1
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                for c0 in range(0, cols, chunk):
                    s = s + _rect(x, cols, r0, r1, c0, min(cols, c0 + chunk)).sum(dtype=f64)
            yield (s / (rows * cols)).reshape(1), (0, 1)

    def _coalesce(self, it):
        """Merge consecutive small unit chunks (e.g. one per long row) up to ``chunk`` units."""
        buf, u_start, n = [], None, 0
        for s, (u0, u1) in it:
            if buf and n + s.numel() > self.chunk:
                yield (torch.cat(buf) if len(buf) > 1 else buf[0]), (u_start, u_start + n)
                buf, n = [], 0
            if not buf:
                u_start = u0
            buf.append(s)
            n += s.numel()
        if buf:
            yield (torch.cat(buf) if len(buf) > 1 else buf[0]), (u_start, u_start + n)


def _tile_means(r: torch.Tensor, bo: int, bi: int) -> torch.Tensor:
    """float64 mean of each ``bo×bi`` tile of a 2-D block of rows (edge tiles: their actual entries).

    Sums along a row of a tile first (contiguous), then down the tile, both in float64."""
    f64 = torch.float64
    nr, nc = r.shape
    fc, fr = nc // bi, nr // bo
    parts = []
    if fc:
        parts.append(r[:, :fc * bi].reshape(nr, fc, bi).sum(-1, dtype=f64))
    if nc > fc * bi:
        parts.append(r[:, fc * bi:].sum(-1, dtype=f64, keepdim=True))
    cs = torch.cat(parts, 1) if len(parts) > 1 else parts[0]          # (nr, pc) row-of-tile sums
    parts = []
    if fr:
        parts.append(cs[:fr * bo].reshape(fr, bo, -1).sum(1))
    if nr > fr * bo:
        parts.append(cs[fr * bo:].sum(0, keepdim=True))
    sums = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
    return sums / _tile_sizes(nr, nc, bo, bi, r.device)


def _validate(scores, density, granularity, scope, block):
    if not isinstance(scores, Mapping):
        raise TypeError("scores: expected a non-empty dict mapping str to floating-point tensors, "
                        f"got {type(scores).__name__}")
    if len(scores) == 0:
        raise ValueError("scores: expected a non-empty dict mapping str to floating-point tensors, "
                         "got an empty dict")
    for name, t in scores.items():
        if not isinstance(name, str):
            raise TypeError(f"scores: expected str keys, got {type(name).__name__} key {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scores[{name!r}]: expected a floating-point tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"scores[{name!r}]: expected a floating-point dtype, got {t.dtype}")
        if t.dim() == 0:
            raise ValueError(f"scores[{name!r}]: expected a tensor with at least one dim (a weight's "
                             f"shape), got a 0-dim tensor")
        if t.is_meta:   # e.g. scores of a model built under init_empty_weights / device="meta"
            raise ValueError(f"scores[{name!r}]: expected a tensor with values, got one on device 'meta' (shape "
                             f"{tuple(t.shape)}, no data to rank); compute the scores on a cpu or cuda device")
    if (isinstance(density, bool) or not isinstance(density, numbers.Real)
            or not (0.0 < float(density) <= 1.0)):
        raise ValueError(f"density: expected a number in (0, 1], got {density!r}")
    _check_granularity(granularity)
    if not isinstance(scope, str) or scope not in SCOPES:
        raise ValueError(f"scope: expected one of {SCOPES}, got {scope!r}")
    return _check_block(block)


def topk_masks(scores: dict, density: float, granularity: str = "element", scope: str = "global",
               block=(32, 32)) -> dict:
    """Masks that keep the ``k`` highest-scoring units, exactly (no threshold approximation).

    Args:
        scores: ``{name: tensor}``, one floating-point tensor of a weight's shape per weight
            (any float dtype; the order of the dict matters for ties, see below).
        density: fraction of units to keep, a real number in ``(0, 1]``.
        granularity: the unit. ``"element"``: one entry (its score). ``"block"``: a ``bo×bi`` tile
            of the tensor viewed as ``(out, cols)`` (``cols = prod(shape[1:])``, a 1-D tensor is
            ``(out, 1)``), scored by the mean of its entries (an edge tile by the mean of the entries
            it has). ``"row"``: an output row, scored by its mean. ``"module"``: the whole tensor,
            scored by its mean. Means are accumulated in float64.
        scope: ``"global"``: ``k = round(density·N)`` units over all tensors together, ``N`` the total
            number of units; ``"per_module"``: ``k_t = round(density·N_t)`` units of each tensor.
            ``round`` is Python's (half to even); ``k`` may be 0 for tiny densities (all off).
        block: ``(bo, bi)`` tile shape (checked whatever the granularity).

    Returns:
        ``{name: Mask}`` of the given granularity (element masks bit-packed), in the order of
        ``scores``, each on the device of its score tensor.

    Exactness: scores are compared exactly in their own precision. float16/bfloat16/float32 scores
    are ranked through order-preserving 32-bit integer keys of their (exact) float32 values; if any
    tensor is float64 (and always for block/row/module means, which are float64), 64-bit keys of the
    float64 values are used, so float64 scores are ranked exactly too. ``-0.0`` and ``+0.0`` are equal.
    The threshold is found by a radix select (16-bit digits: 2 histogram passes for 32-bit keys, 4
    for 64-bit), each pass streaming the tensors in chunks of at most ``2**20`` entries, so the
    extra memory is a few chunk-sized temporaries plus the output masks (never a concatenation);
    a non-contiguous tensor is read through copies of at most one chunk of its rows. Block, row and
    module means are computed once and kept between passes when the group has at most ``2**20``
    units (8 MB), else recomputed chunk by chunk in every pass (same values each time).

    Ties: exactly ``k`` units are selected. Every unit whose score is above the threshold (the
    ``k``-th largest score) is on; among the units whose score equals the threshold, the ones that
    come first are on, in the order: tensors in the dict's iteration order, then units in row-major
    order within a tensor (entries in flat order; tiles in ``(tile_row, tile_col)`` order; rows in
    order).

    Empty tensors (a dim of size 0) are allowed: they have no units and get an all-off mask.

    On the CPU, the native engine (``csrc/cpu/topk.cpp``, module docstring) selects element masks of
    contiguous fp32/fp16/bf16/fp64 tensors, and block/row/module masks when the call has at most
    ``2**23`` units (their float64 means are computed first, as above, 64 MB at most), with the same
    result bit for bit: a radix select with one parallel region per pass, masks packed as written;
    extra memory the masks plus histograms, small tables and at most 32 MB of candidate keys.
    Otherwise (a non-contiguous tensor, more units, the extension not built) the CPU takes the engine
    described above.

    On a GPU: element masks of contiguous fp32/fp16/bf16 CUDA score tensors (all on one device) are
    selected by the CUDA kernels of ``spare_kernels_cuda`` when that extension is loaded (``global``: a
    sampled window, one pass over the scores, then one kernel writing the packed masks into one flat
    buffer; ``per_module`` or a missed window: radix passes of 8-bit digits; module docstring), with
    the same result bit for bit; the masks' data are then views into that one buffer (a mask kept
    alive keeps the buffer, ``torch.save`` of one mask's data writes all of it: ``.clone()`` to
    detach one). Anything else takes the engine described above, on the tensors' device, reading the
    device a fixed number of times per pass (never per chunk).

    Raises:
        TypeError: ``scores`` not a dict, a key not a str, a value not a floating-point tensor.
        ValueError: empty ``scores``, a 0-dim or meta tensor, NaN scores (naming the tensor), ``density``
            not in ``(0, 1]``, unknown ``granularity``/``scope``, a bad ``block``.
    """
    bo_bi = _validate(scores, density, granularity, scope, block)
    density = float(density)
    if granularity == "element":
        ops = _device_ops(scores)
        if ops is not None:
            return _device_topk(scores, density, scope, ops)
    lib = _native_ops(scores)
    if lib is not None and granularity == "element" and all(_native_ok(t) for t in scores.values()):
        return _native_element(scores, density, scope, lib)
    srcs = [_Source(n, t.detach(), granularity, bo_bi, _CHUNK, _CACHE_UNITS) for n, t in scores.items()]
    if lib is not None and granularity != "element" and sum(s.units for s in srcs) <= _NATIVE_UNITS:
        return _native_units(srcs, density, scope, lib)
    wide = granularity != "element" or any(s.x.dtype == torch.float64 for s in srcs)
    keys = _Keys(torch.float64 if wide else torch.float32)
    groups = [srcs] if scope == "global" else [[s] for s in srcs]
    out = {}
    for group in groups:
        n_units = sum(s.units for s in group)
        k = round(density * n_units)
        if sum(s.units for s in group if s.cacheable) <= _CACHE_UNITS:
            for s in group:
                if s.cacheable:
                    s.fill_cache()
        out.update(_select(group, k, n_units, keys))
        for s in group:
            s.cache = None
    return out


def _select(group, k, n_units, keys):
    """Exact top-k over the units of ``group``: radix select of the threshold, then the masks."""
    # level 0: NaN check and histogram of the top digit
    hist = _histogram(group, keys, 0, None, check_nan=True)
    if k == 0 or k == n_units:
        return _build(group, keys, "none" if k == 0 else "all", None, 0, k)
    info = {}
    threshold, need = _radix(group, keys, hist, k, info=info)
    return _build(group, keys, "threshold", threshold, need, k, n_tied=info["tied"])


def _radix(group, keys, hist, k, reduce=None, info=None):
    """``(threshold, ties)``: the ``k``-th largest unit score of ``group`` and how many units equal to it
    are on, from the level-0 histogram ``hist``. ``reduce(hist) -> hist`` sums each later level's
    histogram over the groups of other processes (the distributed top-k); none by default. ``info``: a
    dict that receives ``tied``, the number of units equal to the threshold (the last bin's count)."""
    need, prefix = k, None
    for level in range(keys.levels):
        if level:
            lo_key = prefix << (keys.bits - _DIGIT * level)
            hi_key = lo_key + (1 << (keys.bits - _DIGIT * level)) - 1
            hist = _histogram(group, keys, level, keys.bounds(lo_key, hi_key))
            if reduce is not None:
                hist = reduce(hist)
        at_or_above = hist.flip(0).cumsum(0).flip(0)          # [d] = units with digit >= d
        d = int((at_or_above >= need).sum()) - 1
        need -= int(at_or_above[d]) - int(hist[d])             # minus the units strictly above
        prefix = d - _NBINS // 2 if level == 0 else (prefix << _DIGIT) | d
    if info is not None:
        info["tied"] = int(hist[d])
    return torch.tensor(keys.to_float(prefix), dtype=keys.ftype), need


# The generic engine on an accelerator (CUDA without the _C_cuda extension, ...) must not wait for the
# device inside its chunk loops: `.item()`, `bool(t)`, `.cpu()`, `nonzero` and boolean indexing each
# block the host until the device catches up (~10-50 us a time, ~860 times a pass over SD-1.5's scores).
# There, histograms, NaN flags, tie ranks and the selected count stay on the device and are read once
# per pass. The CPU keeps the loops as they were (a "sync" costs nothing there); tests set
# _SYNC_FREE_ON_CPU to run the device code on CPU tensors.
_SYNC_FREE_ON_CPU = False


def _sync_free(device: torch.device) -> bool:
    return device.type != "cpu" or _SYNC_FREE_ON_CPU


def _histogram(group, keys, level, bounds, check_nan=False):
    hist = torch.zeros(_NBINS, dtype=torch.int64)
    dev_hist, ones, nan_flags = {}, {}, []   # sync-free: per device a histogram (+ a discard bin); per source a flag
    for s in group:
        free = _sync_free(s.device)
        flag = None
        for c, _ in s.chunks():
            c = c.to(keys.ftype)
            if free:
                k = keys.keys(c)
                if check_nan:           # a NaN's key lies beyond ±inf's
                    bad = ((k > keys.max_key) | (k < keys.min_key)).any()
                    flag = bad if flag is None else flag | bad
                dig = keys.digit(k, level)
                if bounds is not None:  # out of the prefix's range: the discard bin
                    dig = dig.masked_fill_((c < bounds[0]) | (c > bounds[1]), _NBINS)
                acc = dev_hist.get(s.device)
                if acc is None or ones[s.device].numel() < dig.numel():
                    if acc is None:
                        acc = dev_hist[s.device] = torch.zeros(_NBINS + 1, dtype=torch.int64, device=s.device)
                    ones[s.device] = torch.ones(max(dig.numel(), s.chunk), dtype=torch.int64, device=s.device)
                acc.index_add_(0, dig, ones[s.device][:dig.numel()])
                del c, k, dig
                continue
            if bounds is not None:
                c = c[(c >= bounds[0]) & (c <= bounds[1])]
                if c.numel() == 0:
                    continue
            h = torch.bincount(keys.digit(keys.keys(c), level), minlength=_NBINS).cpu()
            # NaN keys lie beyond ±inf's: only the bins outside [-inf's, +inf's] (pure NaN) and
            # +inf's own bin (shared with some NaNs) can hold them; check exactly only then.
            if check_nan and (bool(h[:keys.nan_lo].any()) or bool(h[keys.nan_hi:].any())) \
                    and bool(torch.isnan(c).any()):
                raise ValueError(f"scores[{s.name!r}]: contains NaN scores"
                                 + ("" if s.g == "element" else f" (a {s.g} mean is NaN)"))
            del c
            hist += h
        if free and check_nan and flag is not None:
            nan_flags.append((s, flag))
    if nan_flags:                      # one read per device: the first source (group order) with a NaN
        bad = {}
        for dev in {f.device for _, f in nan_flags}:
            mine = [i for i, (_, f) in enumerate(nan_flags) if f.device == dev]
            bad.update(zip(mine, torch.stack([nan_flags[i][1] for i in mine]).cpu().tolist()))
        for i, (src, _) in enumerate(nan_flags):
            if bad[i]:
                raise ValueError(f"scores[{src.name!r}]: contains NaN scores"
                                 + ("" if src.g == "element" else f" (a {src.g} mean is NaN)"))
    for acc in dev_hist.values():      # one read per device and pass
        hist += acc[:_NBINS].cpu()
    return hist


def _build(group, keys, mode, threshold, ties, k, n_tied=None):
    """Masks of ``group``: all off, all on, or ``score > threshold`` plus the first ``ties`` units
    equal to it. ``n_tied``: the number of units equal to the threshold, when known (all of them on:
    no ranking of the ties)."""
    out, total = {}, 0
    dev_total = {}                     # sync-free: per device the selected count, read once at the end
    given = {}                         # sync-free: per device the ties given so far (a device scalar)
    for s in group:
        rows, cols, dev = s.rows, s.cols, s.device
        free = _sync_free(dev)
        if s.g == "element":
            data = torch.zeros(rows, (cols + 7) // 8, dtype=torch.uint8, device=dev)
        elif s.g == "block":
            data = torch.zeros(s.grid, dtype=torch.bool, device=dev)
        elif s.g == "row":
            data = torch.zeros(rows, dtype=torch.bool, device=dev)
        else:
            data = torch.zeros((), dtype=torch.bool, device=dev)
        if mode != "none" and s.units:
            flat = data.view(-1) if s.g != "element" else None
            # a fill, not a host-to-device copy (a pageable copy waits for the stream)
            thr = None if mode == "all" else torch.full((), float(threshold), dtype=keys.ftype, device=dev)
            for c, slot in s.chunks():
                if mode == "all":
                    sel = torch.ones(c.numel(), dtype=torch.bool, device=dev)
                elif free:
                    c = c.to(keys.ftype)
                    if ties and n_tied is not None and ties == n_tied:
                        sel = c >= thr
                    else:
                        sel = c > thr
                        if ties:        # the tie of rank r (1-based, group order) is on iff r <= ties
                            eq = c == thr
                            rank = eq.cumsum(0, dtype=torch.int64)
                            g = given.get(dev)
                            if g is not None:
                                rank += g
                            sel |= eq & (rank <= ties)
                            given[dev] = rank[-1]
                            del eq, rank
                    del c
                else:
                    c = c.to(keys.ftype)
                    sel = c > thr
                    if ties:
                        eq = c == thr
                        n_eq = int(torch.count_nonzero(eq))
                        if n_eq <= ties:
                            sel |= eq
                            ties -= n_eq
                        elif n_eq:
                            sel[eq.nonzero().view(-1)[:ties]] = True
                            ties = 0
                        del eq
                    del c
                if free:
                    t = dev_total.get(dev)
                    n_sel = torch.count_nonzero(sel)
                    dev_total[dev] = n_sel if t is None else t + n_sel
                else:
                    total += int(torch.count_nonzero(sel))
                if s.g == "element":
                    r0, r1, c0, c1 = slot
                    data[r0:r1, c0 // 8:(c1 + 7) // 8] = fmt.pack_bits(sel.view(r1 - r0, c1 - c0))
                else:
                    flat[slot[0]:slot[1]] = sel
                del sel
        # consistent by construction (shape, dtype, zero padding bits): no check, no device read per mask
        out[s.name] = Mask._trusted(s.g, torch.Size(s.x.shape), data, s.block if s.g == "block" else None)
    total += sum(int(t) for t in dev_total.values())      # one read per device
    if total != k:  # cannot happen unless a score tensor changed between passes
        raise RuntimeError(f"topk_masks: selected {total} units, expected {k} (scores modified during "
                           f"selection?)")
    return out


# ===================================================================================== native CPU engine
# csrc/cpu/topk.cpp (op spare_kernels_cpu::topk_select): radix select over all tensors at once, one
# parallel region per pass, masks packed as they are written. _NATIVE = False forces the generic engine
# on the CPU (the reference: tests and benchmarks compare the two).
_NATIVE = True
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Block / row / module masks: the unit means (float64) of the whole call are computed first, as the
# generic engine computes them, then selected natively when there are at most this many (64 MB).
_NATIVE_UNITS = 1 << 23
# The candidate array: once the chosen bins of all groups hold at most this many bytes of (key, item)
# pairs (8 bytes each for 32-bit keys: 4 M keys), the pass writes them out and the later digits and
# the tie count read only them, not the scores. At SD-1.5's 860 M uniform fp32 scores the first
# 16-bit digit leaves ~3.4 M keys in the top bins (27 MB); the bound keeps the memory target
# (packed masks + 64 MiB).
_NATIVE_CAND_BYTES = 32 << 20
# Top digit: 16 bits (a 256 KB worker histogram, in this host's 4 MB L2) leaves ~1/256 of an octave
# per bin, so the candidates fit after one pass; per group a 512 KB histogram, so with more groups
# (per_module) 11 bits (16 KB a group).
_NATIVE_WIDE_GROUPS = 16
_NATIVE_LIB = None       # torch.ops.spare_kernels_cpu once loaded with topk_select; False: not available


def _native_ops(scores):
    """``torch.ops.spare_kernels_cpu`` when it has ``topk_select`` and every score tensor is on the CPU."""
    global _NATIVE_LIB
    if not _NATIVE or not all(t.device.type == "cpu" for t in scores.values()):
        return None
    if _NATIVE_LIB is None:
        from .backends import cpu as _cpu       # loads spare_kernels._C the backend's way (its ABI check first)
        lib = _cpu.library()
        _NATIVE_LIB = lib if lib is not None and hasattr(lib, "topk_select") else False
    return _NATIVE_LIB or None


def _native_ok(t: torch.Tensor) -> bool:
    return t.dtype in _NATIVE_DTYPES and t.is_contiguous() and not t.is_neg()


def _native_call(lib, xs, sizes, density, scope, names, what):
    if scope == "global":
        groups, ks = [0] * len(xs), [round(density * sum(sizes))]
    else:
        groups, ks = list(range(len(xs))), [round(density * u) for u in sizes]
    digit0 = 16 if len(ks) <= _NATIVE_WIDE_GROUPS else 11
    masks, info = lib.topk_select(xs, groups, ks, digit0, _NATIVE_CAND_BYTES)
    if info[0] >= 0:
        raise ValueError(f"scores[{names[info[0]]!r}]: contains NaN scores" + what)
    return masks


def _native_element(scores, density, scope, lib):
    names = list(scores)
    xs = [t.detach() for t in scores.values()]
    masks = _native_call(lib, xs, [x.numel() for x in xs], density, scope, names, "")
    return {nm: Mask._trusted("element", torch.Size(x.shape), m) for nm, x, m in zip(names, xs, masks)}


def _native_units(srcs, density, scope, lib):
    """Block / row / module masks: the generic engine's unit means (same chunks: bit-identical values),
    selected natively as ``(units, 1)`` float64 tensors (one 0/1 byte each)."""
    g = srcs[0].g
    for s in srcs:
        s.fill_cache()
    try:
        masks = _native_call(lib, [s.cache.view(-1, 1) for s in srcs], [s.units for s in srcs], density, scope,
                             [s.name for s in srcs], f" (a {g} mean is NaN)")
    finally:
        for s in srcs:
            s.cache = None
    out = {}
    for s, m in zip(srcs, masks):
        shape = s.grid if g == "block" else (s.rows,) if g == "row" else ()
        data = m.view(torch.bool).view(shape) if s.units else torch.zeros(shape, dtype=torch.bool)
        out[s.name] = Mask._trusted(g, torch.Size(s.x.shape), data, s.block if g == "block" else None)
    return out


# ===================================================================================== GPU engine
_DEVICE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}   # topk_kernels.h Dtype
_DESC_COLS, _BYTES, _PBLOCK0 = 9, 1, 6                                     # topk_kernels.h DescField
_HIST_COLS, _NAN_BIN = 257, 256
_NONE_EQUAL, _ALL_EQUAL, _PARTIAL = 0, 1, 2                                # topk_kernels.h Mode
_U32 = 1 << 32
# Each tensor's mask rows start at a multiple of 16 bytes of the flat output buffer, so that every mask
# view is as aligned as a tensor of its own (vector loads in the LoRA kernels); <= 15 bytes a tensor.
_OUT_ALIGN = 16
# Candidates (4 bytes each) are written only when they take at most 1/8 of the scores' bytes: writing
# them and reading them in passes 2 and 3 costs 12 bytes a candidate against 2 full reads of the
# scores without them (break-even at 1/6), and the extra memory stays under 1/8 of the scores'.
_CAND_FRACTION = 8
# The window path: a sample of up to 2^20 keys (4 MB; ~15 us of scattered reads at 860 M scores). The
# window is the sample's ranks p*m ± 6 sigma (sigma = sqrt(m p (1-p)), the binomial spread of the k-th
# key's rank in the sample): missed with probability ~1e-9 for a random sample (the fallback is exact
# anyway), and it holds ~12 sigma / m of the entries: 0.26% at p = 0.05, m = 2^20, i.e. 2.2 M of 860 M
# candidates, 8 bytes each with their tensor: ~21 MB with the capacity's 1.2x slack, ~0.6% of the fp32
# scores (plus ~5 bytes a candidate while the ties are counted per tensor).
_SAMPLE = 1 << 20
_WINDOW_SIGMAS = 6
_WINDOW_SLACK = 1.2
_WINDOW_PAD = 2          # sample ranks added on each side (the window of a tiny sample is never empty)


def _device_ok(t: torch.Tensor) -> bool:
    """Whether the GPU kernels take this score tensor (its mask's byte offsets fit their 32-bit math)."""
    if t.dtype not in _DEVICE_DTYPES or not t.is_contiguous() or t.is_neg():
        return False
    rows, cols = _matrix_shape(t.shape)
    return rows * ((cols + 7) // 8) < _U32


def _device_ops(scores):
    """``torch.ops.spare_kernels_cuda`` when the GPU engine applies to ``scores``, else None."""
    ts = list(scores.values())
    dev = ts[0].device
    if dev.type != "cuda" or not all(t.device == dev and _device_ok(t) for t in ts):
        return None
    from .backends import cuda as _cuda
    lib = _cuda.library()
    if lib is None or not hasattr(lib, "topk_compact"):
        return None
    return lib


def _upload(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A small host table on ``dev`` without a stream sync (pinned, non-blocking; torch keeps the pinned
    block until the copy is done)."""
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def _download(*ts: torch.Tensor, idle=None):
    """Host copies of small device tables: the driver's one sync per pass (all of them in one wait).
    ``idle``: a list of host jobs run (and removed) before waiting, while the device works."""
    while idle:
        idle.pop()()
    if ts[0].device.type != "cuda":
        return tuple(t.clone() for t in ts)
    outs = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in ts)
    torch.cuda.current_stream(ts[0].device).synchronize()
    return outs


def _window_select(ops, desc, n, total, k, dev, threads, hchunk, hblocks, cchunk, names, idle):
    """The window path of a global group: ``(thr_g, mode_g, need, final, eq_t)`` as :func:`_radix_passes`
    returns them, or None when the k-th key is not in the sampled window (the radix passes then run).
    Raises on NaN scores. Syncs: the window pass's counts, then one per selection pass over the
    candidates (<= 4, a few us each) and the per-tensor tie counts."""
    m = min(total, _SAMPLE)
    p = k / total
    delta = math.ceil(_WINDOW_SIGMAS * math.sqrt(m * p * (1 - p))) + _WINDOW_PAD
    hi_pos, lo_pos = math.floor(p * m) - delta, math.ceil(p * m) + delta     # sample ranks from the top
    frac = (min(lo_pos, m) - max(hi_pos, 0)) / m
    cap = min(total, math.ceil(_WINDOW_SLACK * frac * total) + 1024)
    samp = torch.empty(m, dtype=torch.int32, device=dev)
    ops.topk_sample(desc, samp, total, threads)
    # the window's bounds: order statistics of the sample, on the device (a radix sort; no sync)
    srt = samp.sort().values
    i32 = torch.iinfo(torch.int32)
    hi = srt[m - 1 - hi_pos] if hi_pos >= 0 else torch.full((), i32.max, dtype=torch.int32, device=dev)
    lo = srt[m - 1 - lo_pos] if lo_pos < m else torch.full((), i32.min, dtype=torch.int32, device=dev)
    win = torch.stack([lo, hi])
    del samp, srt, lo, hi                               # (lo and hi are views of the sorted sample)
    counts = torch.zeros((n, 2), dtype=torch.int64, device=dev)
    cursor = torch.zeros(1, dtype=torch.int64, device=dev)
    cand = torch.empty(cap, dtype=torch.int32, device=dev)
    cand_t = torch.empty(cap, dtype=torch.int32, device=dev)
    ops.topk_window(desc, win, counts, cursor, cand, cand_t, threads, hchunk, hblocks)
    cnt, cur = _download(counts, cursor, idle=idle)
    bad = cnt[:, 1].nonzero()
    if bad.numel():
        raise ValueError(f"scores[{names[int(bad[0, 0])]!r}]: contains NaN scores")
    above, c = int(cnt[:, 0].sum()), int(cur[0])
    if not (above < k <= above + c) or c > cap:
        return None
    # radix select of the (k - above)-th largest candidate: the radix path's rules on one segment
    cb = -(-c // cchunk)
    ctab = _upload(torch.tensor([[0, c, 0]], dtype=torch.int64), dev)
    hist = torch.zeros((1, _HIST_COLS), dtype=torch.int64, device=dev)
    need, prefix = k - above, 0
    for level in range(4):
        if level:
            hist.zero_()
        ops.topk_cand_histogram(ctab, _upload(torch.tensor([prefix]), dev), hist, cand, level, threads, cchunk, cb)
        h, = _download(hist)
        hg = h[0, :256]
        at_or_above = hg.flip(0).cumsum(0).flip(0)
        d = max(int((at_or_above >= need).sum()) - 1, 0)
        in_bin = int(hg[d])
        need -= int(at_or_above[d]) - in_bin
        prefix = (prefix << 8) | d
        if level < 3 and in_bin == need:        # the bin holds exactly the keys still needed
            low = prefix << (24 - 8 * level)
            return (torch.tensor([max(low - 1, 0)]), torch.tensor([_NONE_EQUAL if low > 0 else _ALL_EQUAL]),
                    torch.tensor([need]), torch.zeros(1, dtype=torch.bool), torch.zeros(n, dtype=torch.int64))
    # a whole key: the tensors' counts of keys equal to it, for the ties
    thr32 = prefix - _U32 if prefix >= 1 << 31 else prefix
    eq = torch.zeros(n, dtype=torch.int32, device=dev).index_add_(0, cand_t[:c], (cand[:c] == thr32).to(torch.int32))
    eq_t, = _download(eq)
    return (torch.tensor([prefix]), torch.tensor([_NONE_EQUAL]), torch.tensor([need]), torch.ones(1, dtype=torch.bool),
            eq_t.to(torch.int64))


def _device_topk(scores: dict, density: float, scope: str, ops, config=None, compact=None, window=None) -> dict:
    """Element masks of ``scores`` (contiguous fp32/fp16/bf16 tensors on one device) by the ``topk_*``
    ops of ``ops``: ``torch.ops.spare_kernels_cuda`` on CUDA tensors, or ``torch.ops.spare_harness``
    (the same kernel bodies run on the host, tests/harness.py) on CPU tensors. ``config``:
    ``(threads, histogram chunk bytes)``, by default ``ops.topk_config()`` (the CUDA kernels take
    only their own). ``window``: try (default: for ``global``) or skip the sampled window;
    ``compact``: force (True) or forbid (False) the radix path's candidate array (default: when it
    takes at most 1/8 of the scores' bytes). Arguments are not validated here (:func:`topk_masks` does)."""
    names = list(scores)
    xs = list(scores.values())
    dev = xs[0].device
    threads, hchunk = (int(v) for v in (config or ops.topk_config()))
    pchunk = threads                       # the pack takes one output byte per thread
    cchunk = 8 * hchunk                    # candidate keys per block: a histogram block's entries
    n = len(xs)
    # The only per-tensor host work: one row of Python ints per tensor; the rest is vectorised.
    shapes = [x.shape for x in xs]
    meta = torch.tensor([(x.data_ptr(), s[0], s.numel(), _DEVICE_DTYPES[x.dtype], x.element_size())
                         for x, s in zip(xs, shapes)], dtype=torch.int64).reshape(n, 5)
    rows, numel = meta[:, 1], meta[:, 2]
    cols = torch.where(rows > 0, numel // rows.clamp(min=1), 0)
    for i in (rows == 0).nonzero()[:, 0].tolist():     # (0, c...): cols from the shape
        cols[i] = _matrix_shape(shapes[i])[1]
    rb = (cols + 7) // 8
    nbytes = rows * rb
    hb, pb = -(-nbytes // hchunk), -(-nbytes // pchunk)
    padded = -(-nbytes // _OUT_ALIGN) * _OUT_ALIGN
    out_off = padded.cumsum(0) - padded
    hblocks, pblocks, total_out = int(hb.sum()), int(pb.sum()), int(padded.sum())
    desc_host = torch.stack([meta[:, 0], nbytes, cols, rb, meta[:, 3], hb.cumsum(0) - hb, pb.cumsum(0) - pb,
                             out_off, numel.cumsum(0) - numel], 1)
    desc = _upload(desc_host, dev)
    flat = torch.empty(total_out, dtype=torch.uint8, device=dev)
    score_bytes = int((numel * meta[:, 4]).sum())

    # groups of tensors selected together: contiguous index ranges
    per_module = scope == "per_module"
    gid = torch.arange(n) if per_module else torch.zeros(n, dtype=torch.int64)
    size = numel.clone() if per_module else numel.sum().reshape(1)
    starts = torch.arange(n) if per_module else torch.zeros(1, dtype=torch.int64)
    need = torch.tensor([round(density * s) for s in size.tolist()], dtype=torch.int64)
    active = (need > 0) & (need < size)
    # the rule of a group that is done: k = 0 -> nothing (no key exceeds 2^32-1), k = n -> all
    thr_g = torch.where(need == 0, _U32 - 1, 0)
    mode_g = torch.where(need == 0, _NONE_EQUAL, _ALL_EQUAL)
    final = torch.zeros_like(active)       # groups whose threshold is a whole key: ties to distribute
    eq_t = None                            # per tensor: keys equal to its group's threshold (final groups)
    views = []                             # the masks' views of the flat buffer, made while the first pass runs

    def make_views():
        views.extend(flat.as_strided((r, b), (b, 1), o)
                     for r, b, o in zip(rows.tolist(), rb.tolist(), out_off.tolist()))
    idle = [make_views]
    if not per_module and bool(active[0]) and window is not False:
        got = _window_select(ops, desc, n, int(size[0]), int(need[0]), dev, threads, hchunk, hblocks, cchunk, names,
                             idle)
        if got is not None:
            thr_g, mode_g, need, final, eq_t = got
    if eq_t is None:
        thr_g, mode_g, need, final, eq_t = _radix_passes(ops, desc, n, gid, need, active, thr_g, mode_g, per_module,
                                                          score_bytes, dev, threads, hchunk, hblocks, cchunk, names,
                                                          compact, idle)

    thr_t, mode_t = thr_g[gid], mode_g[gid]
    take = torch.zeros(n, dtype=torch.int64)
    if bool(final.any()):
        # ties: the tensors of a group take the tied keys still needed in dict order
        eq = torch.where(final[gid], eq_t, 0)
        cum = eq.cumsum(0) - eq
        before = cum - cum[starts[gid]]
        take = torch.minimum((need[gid] - before).clamp(min=0), eq)
        rule = torch.where(take == eq, _ALL_EQUAL, torch.where(take == 0, _NONE_EQUAL, _PARTIAL))
        mode_t = torch.where(final[gid], rule, mode_t)
        take = torch.where(mode_t == _PARTIAL, take, 0)

    eq0 = torch.zeros(n, dtype=torch.int64)
    cut = (mode_t == _PARTIAL).nonzero()[:, 0]
    if cut.numel():
        sub = desc_host[cut].clone()
        chunks = -(-sub[:, _BYTES] // pchunk)
        offs = chunks.cumsum(0) - chunks
        sub[:, _PBLOCK0] = offs
        eq0[cut] = offs
        counts = torch.zeros(int(chunks.sum()), dtype=torch.int64, device=dev)
        ops.topk_equal_counts(_upload(sub, dev), _upload(thr_t[cut], dev), counts, threads, pchunk)
        scan = counts.cumsum(0) - counts
    else:
        scan = torch.zeros(1, dtype=torch.int64, device=dev)
    sel = _upload(torch.stack([thr_t, mode_t, take, eq0], 1), dev)
    ops.topk_pack(desc, sel, scan, flat, threads, pblocks)
    while idle:                            # no pass waited on (k = 0 or k = n is still one): now
        idle.pop()()
    return {nm: Mask._trusted("element", s, v) for nm, s, v in zip(names, shapes, views)}


def _radix_passes(ops, desc, n, gid, need, active, thr_g, mode_g, per_module, score_bytes, dev, threads, hchunk,
                  hblocks, cchunk, names, compact, idle):
    """The radix path: up to 4 passes of 8-bit digits (pass 0 over every score, pass 1 over every score
    writing the candidates of pass 0's bin, passes 2-3 over those candidates), one sync each. Returns
    ``(thr_g, mode_g, need, final, eq_t)``."""
    prefix = torch.zeros_like(need)
    final = torch.zeros_like(active)
    hist = torch.zeros((n, _HIST_COLS), dtype=torch.int64, device=dev)
    ctab = cand = None
    h = d = None
    for level in range(4):
        if level:
            if not bool(active.any()):
                break
            hist.zero_()
        # pass 0 counts every tensor (NaN check); later passes the tensors of unfinished groups
        tprefix = torch.zeros(n, dtype=torch.int64) if level == 0 else torch.where(active[gid], prefix[gid], -1)
        tp = _upload(tprefix, dev)
        if level == 0:
            ops.topk_histogram(desc, tp, hist, 0, threads, hchunk, hblocks)
            h, = _download(hist, idle=idle)
            bad = h[:, _NAN_BIN].nonzero()
            if bad.numel():
                raise ValueError(f"scores[{names[int(bad[0, 0])]!r}]: contains NaN scores")
        elif level == 1:
            # the keys in the bin pass 0 picked: exactly h[t, prefix[t]] of them per tensor
            cnt = torch.where(tprefix >= 0, h[torch.arange(n), tprefix.clamp(min=0)], 0)
            total = int(cnt.sum())
            use = (4 * total <= score_bytes // _CAND_FRACTION) if compact is None else compact
            use = use and total > 0
            cb = -(-cnt // cchunk)
            ctab = _upload(torch.stack([cnt.cumsum(0) - cnt, cnt, cb.cumsum(0) - cb], 1), dev)
            cursor = torch.zeros(n, dtype=torch.int64, device=dev)
            cand = torch.empty(total if use else 0, dtype=torch.int32, device=dev)
            ops.topk_compact(desc, tp, hist, ctab, cursor, cand, threads, hchunk, hblocks)
            h, cur = _download(hist, cursor)
            if use and not torch.equal(cur, cnt):   # cannot happen unless a score tensor changed
                raise RuntimeError("topk_masks: candidate counts differ between passes (scores modified "
                                   "during selection?)")
            if not use:
                cand = None
            cblocks = int(cb.sum())
        elif cand is not None:
            ops.topk_cand_histogram(ctab, tp, hist, cand, level, threads, cchunk, cblocks)
            h, = _download(hist)
        else:
            ops.topk_histogram(desc, tp, hist, level, threads, hchunk, hblocks)
            h, = _download(hist)
        hg = h[:, :256] if per_module else h[:, :256].sum(0, keepdim=True)
        at_or_above = hg.flip(1).cumsum(1).flip(1)                   # [g, d]: keys with digit >= d
        d = ((at_or_above >= need[:, None]).sum(1) - 1).clamp(min=0)
        in_bin = hg.gather(1, d[:, None])[:, 0]
        above = at_or_above.gather(1, d[:, None])[:, 0] - in_bin
        need = torch.where(active, need - above, need)
        prefix = torch.where(active, (prefix << 8) | d, prefix)
        if level < 3:
            # the bin holds exactly the keys still needed: on iff key >= the bin's lowest key
            early = active & (in_bin == need)
            low = prefix << (24 - 8 * level)
            thr_g = torch.where(early, (low - 1).clamp(min=0), thr_g)
            mode_g = torch.where(early, torch.where(low > 0, _NONE_EQUAL, _ALL_EQUAL), mode_g)
            active = active & ~early
        else:
            final = active
            thr_g = torch.where(final, prefix, thr_g)
    eq_t = h[torch.arange(n), d[gid]] if bool(final.any()) else torch.zeros(n, dtype=torch.int64)
    return thr_g, mode_g, need, final, eq_t
