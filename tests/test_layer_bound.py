"""The layer-table paths of issue 29 against a float64 dense reference: the fast mask packer, a per-call
bool/uint8 mask, and forward + backward of every mask kind on few-token and SD-1.5-like Linear shapes."""
from __future__ import annotations

import pytest
import torch

from spare_kernels import Mask, masked_lora_linear
from spare_kernels import maskfmt as fmt


def test_gather_constant_packs_every_byte():
    # the multiply-and-take-the-top-byte packer is exact for all 256 patterns of eight 0/1 bytes
    a = torch.arange(256)
    bits = ((a[:, None] >> torch.arange(8)) & 1).to(torch.bool)
    assert torch.equal(fmt.pack_bits(bits.reshape(1, 256 * 8)).reshape(256).long(), a)


@pytest.mark.parametrize("shape", [(3, 5), (7, 13), (64, 64), (5, 1), (0, 8), (4, 0), (33, 200)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_pack_bits_matches_bit_planes(shape, dtype):
    g = torch.Generator().manual_seed(0)
    d = torch.rand(*shape, generator=g) < 0.5
    if dtype == torch.uint8:   # any nonzero byte is on
        d = d.to(torch.uint8) * torch.randint(1, 255, shape, generator=g, dtype=torch.uint8)
    ref = fmt._pack_planes(d)
    for v in (d, d.t().contiguous().t(), torch.cat([d, d], 1)[:, : shape[1]]):   # contiguous, transposed, sliced
        got = fmt.pack_bits(v)
        assert got.dtype == torch.uint8 and torch.equal(got, ref)


def _ref(x, W, b, A, B, dense, s):
    x, W, b, A, B = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, W, b, A, B))
    d = B @ A if dense is None else (B @ A) * dense.double()
    y = x @ (W + s * d).t() + b
    return y, (x, A, B)


# (tokens, in, out): few tokens (engine's streamed kernel), one tile, tiled, token split, factored sizes
SHAPES = [(1, 320, 96), (3, 160, 48), (16, 128, 80), (77, 96, 320), (40, 520, 136), (1100, 48, 40)]


@pytest.mark.parametrize("n,i,o", SHAPES)
@pytest.mark.parametrize("kind", ["none", "element", "bool", "uint8", "block", "row"])
def test_linear_forward_backward(n, i, o, kind):
    g = torch.Generator().manual_seed(n + i + o)
    x = torch.randn(n, i, generator=g).requires_grad_()
    W, b = torch.randn(o, i, generator=g) / i ** 0.5, torch.randn(o, generator=g)
    A = (torch.randn(4, i, generator=g) / i ** 0.5).requires_grad_()
    B = torch.randn(o, 4, generator=g).requires_grad_()
    s = 0.7
    dense = None
    if kind in ("element", "bool", "uint8"):
        dense = torch.rand(o, i, generator=g) < 0.5
        mask = {"element": Mask.from_dense(dense), "bool": dense, "uint8": dense.to(torch.uint8) * 3}[kind]
    elif kind == "block":
        tiles = torch.rand(-(-o // 32), -(-i // 32), generator=g) < 0.3
        mask = Mask("block", W.shape, tiles, (32, 32))
        dense = tiles.repeat_interleave(32, 0).repeat_interleave(32, 1)[:o, :i]
    elif kind == "row":
        on = torch.rand(o, generator=g) < 0.5
        mask = Mask("row", W.shape, on)
        dense = on[:, None].expand(o, i)
    else:
        mask = None
    y = masked_lora_linear(x, W, b, A, B, mask, s)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    yr, (xr, Ar, Br) = _ref(x, W, b, A, B, dense, s)
    yr.backward(dy.double())
    for got, want, name in ((y, yr, "y"), (x.grad, xr.grad, "dx"), (A.grad, Ar.grad, "dA"), (B.grad, Br.grad, "dB")):
        tol = 1e-4 * max(1.0, want.abs().max().item())
        assert (got.double() - want).abs().max().item() <= tol, name


def test_pack_bits_of_a_single_row_column_slice():
    # (1, 16) cut from a (4, 25) mask: "contiguous" to torch with a row stride int64 views refuse
    from spare_kernels import maskfmt as fmt
    g = torch.Generator().manual_seed(0)
    full = torch.rand(4, 25, generator=g) > 0.5
    for m in (full[:1, :16], full[2:3, 8:24], full[:1, :25]):
        assert torch.equal(fmt.pack_bits(m), fmt._pack_planes(m))
        assert torch.equal(fmt.pack_bits(m.to(torch.uint8) * 3), fmt._pack_planes(m))


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_a_per_call_mask_of_a_weight_with_no_outputs(dtype):
    import spare_kernels as sk
    x, A = torch.randn(3, 8), torch.randn(2, 8)
    y = sk.masked_lora_linear(x, torch.randn(0, 8), None, A, torch.randn(0, 2), torch.zeros(0, 8, dtype=dtype), 1.0)
    assert y.shape == (3, 0)
