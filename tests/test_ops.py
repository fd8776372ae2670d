"""The masked LoRA ops against straightforward PyTorch formulas, on every backend available here."""
import pytest
import torch
import torch.nn.functional as F

import spare_kernels as sk
from spare_kernels.masks import Mask
from conftest import tol_check

LINEAR_SHAPES = [(7, 333, 321), (16, 64, 48), (3, 5, 1)]   # (tokens, in, out)
RANKS = [1, 4, 64]


def make_mask(kind, shape, block=(32, 32)):
    """(Mask-or-tensor-or-None, dense float mask) for a weight shape."""
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    if kind == "none":
        return None, torch.ones(shape)
    if kind == "ones":
        d = torch.ones(shape, dtype=torch.bool)
        return d, d.float()
    if kind == "zeros":
        d = torch.zeros(shape, dtype=torch.bool)
        return Mask.from_dense(d), d.float()
    if kind == "random":
        d = torch.rand(shape) > 0.5
        return Mask.from_dense(d), d.float()
    if kind == "block":
        bo, bi = block
        tiles = torch.rand(-(-rows // bo), -(-cols // bi)) > 0.5
        d = tiles.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:rows, :cols].reshape(shape)
        return Mask.from_dense(d, "block", block), d.float()
    if kind == "row":
        r = torch.rand(rows) > 0.5
        d = r.view(-1, *([1] * (len(shape) - 1))).expand(shape)
        return Mask.from_dense(d, "row"), d.float()
    if kind == "module_on":
        d = torch.ones(shape, dtype=torch.bool)
        return Mask.from_dense(d, "module"), d.float()
    if kind == "module_off":
        d = torch.zeros(shape, dtype=torch.bool)
        return Mask.from_dense(d, "module"), d.float()
    raise ValueError(kind)


MASK_KINDS = ["none", "ones", "zeros", "random", "block", "row", "module_on", "module_off"]


def linear_formula(x, W, b, A, B, Md, s):
    return F.linear(x, W + s * Md.to(W.dtype) * (B.to(W.dtype) @ A.to(W.dtype)), b)


def _linear_case(T, inf, out, r, dtype, adapter_dtype=None, bias=True):
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(2, T, inf, dtype=dtype)
    W = torch.randn(out, inf, dtype=dtype) / inf ** 0.5
    b = torch.randn(out, dtype=dtype) if bias else None
    A = torch.randn(r, inf, dtype=adapter_dtype) / inf ** 0.5
    B = torch.randn(out, r, dtype=adapter_dtype)
    return x, W, b, A, B


def _grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g)


@pytest.mark.parametrize("T,inf,out", LINEAR_SHAPES)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_linear_fp32_against_formula(backend, T, inf, out, r, kind):
    x, W, b, A, B = _linear_case(T, inf, out, r, torch.float32)
    mask, Md = make_mask(kind, (out, inf))
    s = 0.75
    xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
    y = sk.masked_lora_linear(xs, W, b, As, Bs, mask, scale=s)
    assert y.shape == (2, T, out) and y.dtype == torch.float32
    g = torch.randn_like(y)
    got = _grads(y, (xs, As, Bs), g)
    # fp64 truth and the fp32 formula, both through autograd
    ref = [t.double().requires_grad_() for t in (x, A, B)]
    y64 = linear_formula(ref[0], W.double(), b.double(), ref[1], ref[2], Md.double(), s)
    g64 = _grads(y64, ref, g.double())
    low = [t.clone().requires_grad_() for t in (x, A, B)]
    y32 = linear_formula(low[0], W, b, low[1], low[2], Md, s)
    g32 = _grads(y32, low, g)
    tol_check(y, y64, y32, what="y")
    for name, a, a64, a32 in zip(("dx", "dA", "dB"), got, g64, g32):
        tol_check(a, a64, a32, what=name)


@pytest.mark.parametrize("kind", ["none", "random", "block", "row"])
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_linear_bf16_against_formula(backend, kind, adapter_dtype):
    T, inf, out, r = 7, 333, 321, 4
    x, W, b, A, B = _linear_case(T, inf, out, r, torch.bfloat16, adapter_dtype)
    mask, Md = make_mask(kind, (out, inf))
    xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
    y = sk.masked_lora_linear(xs, W, b, As, Bs, mask, scale=0.5)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y)
    got = _grads(y, (xs, As, Bs), g)
    assert got[1].dtype == adapter_dtype and got[2].dtype == adapter_dtype
    ref = [t.double().requires_grad_() for t in (x, A, B)]
    y64 = linear_formula(ref[0], W.double(), b.double(), ref[1], ref[2], Md.double(), 0.5)
    g64 = _grads(y64, ref, g.double())
    low = [t.clone().to(torch.bfloat16).requires_grad_() for t in (x, A, B)]
    ylo = linear_formula(low[0], W, b, low[1], low[2], Md, 0.5)
    glo = _grads(ylo, low, g)
    tol_check(y, y64, ylo, what="y")
    for name, a, a64, alo in zip(("dx", "dA", "dB"), got, g64, glo):
        tol_check(a, a64, alo, what=name)


