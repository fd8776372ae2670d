"""The CUDA backend's kernels, run on the CPU: their per-thread bodies (csrc/cuda/lora_kernels.h) driven
over small grids by the host harness (csrc/harness/lora.cpp, tests/harness.py), against the reference
formulas. Same bodies, same indexing and arithmetic as on the GPU; the grids are small and odd so every
edge (partial column blocks, grid-strided rows, partial row and rank tiles, chunks starting at a
non-zero row) is crossed. What this cannot run (the ATen host code of lora.cu / saliency.cu and the
launches themselves) is named in docs/backends.md."""
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


def regions(h, kind, data, out, cols, bo, bi, quantum=1, merge_rows=256):
    """What lora.cu's contract_regions gives: the whole weight, or a block mask's runs of on tile rows."""
    if kind != fmt.BLOCK:
        return [(0, out, 0, cols)]
    flat = h.block_regions(data, out, cols, bo, bi, quantum, merge_rows)
    return [tuple(flat[i:i + 4]) for i in range(0, len(flat), 4)]


def contract_driver(h, G, A, B, data, kind, bo, bi, scale, chunk, threads, *, quantum=1, merge_rows=256,
                    reduce=(3, 32), fill=float("nan"), reverse=False, need=("dA", "dB")):
    """What lora.cu's masked_contract does on a GPU: G over the mask's regions, by chunks of rows, one
    contract launch (and one reduction) each, into zero-filled dA / dB."""
    out, cols = G.shape
    dA = torch.zeros(A.shape[0], cols) if "dA" in need else torch.empty(0)
    dB = torch.zeros(out, A.shape[0]) if "dB" in need else torch.empty(0)
    for o0r, o1r, c0, c1 in regions(h, kind, data, out, cols, bo, bi, quantum, merge_rows):
        for o0 in range(o0r, o1r, chunk):
            o1 = min(o1r, o0 + chunk)
            h.contract(G[o0:o1, c0:c1], o0, c0, A, B, data, kind, bo, bi, scale, dA, dB, threads, *reduce, fill,
                       reverse)
    return dA, dB


def want_grads(G, dense, A, B, scale):
    gm = G.double() * dense.double()
    return scale * B.double().t() @ gm, scale * gm @ A.double().t()


@pytest.mark.parametrize("kind,block", [(fmt.ELEMENT, None), (fmt.BLOCK, (4, 8)), (fmt.BLOCK, (16, 3)),
                                        (fmt.BLOCK, (5, 7))])
@pytest.mark.parametrize("out,cols,rank,chunk", [(37, 19, 5, 16), (16, 70, 4, 16), (7, 9, 9, 7), (50, 33, 1, 32),
                                                 (41, 26, 6, 48)])
