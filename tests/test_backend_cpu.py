"""The native CPU backend (csrc/cpu, torch.ops.spare_kernels_cpu) against the reference oracle.

Every op is compared with ``spare_kernels.backends.reference`` on odd shapes, ranks 1 / 4 / 64,
every mask kind, fp32 and bf16 (and bf16 activations with fp32 adapters). The bound is
flash-attention style: ``|ours - ref64| <= C * |ref_lowp - ref64| + eps * max|ref64|`` where
``ref64`` is the reference run in float64 on the same (exactly representable) inputs and
``ref_lowp`` the reference in the test's own dtype.
"""
from __future__ import annotations

import pytest
import torch

from conftest import override_entry

try:
    import spare_kernels._C  # noqa: F401  (registers torch.ops.spare_kernels_cpu)
except ImportError as e:  # only when the extension was not built (SPARE_KERNELS_BUILD_EXT=0, no compiler)
    pytest.skip(f"native extension spare_kernels._C not built ({e})", allow_module_level=True)

from spare_kernels import maskfmt as fmt  # noqa: E402
from spare_kernels.backends import reference as R  # noqa: E402

ops = torch.ops.spare_kernels_cpu
NONE, ELEMENT, BLOCK, ROW = fmt.NONE, fmt.ELEMENT, fmt.BLOCK, fmt.ROW

# (activation dtype, adapter dtype)
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
DT_IDS = ["fp32", "bf16", "bf16-act-fp32-adapter"]


def _tol(dt):
    return (10.0, 1e-6) if dt == torch.float32 else (4.0, 4e-3)


def assert_close(ours, ref_lp, ref64, dt, what):
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == ref_lp.dtype, f"{what}: dtype {ours.dtype} != {ref_lp.dtype}"
    if ours.numel() == 0:
        return
    C, eps = _tol(dt)
    o, lp, r64 = ours.double(), ref_lp.double(), ref64.double()
    assert torch.isfinite(o).all(), f"{what}: non-finite output"
    bound = C * (lp - r64).abs().max().item() + eps * r64.abs().max().item()
    err = (o - r64).abs().max().item()
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e}"


