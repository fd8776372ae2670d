"""Property-based: every (backend, device) pair against the reference oracle (issue 15).

Hypothesis draws shapes, ranks, masks of every kind (element at any density, all-on, all-off, blocks of
any size, rows, whole modules on and off), conv geometry (stride, padding, dilation, groups), activation
and adapter dtypes, and checks forward, every gradient and a double backward (a gradient penalty) through
the public ops. Bound (flash-attention style): ``|ours - ref64| <= C·|ref_lowp - ref64| + eps·max|ref64|``,
``ref64`` the reference in fp64 on the same inputs, ``ref_lowp`` the reference in the drawn dtype.
Examples are bounded and derandomised so ``make test`` stays fast and CI reproducible.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spare_kernels as sk
from spare_kernels.backends import registry
from spare_kernels.masks import Mask

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ACT = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
C_EPS = {torch.float64: (4.0, 1e-12), torch.float32: (10.0, 2e-6), torch.bfloat16: (4.0, 8e-3),
         torch.float16: (4.0, 2e-3)}


@st.composite
def masks(draw, shape):
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    kind = draw(st.sampled_from(["none", "element", "element_on", "element_off", "block", "row", "module_on",
                                 "module_off"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    if kind == "none":
        return None
    if kind.startswith("element"):
        p = {"element": draw(st.floats(0.05, 0.95)), "element_on": 1.0, "element_off": 0.0}[kind]
        return Mask.from_dense(torch.rand(shape, generator=g) < p)
    if kind == "block":
        bo, bi = draw(st.integers(1, 16)), draw(st.integers(1, 24))
        tiles = torch.rand(-(-rows // bo), -(-cols // bi), generator=g) < draw(st.floats(0.1, 0.9))
        return Mask("block", shape, tiles, (bo, bi))
    if kind == "row":
        return Mask("row", shape, torch.rand(rows, generator=g) < 0.5)
    return Mask("module", shape, torch.tensor(kind == "module_on"))


@st.composite
def dtypes(draw):
    act = draw(st.sampled_from(ACT))
    adapter = draw(st.sampled_from([act, torch.float32])) if act != torch.float64 else act
    return act, adapter


@st.composite
def linear_cases(draw):
    n, inf, out, r = draw(st.integers(1, 9)), draw(st.integers(1, 40)), draw(st.integers(1, 40)), draw(st.integers(1, 8))
    return dict(layer="linear", shape=(n, inf), wshape=(out, inf), r=r, bias=draw(st.booleans()),
                mask=draw(masks((out, inf))), dt=draw(dtypes()), seed=draw(st.integers(0, 2 ** 16)),
                scale=draw(st.sampled_from([1.0, 0.5, -2.0])))


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    cg, og = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    padding = [draw(st.integers(0, 2)), draw(st.integers(0, 2))]
    dilation = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    min_hw = [dilation[d] * ((kh, kw)[d] - 1) + 1 - 2 * padding[d] for d in range(2)]
    h, w = draw(st.integers(max(1, min_hw[0]), 9)), draw(st.integers(max(1, min_hw[1]), 9))
    wshape = (og * groups, cg, kh, kw)
    return dict(layer="conv", shape=(draw(st.integers(1, 3)), cg * groups, h, w), wshape=wshape,
                r=draw(st.integers(1, 6)), bias=draw(st.booleans()), mask=draw(masks(wshape)), dt=draw(dtypes()),
                seed=draw(st.integers(0, 2 ** 16)), scale=draw(st.sampled_from([1.0, 0.5, -2.0])),
                geo=dict(stride=stride, padding=padding, dilation=dilation, groups=groups))


def _tensors(c, device):
    g = torch.Generator().manual_seed(c["seed"])
    act, ad = c["dt"]
    fan = int(torch.tensor(c["wshape"][1:]).prod())
    x = torch.randn(c["shape"], generator=g)
    W = torch.randn(c["wshape"], generator=g) / fan ** 0.5
    b = torch.randn(c["wshape"][0], generator=g) if c["bias"] else None
    A = torch.randn((c["r"],) + tuple(c["wshape"][1:]), generator=g) / fan ** 0.5
    B = torch.randn(c["wshape"][0], c["r"], generator=g)
    # Round to the drawn dtypes first: every precision sees exactly the same values.
    x, W, b = (None if t is None else t.to(act).to(device) for t in (x, W, b))
    A, B = (t.to(ad).to(device) for t in (A, B))
    return x, W, b, A, B


def _call(c, x, W, b, A, B, mask):
    if c["layer"] == "linear":
        return sk.masked_lora_linear(x, W, b, A, B, mask, c["scale"])
    return sk.masked_lora_conv2d(x, W, b, A, B, mask, c["scale"], **c["geo"])


def _run(c, x, W, b, A, B, mask, double=False):
    """Output, then (dx, dA, dB) of a fixed weighted sum; with ``double``, the gradients of a penalty
    on dL/dx instead."""
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = _call(c, x, W, b, A, B, mask)
    wts = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape).to(y.device, y.dtype)
    if double:
        gx, = torch.autograd.grad((y * wts).pow(2).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
    else:
        y.backward(wts)
    return [y.detach()] + [t.grad for t in (x, A, B)]


def _check(c, backend, device, double=False):
    mask = c["mask"]
    mdev = None if mask is None else mask.to(device)
    x, W, b, A, B = _tensors(c, device)
    got = _run(c, x, W, b, A, B, mdev, double)
    with registry.use_backend("reference"):
        lowp = _run(c, x, W, b, A, B, mdev, double)
        t64 = [None if t is None else t.double() for t in (x, W, b, A, B)]
        ref = _run(c, *t64, mdev, double)
    C, eps = C_EPS[c["dt"][0]]
    if double:   # a penalty squares the values: the bound takes the product of the two passes' errors
        C, eps = C * 4, eps * 8
    for what, o, lp, r in zip(("y", "dx", "dA", "dB"), got, lowp, ref):
        assert o is not None and r is not None, f"{backend}@{device} {what}: missing"
        assert o.shape == r.shape and o.dtype == lp.dtype, f"{backend}@{device} {what}: {o.shape}/{o.dtype}"
        o, lp, r = o.double(), lp.double(), r.double()
        assert torch.isfinite(o).all(), f"{backend}@{device} {what}: non-finite"
        bound = C * (lp - r).abs().max().item() + eps * max(r.abs().max().item(), 1.0)
        err = (o - r).abs().max().item()
        assert err <= bound, f"{backend}@{device} {what}: err {err:.3e} > bound {bound:.3e} ({c})"


@SETTINGS
@given(c=linear_cases())
def test_linear_matches_the_reference(backend_device, c):
    _check(c, *backend_device)


@SETTINGS
@given(c=conv_cases())
def test_conv2d_matches_the_reference(backend_device, c):
    _check(c, *backend_device)


@SETTINGS
@given(c=st.one_of(linear_cases(), conv_cases()).filter(lambda c: c["dt"][0] in (torch.float32, torch.float64)))
def test_double_backward_matches_the_reference(backend_device, c):
    _check(c, *backend_device, double=True)


@st.composite
def saliency_cases(draw):
    conv = draw(st.booleans())
    S = draw(st.integers(1, 4))
    stat = draw(st.sampled_from(sk.STATS))
    dt = draw(st.sampled_from(ACT))
    seed = draw(st.integers(0, 2 ** 16))
    if not conv:
        T, inf, out = draw(st.integers(1, 5)), draw(st.integers(1, 30)), draw(st.integers(1, 30))
        return dict(conv=False, x=(S, T, inf), dy=(S, T, out), stat=stat, dt=dt, seed=seed)
    c = draw(conv_cases())
    n, C, h, w = c["shape"]
    return dict(conv=True, x=(S, C, h, w), wshape=c["wshape"], geo=c["geo"], stat=stat, dt=dt, seed=seed)


@SETTINGS
@given(c=saliency_cases())
def test_saliency_matches_the_reference(backend_device, c):
    backend, device = backend_device
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["x"], generator=g).to(c["dt"]).to(device)
    if c["conv"]:
        geo = c["geo"]
        with torch.no_grad(), registry.use_backend("reference"):
            y = torch.nn.functional.conv2d(x.double(), torch.zeros(c["wshape"], dtype=torch.float64, device=device),
                                           None, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
        dy = torch.randn(y.shape, generator=g).to(c["dt"]).to(device)

        def run(a, b):
            return sk.saliency_conv2d(a, b, c["wshape"], c["stat"], **geo)
    else:
        dy = torch.randn(c["dy"], generator=g).to(c["dt"]).to(device)

        def run(a, b):
            return sk.saliency_linear(a, b, c["stat"])
    got = run(x, dy)
    with registry.use_backend("reference"):
        lowp, ref = run(x, dy), run(x.double(), dy.double())
    C, eps = C_EPS[c["dt"]]
    bound = C * (lowp.double() - ref).abs().max().item() + eps * max(ref.abs().max().item(), 1.0)
    err = (got.double() - ref).abs().max().item()
    assert got.dtype == torch.float32 and err <= bound, f"{backend}@{device}: err {err:.3e} > {bound:.3e} ({c})"
