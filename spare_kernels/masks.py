"""Saliency masks: the :class:`Mask` type (four granularities) and exact top-k selection.

A mask has the shape of the weight it masks. A weight ``(out, *rest)`` is viewed as the matrix
``(out, cols)``, ``cols = prod(rest)`` (for a conv kernel: ``in/groups·kh·kw``), as in DESIGN §1.

- ``element``: any pattern; stored bit-packed, 1 bit per weight entry (``nbytes ≈ out·cols/8``).
- ``block``:   ``bo×bi`` tiles of that matrix, each all on or all off; one bool per tile.
- ``row``:     whole output channels; one bool per row; the adapter stays low rank.
- ``module``:  the whole layer on or off; one bool.

:func:`topk_masks` selects exactly ``k`` units (entries, tiles, rows or whole tensors) with the
largest scores over a dict of score tensors, without concatenating them (radix select).
"""
from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Mapping

import torch

from . import maskfmt as fmt

GRANULARITIES = ("element", "block", "row", "module")
SCOPES = ("global", "per_module")


def _check_granularity(g):
    if not isinstance(g, str) or g not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {g!r}")
    return g


def _check_block(block):
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ValueError(f"block: expected a pair of positive ints (bo, bi), got {block!r}")
    return int(block[0]), int(block[1])


def _matrix_shape(shape):
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("mask: expected a weight shape with at least one dim, got ()")
    return shape[0], math.prod(shape[1:])