def test_all_ones_mask_equals_plain_lora(backend):
    x, W, b, A, B = _linear_case(7, 333, 321, 8, torch.float64)
    ones = torch.ones(321, 333, dtype=torch.bool)
    for m in (ones, Mask.from_dense(ones), Mask.from_dense(ones, "block", (16, 64)),
              Mask.from_dense(ones, "row"), Mask.from_dense(ones, "module")):
        ys = [sk.masked_lora_linear(x, W, b, A, B, mm, scale=0.3) for mm in (None, m)]
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-12, atol=1e-12)


def test_all_zero_mask_is_the_base_layer(backend):
    x, W, b, A, B = _linear_case(7, 333, 321, 4, torch.float32)
    A.requires_grad_()
    B.requires_grad_()
    y = sk.masked_lora_linear(x, W, b, A, B, torch.zeros(321, 333, dtype=torch.bool), scale=2.0)
    torch.testing.assert_close(y, F.linear(x, W, b), rtol=1e-5, atol=1e-5)
    dA, dB = torch.autograd.grad(y.sum(), (A, B))
    assert dA.abs().max() == 0 and dB.abs().max() == 0


@pytest.mark.parametrize("kind", ["none", "random", "block", "row", "module_off"])
def test_linear_gradcheck_fp64(backend, kind):
    x, W, b, A, B = _linear_case(3, 11, 9, 2, torch.float64)
    mask, _ = make_mask(kind, (9, 11), block=(4, 4))
    W.requires_grad_()
    b.requires_grad_()

    def f(x, W, b, A, B):
        return sk.masked_lora_linear(x, W, b, A, B, mask, scale=0.7)

    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in (x, W, b, A, B)])


# ---------------------------------------------------------------------------------------- conv2d
CONV_CASES = [
    # (N, C, H, W, out, k, stride, padding, dilation, groups)
    (2, 6, 9, 11, 8, 3, 1, 1, 1, 1),
    (2, 6, 9, 11, 8, 3, 2, 1, 1, 1),
    (1, 6, 13, 10, 9, 3, (2, 1), (0, 2), 2, 3),
    (2, 8, 7, 7, 4, 1, 1, 0, 1, 1),
    (1, 4, 8, 9, 6, (3, 1), 1, (1, 0), 1, 2),
]


def conv_formula(x, W, b, A, B2, Md, s, stride, padding, dilation, groups):
    r = A.shape[0]
    delta = (B2.to(W.dtype) @ A.to(W.dtype).reshape(r, -1)).view(W.shape)
    return F.conv2d(x, W + s * Md.to(W.dtype) * delta, b, stride, padding, dilation, groups)


def _conv_case(case, r, dtype, adapter_dtype=None):
    N, C, H, Wd, out, k, stride, padding, dilation, groups = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(N, C, H, Wd, dtype=dtype)
    W = torch.randn(out, C // groups, kh, kw, dtype=dtype) / (C * kh * kw) ** 0.5
    b = torch.randn(out, dtype=dtype)
    A = torch.randn(r, C // groups, kh, kw, dtype=adapter_dtype or dtype) / (C * kh * kw) ** 0.5
    B = torch.randn(out, r, 1, 1, dtype=adapter_dtype or dtype)
    return x, W, b, A, B, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])) + f"-g{c[-1]}")
@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("kind", ["none", "ones", "zeros", "random", "block", "row"])
def test_conv_fp32_against_formula(backend, case, r, kind):
    x, W, b, A, B, kw = _conv_case(case, r, torch.float32)
    mask, Md = make_mask(kind, tuple(W.shape), block=(4, 8))
    xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
    y = sk.masked_lora_conv2d(xs, W, b, As, Bs, mask, 0.5, **kw)
    g = torch.randn_like(y)
    got = _grads(y, (xs, As, Bs), g)
    ref = [t.double().requires_grad_() for t in (x, A, B)]
    y64 = conv_formula(ref[0], W.double(), b.double(), ref[1], ref[2].view(B.shape[0], r), Md.double(), 0.5, **kw)
    g64 = _grads(y64, ref, g.double())
    low = [t.clone().requires_grad_() for t in (x, A, B)]
    ylo = conv_formula(low[0], W, b, low[1], low[2].view(B.shape[0], r), Md, 0.5, **kw)
    glo = _grads(ylo, low, g)
    tol_check(y, y64, ylo, what="y")
    for name, a, a64, alo in zip(("dx", "dA", "dB"), got, g64, glo):
        tol_check(a, a64, alo, what=name)