def make_mask(kind, out, cols, variant="random", bo=16, bi=24, gen=None):
    if kind == NONE:
        return None
    if kind == ELEMENT:
        dense = {"random": lambda: torch.rand(out, cols, generator=gen) < 0.5,
                 "ones": lambda: torch.ones(out, cols, dtype=torch.bool),
                 "zeros": lambda: torch.zeros(out, cols, dtype=torch.bool)}[variant]()
        return fmt.pack_bits(dense)
    shape = (-(-out // bo), -(-cols // bi)) if kind == BLOCK else (out,)
    if variant == "zeros":   # an all-off row mask is also how a module-off layer goes to the kernels
        return torch.zeros(shape, dtype=torch.bool)
    return torch.rand(shape, generator=gen) < (0.4 if kind == BLOCK else 0.5)


def _d(t):
    return None if t is None else (t.double() if t.is_floating_point() else t)


# ------------------------------------------------------------------------------------------ linear
LIN_CASES = [
    # (N, out, in, r, kind, variant)
    (7, 321, 333, 4, NONE, None),
    (7, 321, 333, 4, ROW, None),
    (7, 321, 333, 4, ELEMENT, "random"),
    (7, 321, 333, 1, ELEMENT, "random"),
    (5, 70, 45, 64, ELEMENT, "random"),
    (7, 321, 333, 4, ELEMENT, "ones"),
    (7, 321, 333, 4, ELEMENT, "zeros"),
    (3, 700, 1100, 4, ELEMENT, "random"),  # several tiles each way (accumulation across tiles)
    # weights above kWholeTile (256K entries) go through the tiles; smaller ones are one tile
    (6, 520, 600, 4, ELEMENT, "random"),
    (6, 520, 600, 3, ELEMENT, "random"),
    (600, 300, 1000, 4, ELEMENT, "random"),
    (1100, 300, 900, 8, ELEMENT, "random"),
    (600, 90, 1100, 4, ELEMENT, "random"),  # many tokens: the large-tile forward
    (1100, 50, 70, 64, ELEMENT, "random"),  # more tokens: threads split the tokens
    # few tokens (<= 4, rank <= 16): the streamed one-pass path; rank 17 falls back to the tiles
    (1, 321, 333, 4, ELEMENT, "random"),
    (2, 33, 1100, 16, ELEMENT, "random"),
    (4, 70, 45, 1, ELEMENT, "random"),
    (1, 17, 9, 4, ELEMENT, "ones"),
    (4, 70, 45, 17, ELEMENT, "random"),
    (3, 40, 1100, 2, ELEMENT, "random"),
    (7, 100, 333, 8, ELEMENT, "random"),  # ranks 2 and 8 through the tiles
    (6, 50, 200, 2, ELEMENT, "random"),
    (2, 90, 77, 8, ELEMENT, "random"),
    (7, 321, 333, 4, BLOCK, None),
    (5, 70, 45, 64, BLOCK, None),
    (3, 17, 9, 1, BLOCK, None),
    (5, 70, 45, 64, ROW, None),
    (3, 17, 9, 1, NONE, None),
    # row / block: the engine below 128 outputs or columns on one-tile weights, factored otherwise
    (2, 70, 45, 4, ROW, None),          # few tokens: the streamed one-pass path
    (2, 70, 45, 4, BLOCK, None),
    (7, 70, 45, 4, ROW, "zeros"),
    (2, 70, 45, 4, ROW, "zeros"),
    (7, 70, 45, 4, BLOCK, "zeros"),
    (7, 321, 333, 4, ROW, "zeros"),
    (6, 100, 3000, 4, ROW, None),       # above kWholeTile: factored although out < 128
    (6, 100, 3000, 4, BLOCK, None),
    (3, 5, 0, 2, ROW, None),            # no input features: y = bias
]


@pytest.mark.parametrize("dts", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", LIN_CASES, ids=lambda c: f"N{c[0]}-o{c[1]}-i{c[2]}-r{c[3]}-k{c[4]}-{c[5]}")
def test_linear(case, dts):
    N, out, cols, r, kind, variant = case
    dt, adt = dts
    g = torch.Generator().manual_seed(N * 1000 + out + kind)
    x = torch.randn(N, cols, generator=g).to(dt)
    W = (torch.randn(out, cols, generator=g) / cols ** 0.5).to(dt)
    b = torch.randn(out, generator=g).to(dt)
    A = (torch.randn(r, cols, generator=g) / cols ** 0.5).to(adt)
    B = torch.randn(out, r, generator=g).to(adt)
    dy = torch.randn(N, out, generator=g).to(dt)
    m = make_mask(kind, out, cols, variant, gen=g)
    s = 0.7
    args = (m, kind, 16, 24, s)
    y = ops.masked_lora_linear(x, W, b, A, B, *args)
    y_lp = R.masked_lora_linear(x, W, b, A, B, *args)
    y64 = R.masked_lora_linear(_d(x), _d(W), _d(b), _d(A), _d(B), *args)
    assert_close(y, y_lp, y64, dt, "y")
    got = ops.masked_lora_linear_backward(dy, x, W, A, B, *args, True, True, True)
    lp = R.masked_lora_linear_backward(dy, x, W, A, B, *args, True, True, True)
    r64 = R.masked_lora_linear_backward(_d(dy), _d(x), _d(W), _d(A), _d(B), *args, True, True, True)
    for name, o, l_, h in zip(("dx", "dA", "dB"), got, lp, r64):
        assert_close(o, l_, h, dt, name)
    if variant == "zeros" and kind != NONE:
        assert got[1].abs().max() == 0 and got[2].abs().max() == 0


# Row / block masks on weights under 128 outputs or columns take the engine, larger ones stay factored.
@pytest.mark.parametrize("size", [(30, 40), (130, 140)], ids=["engine", "factored"])
@pytest.mark.parametrize("tokens", [6, 2])
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)])
@pytest.mark.parametrize("kind", [NONE, ELEMENT, BLOCK, ROW])
def test_linear_backward_subsets(kind, need, tokens, size):
    out, cols = size
    g = torch.Generator().manual_seed(kind)
    x, W = torch.randn(tokens, cols, generator=g), torch.randn(out, cols, generator=g)
    A, B, dy = torch.randn(4, cols, generator=g), torch.randn(out, 4, generator=g), torch.randn(tokens, out, generator=g)
    m = make_mask(kind, out, cols, "random", gen=g)
    got = ops.masked_lora_linear_backward(dy, x, W, A, B, m, kind, 16, 24, 0.5, *need)
    ref = R.masked_lora_linear_backward(dy, x, W, A, B, m, kind, 16, 24, 0.5, *need)
    for wanted, o, r_ in zip(need, got, ref):
        if wanted:
            torch.testing.assert_close(o, r_, rtol=1e-4, atol=1e-5)
        else:
            assert o.numel() == 0


