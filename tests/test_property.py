"""Property-based: every (backend, device) pair against the reference oracle (issue 15).

Hypothesis draws shapes, ranks, masks of every kind (element at any density, all-on, all-off, blocks of
any size, rows, whole modules on and off), conv geometry (stride, padding, dilation, groups), activation
and adapter dtypes, and checks forward, every gradient and a double backward (a gradient penalty) through
the public ops. The comparison is the self-check's (``spare_kernels.selfcheck``): flash-attention style,
``|ours - ref64| <= C·|ref_lowp - ref64| + eps·max|ref64|``, ``ref64`` the reference in fp64 on the same
inputs, ``ref_lowp`` the reference in the drawn dtype.
Examples are bounded and derandomised so ``make test`` stays fast and CI reproducible.
"""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spare_kernels as sk
from spare_kernels.masks import Mask
from spare_kernels.selfcheck import check_layer, check_saliency

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ACT = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


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


def _check(c, backend, device, double=False):
    for what, err, bnd in check_layer(c, backend, device, double):
        assert err <= bnd, f"{backend}@{device} {what}: err {err:.3e} > bound {bnd:.3e} ({c})"


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
    (_, err, bnd), = check_saliency(c, backend, device)
    assert err <= bnd, f"{backend}@{device}: err {err:.3e} > bound {bnd:.3e} ({c})"


# ----------------------------------------------------------------------------------------- top-k
@st.composite
def topk_cases(draw):
    n = draw(st.integers(1, 4))
    shapes = [tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))) for _ in range(n)]
    dts = [draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])) for _ in range(n)]
    levels = draw(st.sampled_from([1, 2, 4, 1 << 20]))       # few levels: many ties, cut anywhere
    return dict(shapes=shapes, dts=dts, levels=levels, seed=draw(st.integers(0, 2 ** 16)),
                density=draw(st.sampled_from([1e-9, 0.05, 0.3, 0.5, 0.77, 1.0])),
                granularity=draw(st.sampled_from(["element", "block", "row", "module"])),
                scope=draw(st.sampled_from(["global", "per_module"])),
                block=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
                cand=draw(st.sampled_from([0, 32 << 20])), wide=draw(st.sampled_from([0, 16])))


@SETTINGS
@given(c=topk_cases())
def test_native_topk_matches_the_generic_engine(c):
    """The native CPU top-k engine (csrc/cpu/topk.cpp) gives the generic engine's masks bit for bit."""
    import pytest

    from spare_kernels import topk as T
    if T._native_ops({"x": torch.empty(1)}) is None:
        pytest.skip("spare_kernels._C without topk_select")
    g = torch.Generator().manual_seed(c["seed"])
    scale = max(1, c["levels"] >> 10)                          # fp16 keeps the values finite
    scores = {f"s{i}": ((torch.randint(0, c["levels"], s, generator=g) - c["levels"] // 2) / scale).to(dt)
              for i, (s, dt) in enumerate(zip(c["shapes"], c["dts"]))}
    kw = dict(granularity=c["granularity"], scope=c["scope"], block=c["block"])
    saved = T._NATIVE_CAND_BYTES, T._NATIVE_WIDE_GROUPS
    T._NATIVE_CAND_BYTES, T._NATIVE_WIDE_GROUPS = c["cand"], c["wide"]
    try:
        ours = sk.topk_masks(scores, c["density"], **kw)
        T._NATIVE = False
        ref = sk.topk_masks(scores, c["density"], **kw)
    finally:
        T._NATIVE = True
        T._NATIVE_CAND_BYTES, T._NATIVE_WIDE_GROUPS = saved
    for name in ref:
        assert torch.equal(ours[name].data, ref[name].data), (name, c)