class Mask:
    """A weight mask at one granularity. Build with :meth:`from_dense` or :func:`topk_masks`."""

    __slots__ = ("granularity", "shape", "block", "data")

    def __init__(self, granularity: str, shape, data: torch.Tensor, block=(32, 32)):
        self.granularity = _check_granularity(granularity)
        self.shape = torch.Size(shape)
        self.block = _check_block(block) if granularity == "block" else None
        rows, cols = _matrix_shape(self.shape)
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data: expected a torch.Tensor, got {type(data).__name__}")
        expected = {
            "element": ((rows, (cols + 7) // 8), torch.uint8),
            "block": ((-(-rows // (self.block or (1, 1))[0]), -(-cols // (self.block or (1, 1))[1])),
                      torch.bool),
            "row": ((rows,), torch.bool),
            "module": ((), torch.bool),
        }[granularity]
        if tuple(data.shape) != expected[0] or data.dtype != expected[1]:
            raise ValueError(f"data: expected {expected[1]} of shape {expected[0]} for a {granularity} mask "
                             f"of {tuple(self.shape)}, got {data.dtype} of shape {tuple(data.shape)}")
        self.data = data

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_dense(cls, t: torch.Tensor, granularity: str = "element", block=(32, 32)) -> "Mask":
        """From a bool/uint8 tensor of the weight's shape (nonzero = on). For ``block``, ``row`` and
        ``module`` the pattern must already be uniform over each unit, else ``ValueError``."""
        _check_granularity(granularity)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mask: expected a bool or uint8 tensor, got {type(t).__name__}")
        if t.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"mask: expected dtype torch.bool or torch.uint8, got {t.dtype}")
        rows, cols = _matrix_shape(t.shape)
        m = t.reshape(rows, cols) != 0
        if granularity == "element":
            return cls("element", t.shape, fmt.pack_bits(m))
        if granularity == "module":
            on = bool(m.any())
            if on and not bool(m.all()):
                raise ValueError("mask: a module mask must be all on or all off")
            return cls("module", t.shape, torch.tensor(on, device=t.device))
        if granularity == "row":
            on = m.any(1)
            mixed = on & ~m.all(1)                 # some on, some off (an empty row is off)
            if bool(mixed.any()):
                bad = int(mixed.nonzero()[0])
                raise ValueError(f"mask: row {bad} mixes on and off entries; not a row mask")
            return cls("row", t.shape, on)
        bo, bi = _check_block(block)
        counts = _tile_sums(m, bo, bi, dtype=torch.int32)
        sizes = _tile_sizes(rows, cols, bo, bi, t.device)
        mixed = (counts > 0) & (counts < sizes)
        if bool(mixed.any()):
            p, q = (int(v) for v in mixed.nonzero()[0])
            raise ValueError(f"mask: tile ({p}, {q}) of block={bo, bi} mixes on and off entries; "
                             f"not a block mask")
        return cls("block", t.shape, counts > 0, block=(bo, bi))

    # ------------------------------------------------------------------------------ views
    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def wire(self):
        """``(data, kind, block_o, block_i)`` as the ops take it (see ``maskfmt``)."""
        g = self.granularity
        if g == "element":
            return self.data, fmt.ELEMENT, 0, 0
        if g == "block":
            return self.data, fmt.BLOCK, self.block[0], self.block[1]
        if g == "row":
            return self.data, fmt.ROW, 0, 0
        if bool(self.data):                      # module on: plain LoRA, factored
            return None, fmt.NONE, 0, 0
        return torch.zeros(self.shape[0], dtype=torch.bool, device=self.device), fmt.ROW, 0, 0

    def to_dense(self) -> torch.Tensor:
        """bool tensor of the weight's shape."""
        rows, cols = _matrix_shape(self.shape)
        if self.granularity == "module":
            return self.data.expand(self.shape).clone()
        if rows * cols == 0:
            return torch.zeros(self.shape, dtype=torch.bool, device=self.device)
        data, kind, bo, bi = self.wire()
        return fmt.expand(data, kind, bo, bi, rows, cols).reshape(self.shape).clone()

    @property
    def count(self) -> int:
        """Number of weight entries that are on."""
        rows, cols = _matrix_shape(self.shape)
        g = self.granularity
        if g == "element":
            return _popcount(self.data)
        if g == "row":
            return int(self.data.sum()) * cols
        if g == "module":
            return int(self.data) * rows * cols
        bo, bi = self.block
        sizes = _tile_sizes(rows, cols, bo, bi, self.device)
        return int((sizes * self.data).sum())

    @property
    def density(self) -> float:
        return self.count / max(self.numel, 1)

    def to(self, device) -> "Mask":
        return Mask(self.granularity, self.shape, self.data.to(device), self.block or (32, 32))

    def __eq__(self, other):
        return (isinstance(other, Mask) and self.granularity == other.granularity
                and self.shape == other.shape and self.block == other.block
                and torch.equal(self.data.cpu(), other.data.cpu()))

    __hash__ = None  # mutable payload; equality is by value

    def __repr__(self):
        extra = f", block={self.block}" if self.block else ""
        return (f"Mask({self.granularity}, shape={tuple(self.shape)}{extra}, "
                f"density={self.density:.4f}, nbytes={self.nbytes})")


def as_mask(m, shape, device=None, name: str = "mask", op: str = "") -> Mask:
    """Any accepted mask (a :class:`Mask`, or a bool/uint8 tensor of the weight's shape, nonzero = on)
    as a ``Mask`` of ``shape`` on ``device`` (if given), or a clear error naming ``name``. Callers that
    change a model convert every mask first, so a bad one is refused before anything changed."""
    pre = f"{op}: " if op else ""
    if isinstance(m, torch.Tensor):
        if m.dtype not in (torch.bool, torch.uint8):
            hint = " (e.g. (scores > t), not (scores > t).float())" if m.is_floating_point() else ""
            raise TypeError(f"{pre}{name}: expected a bool or uint8 tensor or a Mask, got dtype {m.dtype}{hint}")
    elif not isinstance(m, Mask):
        raise TypeError(f"{pre}{name}: expected a Mask or a bool/uint8 tensor, got {type(m).__name__}")
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{pre}{name}: expected the weight's shape {tuple(shape)}, got {tuple(m.shape)}")
    data = m if isinstance(m, torch.Tensor) else m.data
    if data.device.type == "meta":
        raise ValueError(f"{pre}{name}: expected a mask with data, got one on the meta device")
    if device is not None and data.device != torch.device(device):
        m = m.to(device)
    return Mask.from_dense(m, "element") if isinstance(m, torch.Tensor) else m


def _popcount(packed: torch.Tensor, chunk: int = 1 << 18) -> int:
    """Number of set bits of a uint8 tensor (SWAR in uint8, chunked: no int64 blow-up)."""
    flat = packed.reshape(-1)
    total = 0
    for i in range(0, flat.numel(), chunk):
        v = flat[i:i + chunk]
        v = v - ((v >> 1) & 0x55)
        v = (v & 0x33) + ((v >> 2) & 0x33)
        v = (v + (v >> 4)) & 0x0F
        total += int(v.sum(dtype=torch.int64))
    return total


def _tile_sizes(rows: int, cols: int, bo: int, bi: int, device) -> torch.Tensor:
    """int64 ``(ceil(rows/bo), ceil(cols/bi))``: number of entries of each (possibly partial) tile."""
    rs = (rows - torch.arange(0, rows, bo, device=device)).clamp(max=bo)
    cs = (cols - torch.arange(0, cols, bi, device=device)).clamp(max=bi)
    return rs[:, None] * cs[None, :]


def _tile_sums(m: torch.Tensor, bo: int, bi: int, dtype=torch.int64) -> torch.Tensor:
    """Sum of each ``bo×bi`` tile of a 2-D tensor (edge tiles partial), accumulated in ``dtype``."""
    rows, cols = m.shape
    pr, pc = -(-rows // bo), -(-cols // bi)
    padded = torch.zeros(pr * bo, pc * bi, dtype=dtype, device=m.device)
    padded[:rows, :cols] = m
    return padded.view(pr, bo, pc, bi).sum((1, 3))


# ===================================================================================== top-k
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

    Raises:
        TypeError: ``scores`` not a dict, a key not a str, a value not a floating-point tensor.
        ValueError: empty ``scores``, a 0-dim tensor, NaN scores (naming the tensor), ``density``
            not in ``(0, 1]``, unknown ``granularity``/``scope``, a bad ``block``.
    """
    bo_bi = _validate(scores, density, granularity, scope, block)
    density = float(density)
    srcs = [_Source(n, t.detach(), granularity, bo_bi, _CHUNK, _CACHE_UNITS) for n, t in scores.items()]
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
    ft = keys.ftype
    # level 0: NaN check and histogram of the top digit
    hist = _histogram(group, keys, 0, None, check_nan=True)
    if k == 0 or k == n_units:
        return _build(group, keys, "none" if k == 0 else "all", None, 0, k)
    need, prefix = k, None
    for level in range(keys.levels):
        if level:
            lo_key = prefix << (keys.bits - _DIGIT * level)
            hi_key = lo_key + (1 << (keys.bits - _DIGIT * level)) - 1
            hist = _histogram(group, keys, level, keys.bounds(lo_key, hi_key))
        at_or_above = hist.flip(0).cumsum(0).flip(0)          # [d] = units with digit >= d
        d = int((at_or_above >= need).sum()) - 1
        need -= int(at_or_above[d]) - int(hist[d])             # minus the units strictly above
        prefix = d - _NBINS // 2 if level == 0 else (prefix << _DIGIT) | d
    threshold = torch.tensor(keys.to_float(prefix), dtype=ft)
    return _build(group, keys, "threshold", threshold, need, k)


def _histogram(group, keys, level, bounds, check_nan=False):
    hist = torch.zeros(_NBINS, dtype=torch.int64)
    for s in group:
        for c, _ in s.chunks():
            c = c.to(keys.ftype)
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
    return hist


def _build(group, keys, mode, threshold, ties, k):
    """Masks of ``group``: all off, all on, or ``score > threshold`` plus the first ``ties`` units
    equal to it."""
    out, total = {}, 0
    for s in group:
        rows, cols, dev = s.rows, s.cols, s.device
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
            for c, slot in s.chunks():
                if mode == "all":
                    sel = torch.ones(c.numel(), dtype=torch.bool, device=dev)
                else:
                    c = c.to(keys.ftype)
                    thr = threshold.to(dev)
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
                total += int(torch.count_nonzero(sel))
                if s.g == "element":
                    r0, r1, c0, c1 = slot
                    data[r0:r1, c0 // 8:(c1 + 7) // 8] = fmt.pack_bits(sel.view(r1 - r0, c1 - c0))
                else:
                    flat[slot[0]:slot[1]] = sel
                del sel
        kw = {"block": s.block} if s.g == "block" else {}
        out[s.name] = Mask(s.g, s.x.shape, data, **kw)
    if total != k:  # cannot happen unless a score tensor changed between passes
        raise RuntimeError(f"topk_masks: selected {total} units, expected {k} (scores modified during "
                           f"selection?)")
    return out
