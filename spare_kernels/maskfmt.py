"""Wire format of masks as the ops and kernels see them: public, and free of side effects.

Every backend's kernels read masks in this format (the C++ twin of these constants is
``csrc/common/maskfmt.h``; a test checks the two agree). Importing it imports only torch: no backend,
no compiled extension.

A weight of shape ``(out, *rest)`` is viewed as a matrix ``(out, cols)``, ``cols = prod(rest)``.
The op-level mask is ``(data, kind, block_o, block_i)``:

- ``NONE``    : ``data`` unused (``None``); plain LoRA, factored.
- ``ELEMENT`` : ``data`` uint8 ``(out, ceil(cols / 8))``; bit ``b`` (LSB first) of byte ``j`` in row
  ``o`` is entry ``(o, 8*j + b)``; padding bits are zero. Rows are byte-aligned so a kernel can
  address any row tile directly.
- ``BLOCK``   : ``data`` bool ``(ceil(out / block_o), ceil(cols / block_i))``; tile ``(p, q)`` covers
  rows ``p*block_o ...`` and cols ``q*block_i ...`` (edge tiles are partial).
- ``ROW``     : ``data`` bool ``(out,)``; ``diag(m)·B·A``, stays low rank.
"""
from __future__ import annotations

import sys

import torch

NONE, ELEMENT, BLOCK, ROW = 0, 1, 2, 3
KIND_NAMES = {NONE: "none", ELEMENT: "element", BLOCK: "block", ROW: "row"}
BITS_PER_BYTE = 8
LSB_FIRST = True     # bit b of byte j of a row is column 8*j + b

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


# Multiplying eight 0/1 bytes (one little-endian int64) by this constant sums byte i into bit 56 + i
# with no carries between them (checked for all 256 patterns in tests/test_layer_bound.py): the top byte
# is the eight bits, LSB first. One multiply over 1/8 of the entries and a strided byte copy; the
# bit-plane loop (_pack_planes) runs ~30 strided ops: a 1280 x 5120 bool mask packed in 22 ms vs 263 ms
# (2 threads, loaded machine).
_GATHER = 0x0102040810204080


def pack_bits(dense: torch.Tensor) -> torch.Tensor:
    """bool ``(rows, cols)`` -> uint8 ``(rows, ceil(cols/8))``, LSB first, zero padding (nonzero = on).

    A bool tensor must hold 0/1 bytes, as every torch op makes them (a uint8 tensor reinterpreted with
    ``.view(torch.bool)`` need not: pass it as uint8, which is compared with 0 first)."""
    rows, cols = dense.shape
    nbytes = (cols + 7) // 8
    if dense.dtype in (torch.bool, torch.uint8) and rows * nbytes > 0:
        # 0/1 bytes, rows padded to whole bytes, contiguous: the int64 view needs all three
        u = dense if dense.dtype == torch.bool else dense != 0
        if cols % 8:
            u = torch.nn.functional.pad(u.view(torch.uint8), (0, nbytes * 8 - cols))
        u = u.contiguous().view(torch.uint8)
        if u.storage_offset() % 8 == 0 and sys.byteorder == "little":
            # through 1-D: a single-row slice is "contiguous" with any row stride, which int64 views refuse
            v = u.reshape(-1).view(torch.int64).view(rows, nbytes) * _GATHER   # byte j of a row: its 8 entries
            return v.view(torch.uint8)[:, 7::8].contiguous()   # the top (last, little-endian) byte
    return _pack_planes(dense)


def _pack_planes(dense: torch.Tensor) -> torch.Tensor:
    """pack_bits by OR-ing the eight bit planes (any dtype, any layout)."""
    rows, cols = dense.shape
    nbytes = (cols + 7) // 8
    u = torch.zeros(rows, nbytes * 8, dtype=torch.uint8, device=dense.device)
    u[:, :cols] = dense != 0
    u = u.view(rows, nbytes, 8)
    out = u[..., 0].clone()
    for b in range(1, 8):
        out.bitwise_or_(u[..., b] << b)
    return out


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 ``(rows, ceil(cols/8))`` -> bool ``(rows, cols)``."""
    rows, nbytes = packed.shape
    w = _BIT_WEIGHTS.to(packed.device)
    bits = (packed.unsqueeze(-1) & w) != 0
    return bits.reshape(rows, nbytes * 8)[:, :cols]


def expand(data, kind: int, block_o: int, block_i: int, rows: int, cols: int) -> torch.Tensor | None:
    """The dense bool ``(rows, cols)`` mask of a wire mask (``None`` for ``NONE``)."""
    if kind == NONE:
        return None
    if kind == ELEMENT:
        return unpack_bits(data, cols)
    if kind == BLOCK:
        return data.repeat_interleave(block_o, 0).repeat_interleave(block_i, 1)[:rows, :cols]
    if kind == ROW:
        return data.reshape(rows, 1).expand(rows, cols)
    raise ValueError(f"unknown mask kind {kind}")
