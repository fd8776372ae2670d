"""The CUDA backend's kernels, run on the CPU: their per-thread bodies (csrc/cuda/lora_kernels.h) driven
over small grids by the host harness (csrc/harness/lora.cpp, tests/harness.py), against the reference
formulas. Same bodies, same indexing and arithmetic as on the GPU; the grids are small and odd so every
edge (partial column blocks, grid-strided rows, partial row and rank tiles, chunks starting at a
non-zero row) is crossed. What this cannot run (the ATen host code of lora.cu / saliency.cu and the
launches themselves) is named in the README."""
import itertools
import os
import shutil

import pytest
import torch

from spare_kernels import maskfmt as fmt

from harness import harness

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def h():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no host C++ compiler: the harness cannot be built")
    return harness()     # a harness that does not compile fails every test here, never skips


def wire(kind, out, cols, block, density=0.5):
    """(data, dense bool) of a random wire mask."""
    if kind == fmt.ELEMENT:
        dense = torch.rand(out, cols) < density
        return fmt.pack_bits(dense), dense
    bo, bi = block
    tiles = torch.rand(-(-out // bo), -(-cols // bi)) < density
    return tiles, fmt.expand(tiles, fmt.BLOCK, bo, bi, out, cols)


def tol(dtype):
    return {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,block", [(fmt.ELEMENT, None), (fmt.BLOCK, (4, 8)), (fmt.BLOCK, (3, 5))])
@pytest.mark.parametrize("out,cols,rank", [(5, 13, 1), (17, 40, 3), (9, 7, 8)])
def test_effective_weight_body(h, dtype, kind, block, out, cols, rank):
    w = torch.randn(out, cols).to(dtype)
    A, B = torch.randn(rank, cols), torch.randn(out, rank)
    data, dense = wire(kind, out, cols, block or (1, 1))
    bo, bi = block or (0, 0)
    threads = 8
    # grid.y below the row count: rows are grid-strided, as on a GPU for weights of > 65535 rows
    got = h.weff(w, A, B, data, kind, bo, bi, 0.7, [-(-cols // threads), 3], [threads])
    want = (w.double() + 0.7 * dense.double() * (B.double() @ A.double())).to(dtype)
    assert not (got == -12345).any(), "an entry no thread wrote"
    torch.testing.assert_close(got.double(), want.double(), rtol=tol(dtype), atol=tol(dtype))
    # off entries are W exactly
    assert torch.equal(got[~dense], w[~dense])


def contract_driver(h, G, A, B, data, kind, bo, bi, scale, chunk, threads):
    """What lora.cu's masked_contract does on a GPU: G by chunks of rows, one contract launch each."""
    out, cols = G.shape
    dA = torch.zeros(A.shape[0], cols)
    dB = torch.zeros(out, A.shape[0])
    for o0 in range(0, out, chunk):
        o1 = min(out, o0 + chunk)
        h.contract(G[o0:o1], o0, A, B, data, kind, bo, bi, scale, dA, dB, threads)
    return dA, dB


@pytest.mark.parametrize("kind,block", [(fmt.ELEMENT, None), (fmt.BLOCK, (4, 8)), (fmt.BLOCK, (16, 3))])
@pytest.mark.parametrize("out,cols,rank,chunk", [(37, 19, 5, 16), (16, 70, 4, 16), (7, 9, 9, 7), (50, 33, 1, 32)])
def test_fused_mask_and_contract_body(h, kind, block, out, cols, rank, chunk):
    G = torch.randn(out, cols)
    A, B = torch.randn(rank, cols), torch.randn(out, rank)
    data, dense = wire(kind, out, cols, block or (1, 1))
    bo, bi = block or (0, 0)
    dA, dB = contract_driver(h, G, A, B, data, kind, bo, bi, 0.3, chunk, threads=64)
    gm = G.double() * dense.double()
    torch.testing.assert_close(dB.double(), 0.3 * gm @ A.double().t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dA.double(), 0.3 * B.double().t() @ gm, rtol=1e-5, atol=1e-5)


def test_contract_with_one_gradient_only(h):
    G, A, B = torch.randn(20, 11), torch.randn(3, 11), torch.randn(20, 3)
    data, dense = wire(fmt.ELEMENT, 20, 11, (1, 1))
    dB = torch.zeros(20, 3)
    h.contract(G, 0, A, B, data, fmt.ELEMENT, 0, 0, 1.0, torch.empty(0), dB, 64)
    torch.testing.assert_close(dB.double(), (G.double() * dense) @ A.double().t(), rtol=1e-5, atol=1e-5)
    dA = torch.zeros(3, 11)
    h.contract(G, 0, A, B, data, fmt.ELEMENT, 0, 0, 1.0, dA, torch.empty(0), 64)
    torch.testing.assert_close(dA.double(), B.double().t() @ (G.double() * dense), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stat,code", [("grad_abs", 0), ("signed", 1), ("sample_abs", 2), ("sample_sq", 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saliency_accumulate_body(h, stat, code, dtype):
    n = 1 if stat in ("grad_abs", "signed") else 3
    g = torch.randn(n, 6, 17).to(dtype)
    acc0 = torch.randn(6, 17)
    acc = acc0.clone()
    h.accumulate(acc, g, code, 2, 16)      # 2 blocks x 16 threads < 102 entries: grid-strided
    gd = g.double()
    f = {"grad_abs": gd.abs(), "signed": gd, "sample_abs": gd.abs(), "sample_sq": gd.square()}[stat]
    torch.testing.assert_close(acc.double(), acc0.double() + f.sum(0), rtol=1e-6, atol=1e-6)


def test_effective_weight_body_every_block_edge(h):
    """Every (out, cols) up to 9 x 17 with 3 x 5 tiles: no entry missed or written twice wrong."""
    for out, cols in itertools.product((1, 3, 4, 9), (1, 5, 8, 17)):
        w, A, B = torch.randn(out, cols), torch.randn(2, cols), torch.randn(out, 2)
        data, dense = wire(fmt.BLOCK, out, cols, (3, 5))
        got = h.weff(w, A, B, data, fmt.BLOCK, 3, 5, 1.0, [-(-cols // 4), 2], [4])
        want = w.double() + dense.double() * (B.double() @ A.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