# -------------------------------------------------------------------------------------------- conv
CONV_CASES = [
    # (N, C, H, out, k, stride, pad, dil, groups, r)
    (2, 6, 9, 8, 3, 2, 1, 1, 2, 4),     # stride 2, groups 2
    (3, 5, 4, 7, 1, 1, 0, 1, 1, 1),     # 1x1 shortcut path
    (2, 4, 7, 6, 3, 1, 2, 2, 1, 64),    # dilation, padding, rank 64
    (2, 6, 5, 9, 1, 1, 0, 1, 3, 4),     # 1x1, groups 3
    (1, 3, 8, 5, 1, 2, 0, 1, 1, 2),     # 1x1 stride 2 (im2col path)
    (2, 7, 6, 5, 3, 1, 1, 1, 1, 4),     # 3x3 "same"
    (2, 16, 6, 130, 3, 1, 1, 1, 1, 4),   # one tile, >= 128 outputs and columns: row / block factored
    (2, 16, 6, 130, 3, 1, 1, 1, 1, 64),  # ... block through im2col pieces (rank too high to stack)
    (1, 32, 5, 260, 3, 1, 1, 1, 2, 4),   # ... per group (og 130, colsK 144)
    (1, 300, 6, 100, 3, 1, 1, 1, 1, 4),  # weight above kWholeTile: the tiled im2col engine
    (1, 600, 5, 200, 3, 2, 1, 1, 2, 3),  # ... grouped, strided, odd rank
]
KINDS = [(NONE, None), (ELEMENT, "random"), (ELEMENT, "ones"), (ELEMENT, "zeros"), (BLOCK, None), (ROW, None),
         (BLOCK, "zeros"), (ROW, "zeros")]


@pytest.mark.parametrize("dts", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("kv", KINDS, ids=lambda k: f"k{k[0]}-{k[1]}")
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv2d(case, kv, dts):
    N, C, H, o, k, st, p, d, grp, r = case
    kind, variant = kv
    dt, adt = dts
    g = torch.Generator().manual_seed(sum(case) + kind)
    cg = C // grp
    x = torch.randn(N, C, H, H, generator=g).to(dt)
    W = (torch.randn(o, cg, k, k, generator=g) / (cg * k * k) ** 0.5).to(dt)
    b = torch.randn(o, generator=g).to(dt)
    A = (torch.randn(r, cg, k, k, generator=g) / (cg * k * k) ** 0.5).to(adt)
    B = torch.randn(o, r, generator=g).to(adt)
    m = make_mask(kind, o, cg * k * k, variant, bo=4, bi=5, gen=g)
    geo = ([st, st], [p, p], [d, d], grp)
    args = (m, kind, 4, 5, 0.7) + geo
    y = ops.masked_lora_conv2d(x, W, b, A, B, *args)
    y_lp = R.masked_lora_conv2d(x, W, b, A, B, *args)
    y64 = R.masked_lora_conv2d(_d(x), _d(W), _d(b), _d(A), _d(B), *args)
    assert_close(y, y_lp, y64, dt, "y")
    dy = torch.randn(y64.shape, generator=g).to(dt)
    got = ops.masked_lora_conv2d_backward(dy, x, W, A, B, *args, True, True, True)
    lp = R.masked_lora_conv2d_backward(dy, x, W, A, B, *args, True, True, True)
    r64 = R.masked_lora_conv2d_backward(_d(dy), _d(x), _d(W), _d(A), _d(B), *args, True, True, True)
    for name, o_, l_, h in zip(("dx", "dA", "dB"), got, lp, r64):
        assert_close(o_, l_, h, dt, name)


@pytest.mark.parametrize("out", [30, 130], ids=["engine", "factored"])
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True)])
@pytest.mark.parametrize("kind", [NONE, ELEMENT, BLOCK, ROW])
def test_conv2d_backward_subsets(kind, need, out):
    g = torch.Generator().manual_seed(kind)
    x, W = torch.randn(2, 16, 6, 6, generator=g), torch.randn(out, 16, 3, 3, generator=g) / 12
    A, B = torch.randn(4, 16, 3, 3, generator=g) / 12, torch.randn(out, 4, generator=g)
    dy = torch.randn(2, out, 6, 6, generator=g)
    m = make_mask(kind, out, 144, "random", bo=16, bi=24, gen=g)
    args = (m, kind, 16, 24, 0.5, [1, 1], [1, 1], [1, 1], 1, *need)
    got = ops.masked_lora_conv2d_backward(dy, x, W, A, B, *args)
    ref = R.masked_lora_conv2d_backward(dy, x, W, A, B, *args)
    for wanted, o, r_ in zip(need, got, ref):
        if wanted:
            torch.testing.assert_close(o, r_, rtol=1e-4, atol=1e-4)
        else:
            assert o.numel() == 0


