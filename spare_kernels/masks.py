"""Saliency masks: the :class:`Mask` type (four granularities).

A mask has the shape of the weight it masks. A weight ``(out, *rest)`` is viewed as the matrix
``(out, cols)``, ``cols = prod(rest)`` (for a conv kernel: ``in/groups·kh·kw``), as in DESIGN §1.

- ``element``: any pattern; stored bit-packed, 1 bit per weight entry (``nbytes ≈ out·cols/8``).
- ``block``:   ``bo×bi`` tiles of that matrix, each all on or all off; one bool per tile.
- ``row``:     whole output channels; one bool per row; the adapter stays low rank.
- ``module``:  the whole layer on or off; one bool.

:func:`topk_masks` (in :mod:`spare_kernels.topk`, re-exported here) selects exactly ``k`` units
(entries, tiles, rows or whole tensors) with the largest scores over a dict of score tensors, without
concatenating them (radix select; on CUDA tensors, element masks by the GPU kernels of ``csrc/cuda``).
"""
from __future__ import annotations

import math
import numbers

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


def _check_padding(data: torch.Tensor, cols: int) -> None:
    """The padding bits of a packed element mask (past column ``cols`` in each row's last byte) must be
    zero: the kernels ignore them, but ``count`` / ``density`` would count them. Reads only the last
    byte column, and only where there is padding (``cols % 8``; none for most real layers)."""
    pad = (-cols) % 8
    if not pad or data.numel() == 0 or data.device.type == "meta":
        return
    hit = (data[:, -1] >> (8 - pad)) != 0            # the top ``pad`` bits (LSB first: bit b = column 8j+b)
    if bool(hit.any()):
        row = int(hit.nonzero()[0])
        raise ValueError(f"data: expected zero padding bits (bits {8 - pad}..7 of each row's last byte: the "
                         f"weight has {cols} columns), got nonzero padding bits in row {row} "
                         f"(byte {int(data[row, -1]):#04x})")


def _matrix_shape(shape):
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("mask: expected a weight shape with at least one dim, got ()")
    return shape[0], math.prod(shape[1:])


class Mask:
    """A weight mask at one granularity. Build with :meth:`from_dense` or :func:`topk_masks`."""

    # _on: a module mask's on/off as a host bool, set with its data (wire() must not read the device on
    # every forward: bool(tensor) of a CUDA tensor waits for the stream). Replace the data (mask.data = t)
    # or build a new Mask to change it; an in-place write to a module mask's tensor is not seen.
    __slots__ = ("granularity", "shape", "block", "_data", "_on")

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
        if granularity == "element":
            _check_padding(data, cols)
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
            return cls._trusted("element", torch.Size(t.shape), fmt.pack_bits(m))   # zero padding
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

    @classmethod
    def _trusted(cls, granularity: str, shape: torch.Size, data: torch.Tensor, block=None) -> "Mask":
        """A mask from parts already known to be consistent (the top-k engines' output): no checks,
        for the hundreds of masks of a UNet at once."""
        m = cls.__new__(cls)
        m.granularity, m.shape, m.block, m.data = granularity, shape, block, data
        return m

    @property
    def data(self) -> torch.Tensor:
        return self._data

    @data.setter
    def data(self, value: torch.Tensor):
        self._data = value
        # once per mask made or changed: the only device read of a module mask
        self._on = bool(value) if getattr(self, "granularity", None) == "module" else None

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
        if self._on:                             # module on: plain LoRA, factored (a host bool)
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
            return int(self._on) * rows * cols
        bo, bi = self.block
        sizes = _tile_sizes(rows, cols, bo, bi, self.device)
        return int((sizes * self.data).sum())

    @property
    def density(self) -> float:
        return self.count / max(self.numel, 1)

    def to(self, device) -> "Mask":
        # the data was checked when this mask was made: no second check (no device read)
        return Mask._trusted(self.granularity, self.shape, self.data.to(device), self.block)

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


# The top-k engine lives in spare_kernels.topk (which imports this module); topk_masks stays reachable
# from here, loaded on first use, so that ``from spare_kernels.masks import topk_masks`` keeps working
# without an import cycle.
def __getattr__(name):
    if name == "topk_masks":
        from .topk import topk_masks
        return topk_masks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
