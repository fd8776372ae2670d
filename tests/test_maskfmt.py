"""The mask wire format has one definition per language, held together: ``spare_kernels/maskfmt.py``
against its C++ twin ``csrc/common/maskfmt.h``, read as text (always) and through ``wire_format()``
of every native library built here: ``spare_kernels._C`` (torch.ops.spare_kernels_cpu),
``spare_kernels._C_cuda`` (torch.ops.spare_kernels_cuda; built by ``make cuda-ext`` in its own venv,
whose check runs the same comparison) and the host harness of the CUDA kernel bodies
(torch.ops.spare_harness, tests/harness.py)."""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re

import pytest
import torch

from spare_kernels import maskfmt as fmt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = [fmt.NONE, fmt.ELEMENT, fmt.BLOCK, fmt.ROW, fmt.BITS_PER_BYTE, int(fmt.LSB_FIRST)]


def test_header_constants_match_maskfmt_py():
    with open(os.path.join(ROOT, "csrc", "common", "maskfmt.h")) as f:
        h = f.read()
    enum = re.search(r"enum MaskKind\b[^{]*\{([^}]*)\}", h)
    assert enum, "csrc/common/maskfmt.h: no `enum MaskKind { ... }`"
    kinds = dict((k, int(v)) for k, v in re.findall(r"(k\w+)\s*=\s*(\d+)", enum.group(1)))
    bits = re.search(r"kBitsPerByte\s*=\s*(\d+)", h)
    lsb = re.search(r"kLsbFirst\s*=\s*(true|false)", h)
    assert bits and lsb, "csrc/common/maskfmt.h: kBitsPerByte / kLsbFirst not found"
    got = [kinds.get("kNone"), kinds.get("kElement"), kinds.get("kBlock"), kinds.get("kRow"), int(bits.group(1)),
           int(lsb.group(1) == "true")]
    assert got == EXPECTED, f"csrc/common/maskfmt.h {got} != spare_kernels/maskfmt.py {EXPECTED}"


def test_pack_bits_is_lsb_first_with_byte_aligned_rows():
    dense = torch.zeros(2, 10, dtype=torch.bool)
    dense[0, 0] = dense[0, 9] = dense[1, 3] = True
    packed = fmt.pack_bits(dense)
    assert packed.tolist() == [[1, 2], [8, 0]]
    assert torch.equal(fmt.unpack_bits(packed, 10), dense)


def _cpu():
    if importlib.util.find_spec("spare_kernels._C") is None:
        pytest.skip("spare_kernels._C is not built here")
    importlib.import_module("spare_kernels._C")
    return torch.ops.spare_kernels_cpu


def _cuda():
    if importlib.util.find_spec("spare_kernels._C_cuda") is None:
        pytest.skip("spare_kernels._C_cuda is not built here (CPU torch); `make cuda-ext` builds it in .venv-cuda "
                    "and tools/check_cuda_ext.py compares its wire_format() there")
    importlib.import_module("spare_kernels._C_cuda")   # loads without a GPU
    return torch.ops.spare_kernels_cuda


def _harness():
    if not glob.glob(os.path.join(ROOT, "csrc", "harness", "*.cpp")):
        pytest.skip("csrc/harness has no sources yet")
    from harness import harness
    lib = harness()
    if not hasattr(lib, "wire_format"):
        pytest.skip("the host harness (csrc/harness) defines no wire_format() yet: "
                    "SPARE_DEFINE_BACKEND_OPS or SPARE_SCHEMA_WIRE_FORMAT from csrc/common/schemas.h would add it")
    return lib


@pytest.mark.parametrize("library", [_cpu, _cuda, _harness], ids=["spare_kernels_cpu", "spare_kernels_cuda",
                                                                  "spare_harness"])
def test_wire_format_of_every_built_library_matches_maskfmt_py(library):
    lib = library()
    assert list(lib.wire_format()) == EXPECTED