@pytest.mark.parametrize("r", [4, 64])  # block: r=4 takes the stacked-conv path, r=64 the im2col one
@pytest.mark.parametrize("kind", [ELEMENT, BLOCK])
def test_conv2d_chunked(kind, r):
    """An input whose unfolding exceeds one chunk: several im2col chunks per sample (element: a weight
    above kWholeTile, through the tiled engine; block: 128 outputs, factored)."""
    out = 480 if kind == ELEMENT else 128
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 48, 48, generator=g)
    W = torch.randn(out, 64, 3, 3, generator=g) / 24
    A, B = torch.randn(r, 64, 3, 3, generator=g) / 24, torch.randn(out, r, generator=g) / r ** 0.5
    m = make_mask(kind, out, 576, "random", bo=8, bi=32, gen=g)
    args = (m, kind, 8, 32, 0.5, [1, 1], [1, 1], [1, 1], 1)
    torch.testing.assert_close(ops.masked_lora_conv2d(x, W, None, A, B, *args),
                               R.masked_lora_conv2d(x, W, None, A, B, *args), rtol=1e-4, atol=1e-4)
    dy = torch.randn(2, out, 48, 48, generator=g)
    for o, r_ in zip(ops.masked_lora_conv2d_backward(dy, x, W, A, B, *args, True, True, True),
                     R.masked_lora_conv2d_backward(dy, x, W, A, B, *args, True, True, True)):
        torch.testing.assert_close(o, r_, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------------- saliency
STATS = ["grad_abs", "signed", "sample_abs", "sample_sq"]


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 1, 333, 321), (2, 7, 45, 700), (4, 5, 9, 3), (1, 1, 16, 8)],
                         ids=lambda s: "S{}-T{}-i{}-o{}".format(*s))
@pytest.mark.parametrize("stat", STATS)
def test_saliency_linear(stat, shape, dt):
    S, T, i, o = shape
    g = torch.Generator().manual_seed(S * T + i)
    x, dy = torch.randn(S, T, i, generator=g).to(dt), torch.randn(S, T, o, generator=g).to(dt)
    a0 = torch.randn(o, i, generator=g)
    ours, ref = a0.clone(), a0.clone()
    ops.saliency_linear(ours, x, dy, stat)
    R.saliency_linear(ref, x, dy, stat)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * (ref - a0).abs().max().item())
    assert not torch.equal(ours, a0) or stat == "signed"


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [(2, 6, 9, 8, 3, 2, 1, 1, 2), (3, 5, 1, 7, 1, 1, 0, 1, 1), (2, 5, 6, 7, 1, 1, 0, 1, 1),
                                  (2, 4, 7, 6, 3, 1, 2, 2, 1)], ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("stat", STATS)
def test_saliency_conv2d(stat, case, dt):
    S, C, H, o, k, st, p, d, grp = case
    g = torch.Generator().manual_seed(sum(case))
    x = torch.randn(S, C, H, H, generator=g).to(dt)
    w = torch.randn(o, C // grp, k, k, generator=g)
    dy = torch.randn(torch.nn.functional.conv2d(x.float(), w, None, st, p, d, grp).shape, generator=g).to(dt)
    a0 = torch.randn_like(w)
    ours, ref = a0.clone(), a0.clone()
    geo = ([st, st], [p, p], [d, d], grp)
    ops.saliency_conv2d(ours, x, dy, stat, *geo)
    R.saliency_conv2d(ref, x, dy, stat, *geo)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * (ref - a0).abs().max().item())