def test_fused_mask_and_contract_body(h, kind, block, out, cols, rank, chunk):
    G = torch.randn(out, cols)
    A, B = torch.randn(rank, cols), torch.randn(out, rank)
    data, dense = wire(kind, out, cols, block or (1, 1), density=0.3)
    bo, bi = block or (0, 0)
    # merge_rows 1: block masks split into one region per run of on tile rows (skipped rows, column spans)
    for merge in (1, 256):
        dA, dB = contract_driver(h, G, A, B, data, kind, bo, bi, 0.3, chunk, threads=64, merge_rows=merge)
        wA, wB = want_grads(G, dense, A, B, 0.3)
        torch.testing.assert_close(dB.double(), wB, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dA.double(), wA, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,block", [(fmt.ELEMENT, None), (fmt.BLOCK, (4, 9))])
def test_contract_reads_16bit_G(h, gdtype, kind, block):
    """A conv's 16-bit wgrad: G rounded to the activations' dtype, read in fp32 (exactly the reference on the
    rounded G; within the dtype's tolerance of the reference on the fp32 G)."""
    out, cols, rank = 29, 45, 6     # 45 = 5 channels x 3x3: regions in whole channels (quantum 9)
    G = torch.randn(out, cols)
    A, B = torch.randn(rank, cols), torch.randn(out, rank)
    data, dense = wire(kind, out, cols, block or (1, 1), density=0.4)
    bo, bi = block or (0, 0)
    Gr = G.to(gdtype)
    dA, dB = contract_driver(h, Gr, A, B, data, kind, bo, bi, 0.5, 16, threads=64, quantum=9, merge_rows=1)
    wA, wB = want_grads(Gr.double(), dense, A, B, 0.5)
    torch.testing.assert_close(dB.double(), wB, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dA.double(), wA, rtol=1e-5, atol=1e-5)
    fA, fB = want_grads(G, dense, A, B, 0.5)
    torch.testing.assert_close(dA.double(), fA, rtol=tol(gdtype), atol=tol(gdtype) * fA.abs().max().item())
    torch.testing.assert_close(dB.double(), fB, rtol=tol(gdtype), atol=tol(gdtype) * fB.abs().max().item())


def test_contract_with_one_gradient_only(h):
    G, A, B = torch.randn(20, 11), torch.randn(3, 11), torch.randn(20, 3)
    data, dense = wire(fmt.ELEMENT, 20, 11, (1, 1))
    wA, wB = want_grads(G, dense, A, B, 1.0)
    _, dB = contract_driver(h, G, A, B, data, fmt.ELEMENT, 0, 0, 1.0, 20, 64, need=("dB",))
    torch.testing.assert_close(dB.double(), wB, rtol=1e-5, atol=1e-5)
    dA, _ = contract_driver(h, G, A, B, data, fmt.ELEMENT, 0, 0, 1.0, 20, 64, need=("dA",))
    torch.testing.assert_close(dA.double(), wA, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,block", [(fmt.ELEMENT, None), (fmt.BLOCK, (8, 4))])
def test_contract_is_deterministic(h, kind, block):
    """dA / dB bit-identical whatever order the blocks run in (the GPU's freedom; the former dA atomics
    summed in that order) and whatever the scratch held before (every partial is written before it is
    read), over several chunks and rank tiles."""
    out, cols, rank = 70, 53, 7
    G = torch.randn(out, cols)
    A, B = torch.randn(rank, cols), torch.randn(out, rank)
    data, dense = wire(kind, out, cols, block or (1, 1), density=0.5)
    bo, bi = block or (0, 0)
    runs = [contract_driver(h, G, A, B, data, kind, bo, bi, 0.7, 32, 64, merge_rows=1, fill=fill, reverse=rev)
            for fill, rev in ((float("nan"), False), (1e30, True), (-3.0, False))]
    for dA, dB in runs[1:]:
        assert torch.equal(dA, runs[0][0]) and torch.equal(dB, runs[0][1])
    assert torch.isfinite(runs[0][0]).all() and torch.isfinite(runs[0][1]).all()
    wA, wB = want_grads(G, dense, A, B, 0.7)
    torch.testing.assert_close(runs[0][0].double(), wA, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[0][1].double(), wB, rtol=1e-5, atol=1e-5)


def test_contract_step(h):
    """lora.cu's row chunks: each chunk's G and dA partials within the scratch bound, whole row tiles (but
    for the last chunk), the whole region when it fits."""
    threads, rows_tile, ranks_tile, _ = h.contract_tile()
    for rows, gcols, rank, scratch in [(100, 7, 4, 10 ** 6), (1000, 300, 4, 20000), (1000, 300, 64, 60000),
                                       (37, 5000, 2, 100), (5, 3, 1, 1)]:
        step = h.contract_step(rows, gcols, rank, scratch)
        assert 1 <= step <= rows
        if step < rows:
            assert step % rows_tile == 0
            tiles = step // rows_tile
            fits = tiles * rows_tile * gcols <= scratch and tiles * rank * gcols <= scratch
            assert fits or tiles == 1, "a chunk past the scratch bound"
        else:   # one chunk: it fits, or it is a single row tile (the least a launch can take)
            tiles = -(-rows // rows_tile)
            assert tiles * max(rows_tile, rank) * gcols <= scratch or tiles == 1


def test_block_regions(h):
    """Every on tile inside a region; regions in row order, disjoint; off tile rows skipped where the gap
    reaches merge_rows; columns in whole multiples of the quantum; spans as tight as the tiles allow."""
    gen = torch.Generator().manual_seed(0)
    for out, cols, bo, bi, q, merge in [(70, 45, 8, 4, 1, 1), (70, 45, 8, 4, 9, 1), (64, 64, 16, 16, 1, 32),
                                        (33, 27, 5, 6, 3, 11), (9, 10, 3, 3, 1, 1000)]:
        for density in (0.0, 0.15, 0.5, 1.0):
            tiles = torch.rand(-(-out // bo), -(-cols // bi), generator=gen) < density
            dense = fmt.expand(tiles, fmt.BLOCK, bo, bi, out, cols)
            regs = regions(h, fmt.BLOCK, tiles, out, cols, bo, bi, q, merge)
            covered = torch.zeros(out, cols, dtype=torch.bool)
            for i, (o0, o1, c0, c1) in enumerate(regs):
                assert 0 <= o0 < o1 <= out and 0 <= c0 < c1 <= cols
                assert c0 % q == 0 and (c1 % q == 0 or c1 == cols)
                if i:
                    assert o0 - regs[i - 1][1] >= merge, "runs closer than merge_rows not merged"
                assert dense[o0:o0 + 1].any() and dense[o1 - 1:o1].any(), "a region starts or ends on an off row"
                on_cols = dense[o0:o1].any(0).nonzero()
                assert c0 == on_cols.min().item() // q * q and c1 >= on_cols.max().item() + 1
                assert c1 - (on_cols.max().item() + 1) < q or c1 == cols
                covered[o0:o1, c0:c1] = True
            assert not (dense & ~covered).any(), "an on entry outside every region"
            if density == 0.0:
                assert regs == []
            if density == 1.0:
                assert regs == [(0, out, 0, cols)]


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
