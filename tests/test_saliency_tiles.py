"""The CUDA backend's per-sample saliency tile kernel (csrc/cuda/saliency_kernels.h), run on the CPU by the
host harness (csrc/harness/saliency.cpp): the block body saliency.cu launches, with a scalar MMA in place of
WMMA, over every (weight tile, sample group) block, then the fixed-order reduction of the group partials.
Against per-sample gradients in fp64 of the same 16-bit values: odd shapes (partial tiles, T not a multiple
of the 32-token chunk or of WMMA's 16), forced sample splits, both statistics, accumulation into acc,
determinism. The WMMA path itself is compiled (tests/test_cuda_compile.py), not yet run on a GPU."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from harness import harness

NO_SPLIT = 1            # target_blocks: one block per tile is enough, so one group
BIG = 1 << 40           # max_partial: no cap


@pytest.fixture(scope="module")
def h():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no host C++ compiler: the harness cannot be built")
    return harness()


def want_linear(x, dy, square):
    g = torch.einsum("sto,sti->soi", dy.double(), x.double())     # per-sample gradients, fp64
    return (g * g if square else g.abs()).sum(0)


def want_conv(x, dy, wshape, stride, padding, dilation, square):
    def one(i):
        return torch.nn.grad.conv2d_weight(x[i:i + 1].double(), wshape, dy[i:i + 1].double(), stride, padding,
                                           dilation)
    g = torch.stack([one(i) for i in range(x.shape[0])])
    return (g * g if square else g.abs()).sum(0)


def close(got, want):
    # fp32 sums of exact products (16-bit × 16-bit fits fp32) in another order than fp64's
    scale = want.abs().max().item() + 1e-30
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6 * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("square", [0, 1])
# IN, OUT multiples of 8 and 16-byte aligned take the 16-byte loads (vec_a / vec_b), the others entry by
# entry; "misaligned" shifts both by one entry so even multiples of 8 take the entry path.
@pytest.mark.parametrize("S,T,IN,OUT", [(3, 5, 70, 37), (4, 33, 17, 65), (2, 77, 40, 24), (5, 1, 9, 130),
                                        (3, 21, 136, 72), (2, 40, 64, 8)], ids=str)
@pytest.mark.parametrize("target", [NO_SPLIT, 1000], ids=["one-group", "split"])
@pytest.mark.parametrize("align", ["aligned", "misaligned"])
def test_linear_tiles(h, dtype, square, S, T, IN, OUT, target, align):
    torch.manual_seed(S * 100 + T)
    x = torch.randn(S, T, IN).to(dtype)
    dy = torch.randn(S, T, OUT).to(dtype)
    if align == "misaligned":
        x, dy = (torch.cat([torch.zeros(1, dtype=dtype), t.flatten()])[1:].view(t.shape) for t in (x, dy))
        assert x.data_ptr() % 16 and dy.data_ptr() % 16
    base = torch.randn(OUT, IN)
    acc = base.clone()
    groups = h.sal_tiles_linear(acc, x, dy, square, target, BIG)
    tiles = -(-OUT // 64) * -(-IN // 64)
    assert groups == (1 if target == NO_SPLIT else min(S, -(-target // tiles)))
    close(acc - base, want_linear(x, dy, square))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("square", [0, 1])
@pytest.mark.parametrize("conv", [((3, 6, 9, 8), (5, 6, 3, 3), (1, 1), (1, 1), (1, 1)),      # 72 pixels: vec_a
                                  ((2, 5, 8, 8), (70, 5, 3, 3), (1, 1), (1, 1), (1, 1)),      # 64 pixels: vec_a
                                  ((2, 7, 11, 9), (70, 7, 3, 2), (2, 1), (1, 0), (2, 3)),
                                  ((4, 3, 6, 6), (9, 3, 1, 1), (1, 1), (0, 0), (1, 1)),
                                  ((3, 4, 4, 3), (5, 4, 3, 3), (1, 1), (0, 0), (1, 1))], ids=str)   # OW = 1
@pytest.mark.parametrize("target", [NO_SPLIT, 1000], ids=["one-group", "split"])
def test_conv_tiles(h, dtype, square, conv, target):
    xs, ws, stride, padding, dilation = conv
    torch.manual_seed(sum(xs))
    x = torch.randn(xs).to(dtype)
    y = F.conv2d(x.float(), torch.zeros(ws), None, stride, padding, dilation)
    dy = torch.randn(y.shape).to(dtype)
    base = torch.randn(ws)
    acc = base.clone()
    groups = h.sal_tiles_conv(acc, x, dy, list(stride), list(padding), list(dilation), square, target, BIG)
    tiles = -(-ws[0] // 64) * -(-(ws[1] * ws[2] * ws[3]) // 64)
    assert groups == (1 if target == NO_SPLIT else min(xs[0], -(-target // tiles)))
    close(acc - base, want_conv(x, dy, ws, stride, padding, dilation, square))


@pytest.mark.parametrize("target", [NO_SPLIT, 1000])
def test_tiles_deterministic(h, target):
    torch.manual_seed(0)
    x = torch.randn(6, 40, 70).bfloat16()
    dy = torch.randn(6, 40, 66).bfloat16()
    runs = []
    for _ in range(2):
        acc = torch.zeros(66, 70)
        h.sal_tiles_linear(acc, x, dy, 0, target, BIG)
        runs.append(acc)
    assert torch.equal(runs[0], runs[1])


def test_split_matches_one_group(h):
    # a split changes only the summation order: equal to fp32 rounding, never a different statistic
    torch.manual_seed(1)
    x = torch.randn(7, 20, 33).half()
    dy = torch.randn(7, 20, 18).half()
    one, split = torch.zeros(18, 33), torch.zeros(18, 33)
    assert h.sal_tiles_linear(one, x, dy, 1, NO_SPLIT, BIG) == 1
    assert h.sal_tiles_linear(split, x, dy, 1, 3, BIG) == 3      # 7 samples: groups of 3, 3, 1
    torch.testing.assert_close(one, split, rtol=1e-6, atol=0)


def test_split_rule(h):
    # (S, tiles, numel, target, max_partial) -> [samples per group, groups]
    assert h.sal_split(8, 25, 320 * 320, 396, BIG) == [1, 8]       # few tiles: one sample per group
    assert h.sal_split(8, 3600, 1280 * 11520, 396, BIG) == [8, 1]  # tiles enough: no partials
    assert h.sal_split(7, 100, 1000, 300, BIG) == [3, 3]           # cdiv(300, 100) = 3 groups of 3, 3, 1
    assert h.sal_split(5, 10, 1000, 1000, BIG) == [1, 5]           # never more groups than samples
    assert h.sal_split(8, 10, 1000, 1000, 2500) == [4, 2]          # partials capped at 2 weights
    assert h.sal_split(8, 10, 1000, 1000, 500) == [8, 1]           # cap below one weight: no split
    for S in range(1, 12):
        for target in (1, 7, 50):
            spg, groups = h.sal_split(S, 3, 100, target, BIG)
            assert (groups - 1) * spg < S <= groups * spg             # no empty group, every sample once


def test_path_rule(h):
    # tiles for the per-sample statistics of 16-bit inputs up to kSalTileMaxTokens tokens per sample
    assert h.sal_use_tiles(77, True) and h.sal_use_tiles(64, True) and h.sal_use_tiles(256, True)
    assert not h.sal_use_tiles(1024, True) and not h.sal_use_tiles(4096, True)
    assert not h.sal_use_tiles(77, False)          # fp32: the ATen path (no TF32 rounding)
    assert not h.sal_use_tiles(1, True)            # rank one: one GEMM of |dy|ᵀ|x|