# -------------------------------------------------------------------------------------- bad inputs
def test_errors():
    x, W = torch.randn(4, 10), torch.randn(6, 10)
    A, B = torch.randn(2, 10), torch.randn(6, 2)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.masked_lora_linear(x.half(), W.half(), None, A, B, None, NONE, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="element mask"):
        ops.masked_lora_linear(x, W, None, A, B, torch.zeros(6, 1, dtype=torch.uint8), ELEMENT, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="row mask must be bool"):
        ops.masked_lora_linear(x, W, None, A, B, torch.ones(6), ROW, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="block mask must be bool"):
        ops.masked_lora_linear(x, W, None, A, B, torch.ones(2, 1, dtype=torch.uint8), BLOCK, 4, 16, 1.0)
    with pytest.raises(RuntimeError, match="unknown mask kind"):
        ops.masked_lora_linear(x, W, None, A, B, None, 7, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="stat"):
        ops.saliency_linear(torch.zeros(6, 10), x[None], torch.randn(1, 4, 6), "nope")
    with pytest.raises(RuntimeError, match="lora_B"):
        ops.masked_lora_linear(x, W, None, A, B[:5], None, NONE, 0, 0, 1.0)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", ["none", "element", "block", "row"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_cpp_autograd_twin_matches_the_function(layer, kind, with_bias):
    """Eager CPU calls with frozen weights take the C++ autograd twins (csrc/cpu/autograd.cpp): the same
    kernels as the Python Function, so the same bits forward and backward, for each subset of grads
    (with and without the optional bias and mask, which shift autograd's input numbering)."""
    from spare_kernels.masks import topk_masks
    from spare_kernels.ops import masked_lora as ML
    import spare_kernels as sk

    g = torch.Generator().manual_seed(0)
    if layer == "linear":
        x, W, A, B = (torch.randn(s, generator=g) for s in ((2, 5, 40), (36, 40), (4, 40), (36, 4)))
    else:
        x, W, A, B = (torch.randn(s, generator=g) for s in ((2, 6, 9, 9), (10, 6, 3, 3), (4, 6, 3, 3), (10, 4, 1, 1)))
    b = torch.randn(W.shape[0], generator=g) if with_bias else None
    mask = None if kind == "none" else topk_masks({"w": torch.rand(W.shape, generator=g)}, 0.5, kind, block=(8, 8))["w"]

    def call(native, need):
        xs, As, Bs = (t.clone().requires_grad_(n) for t, n in zip((x, A, B), need))
        if native:
            y = sk.masked_lora_linear(xs, W, b, As, Bs, mask, 0.7) if layer == "linear" else \
                sk.masked_lora_conv2d(xs, W, b, As, Bs, mask, 0.7, padding=1, stride=(2, 1))
        else:
            wire = mask.wire() if mask is not None else (None, fmt.NONE, 0, 0)
            if layer == "linear":
                y = ML._LinearFn.apply(xs.reshape(-1, 40), W, b, As, Bs, *wire, 0.7).view(2, 5, 36)
            else:
                y = ML._ConvFn.apply(xs, W, b, As, Bs.reshape(10, 4), *wire, 0.7, [2, 1], [1, 1], [1, 1], 1)
        if any(need):
            y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        return y, [t.grad for t in (xs, As, Bs)], y.grad_fn

    for need in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
        (y0, g0, fn0), (y1, g1, fn1) = call(False, need), call(True, need)
        if fn1 is not None:
            node = lambda f: f.next_functions[0][0] if "View" in f.name() else f   # noqa: E731
            assert "CppNode" in node(fn1).name() and "FnBackward" in node(fn0).name()
        assert torch.equal(y0, y1)
        for a, c in zip(g0, g1):
            assert (a is None) == (c is None) and (a is None or torch.equal(a, c))
    with torch.no_grad():
        assert torch.equal(call(False, (False,) * 3)[0], call(True, (False,) * 3)[0])


def test_cpp_autograd_twin_only_with_the_native_backward(monkeypatch):
    """An override of the registered CPU backward keeps the Python Function (the twin would skip it)."""
    import spare_kernels as sk
    from spare_kernels.backends import registry

    native = registry.entries()[("masked_lora_linear_backward", "cpu")].fn
    calls = []

    def spy(*a):
        calls.append(1)
        return native(*a)
    override_entry(monkeypatch, "masked_lora_linear_backward", "cpu", fn=spy, autograd_twin=None)
    x = torch.randn(3, 8, requires_grad=True)
    y = sk.masked_lora_linear(x, torch.randn(4, 8), None, torch.randn(2, 8, requires_grad=True), torch.randn(4, 2))
    assert "CppNode" not in y.grad_fn.name()
    y.sum().backward()
    assert calls == [1]