@pytest.mark.parametrize("kind", ["none", "random", "row"])
def test_conv_bf16_mixed_precision(backend, kind):
    x, W, b, A, B, kw = _conv_case(CONV_CASES[1], 4, torch.bfloat16, torch.float32)
    mask, Md = make_mask(kind, tuple(W.shape), block=(4, 8))
    xs, As, Bs = (t.clone().requires_grad_() for t in (x, A, B))
    y = sk.masked_lora_conv2d(xs, W, b, As, Bs.view(8, 4), mask, 0.5, **kw)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y)
    got = _grads(y, (xs, As, Bs), g)
    assert got[1].dtype == torch.float32 and got[2].shape == (8, 4, 1, 1)
    ref = [t.double().requires_grad_() for t in (x, A, B)]
    y64 = conv_formula(ref[0], W.double(), b.double(), ref[1], ref[2].view(8, 4), Md.double(), 0.5, **kw)
    g64 = _grads(y64, ref, g.double())
    low = [t.clone().to(torch.bfloat16).requires_grad_() for t in (x, A, B)]
    ylo = conv_formula(low[0], W, b, low[1], low[2].view(8, 4), Md, 0.5, **kw)
    glo = _grads(ylo, low, g)
    tol_check(y, y64, ylo, what="y")
    for name, a, a64, alo in zip(("dx", "dA", "dB"), got, g64, glo):
        tol_check(a, a64, alo, what=name)


@pytest.mark.parametrize("kind", ["none", "random", "block", "row"])
def test_conv_gradcheck_fp64(backend, kind):
    x, W, b, A, B, kw = _conv_case((1, 4, 5, 6, 4, 3, 2, 1, 1, 2), 2, torch.float64)
    mask, _ = make_mask(kind, tuple(W.shape), block=(2, 4))

    def f(x, W, b, A, B):
        return sk.masked_lora_conv2d(x, W, b, A, B, mask, 0.7, **kw)

    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in (x, W, b, A, B)])


def test_conv_padding_strings(backend):
    x, W, b, A, B, _ = _conv_case(CONV_CASES[0], 2, torch.float32)
    y = sk.masked_lora_conv2d(x, W, b, A, B, None, 1.0, padding="same")
    assert y.shape[2:] == x.shape[2:]
    y0 = sk.masked_lora_conv2d(x, W, b, A, B, None, 1.0, padding="valid")
    assert y0.shape[2:] == (x.shape[2] - 2, x.shape[3] - 2)


def test_plain_lora_is_factored_no_out_by_in_tensor(backend):
    """mask=None never forms an out×in tensor: peak extra memory far below one weight (64 MiB)."""
    from spare_kernels.utils import measure_peak
    out = inf = 4096
    x = torch.randn(8, inf, requires_grad=True)
    W = torch.randn(out, inf)
    A = torch.randn(4, inf, requires_grad=True)
    B = torch.randn(out, 4, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # measure_peak sees the calling thread's allocations
    try:
        def step():
            y = sk.masked_lora_linear(x, W, None, A, B, None, 0.5)
            y.backward(torch.ones_like(y))
        _, peak = measure_peak(step)
    finally:
        torch.set_num_threads(threads)
    assert peak < W.numel() * 4 / 16, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("kind", ["element", "block", None])
def test_eager_fast_path_matches_custom_op(kind):
    """Eager calls use an autograd.Function over the same backend impls (or, on the native CPU
    backend, its C++ twin); the custom op (what torch.compile sees) must give bit-identical outputs
    and gradients."""
    from spare_kernels import maskfmt as fmt
    from spare_kernels.ops import masked_lora as ml
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 40, generator=g, requires_grad=True)
    W, b = torch.randn(30, 40, generator=g), torch.randn(30, generator=g)
    A = torch.randn(4, 40, generator=g, requires_grad=True)
    B = torch.randn(30, 4, generator=g, requires_grad=True)
    mask = None if kind is None else Mask.from_dense(torch.rand(30, 40, generator=g) < 0.5, kind) \
        if kind == "element" else Mask("block", (30, 40), torch.rand(2, 3, generator=g) < 0.5, (16, 16))
    data, k, bo, bi = (None, fmt.NONE, 0, 0) if mask is None else mask.wire()
    y1 = sk.masked_lora_linear(x, W, b, A, B, mask, 0.5)
    assert type(y1.grad_fn.next_functions[0][0]).__name__ in ("_LinearFnBackward", "CppFunction")
    y0 = ml._LinearFn.apply(x, W, b, A, B, data, k, bo, bi, 0.5)
    assert type(y0.grad_fn).__name__ == "_LinearFnBackward"
    y2 = ml._linear(x, W, b, A, B, data, k, bo, bi, 0.5)
    assert "_LinearFn" not in type(y2.grad_fn).__name__
    dy = torch.randn_like(y1)
    g2 = torch.autograd.grad(y2, (x, A, B), dy)
    for y in (y0, y1):
        assert torch.equal(y, y2)
        for a, c in zip(torch.autograd.grad(y, (x, A, B), dy), g2):
            assert torch.equal(a, c)
