"""The Triton backend's two paths, each forced (``SPARE_KERNELS_PATH``), against the reference oracle on the
CPU through Triton's interpreter: the composite path (``W_eff`` built once by ``linear._weff_kernel``, vendor
GEMMs / convolutions, ``G`` masked and contracted by ``linear._mask_contract_kernel``) and the fused tiles.
Every mask kind, fp32 / fp16 / bf16 (and fp32 adapters under fp16), odd shapes, ranks 1 / 5 / 16 (and 64),
forward and dx / dA / dB, bounded as the backend's own tests (``conftest.tol_check``); determinism; the
output contract; the path choice's wiring to ``spare_kernels.costmodel.choose_path``."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from spare_kernels import costmodel  # noqa: E402
from spare_kernels import maskfmt as fmt  # noqa: E402
from spare_kernels.backends import reference as R  # noqa: E402
from spare_kernels.backends.triton import conv as TC  # noqa: E402
from spare_kernels.backends.triton import linear as TL  # noqa: E402
from spare_kernels.backends.triton import utils as TU  # noqa: E402
from test_backend_triton import DTYPES, make_mask, run_linear  # noqa: E402
from test_backend_triton_conv import run_conv  # noqa: E402

if not TU.INTERPRET:
    pytest.skip("Triton's interpreter is off (a GPU machine, or TRITON_INTERPRET=0): these tests run the "
                "kernels through it", allow_module_level=True)

NONE, ELEMENT, BLOCK, ROW = fmt.NONE, fmt.ELEMENT, fmt.BLOCK, fmt.ROW
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
PATHS = ("composite", "fused")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("SPARE_KERNELS_PATH", request.param)
    return request.param


# (N, out, in, r, kind, variant, block_o, block_i): out / in off every tile size (interpreter tiles 128,
# GPU 64 / 32), ranks 1 / 5 / 16 / 64, every kind.
LIN = [
    (9, 133, 70, 1, ELEMENT, "random", 0, 0),
    (9, 133, 70, 5, ELEMENT, "random", 0, 0),
    (6, 70, 133, 16, ELEMENT, "random", 0, 0),
    (5, 40, 33, 64, ELEMENT, "random", 0, 0),
    (9, 133, 70, 5, BLOCK, "random", 16, 24),     # blocks misaligned with every tile
    (9, 150, 140, 16, BLOCK, "random", 32, 64),   # dA/dB tiles 32 inside 32×64 blocks
    (9, 133, 70, 5, BLOCK, "zeros", 16, 24),      # no tile listed: zero dA / dB, W_eff = W
    (9, 133, 70, 1, ROW, "random", 0, 0),
    (9, 133, 70, 5, NONE, None, 0, 0),
]


def _lin_id(c):
    return f"N{c[0]}-o{c[1]}-i{c[2]}-r{c[3]}-{fmt.KIND_NAMES[c[4]]}-{c[5]}"


@pytest.mark.parametrize("dts", ["fp32", "fp16", "bf16", "fp16-act-fp32-adapter"])
@pytest.mark.parametrize("case", LIN, ids=_lin_id)
def test_linear_paths(case, dts, path):
    N, out, cols, r, kind, variant, bo, bi = case
    dA, dB = run_linear(N, out, cols, r, kind, variant, bo, bi, DTYPES[dts], seed=N + out + r + kind)[1:]
    if variant == "zeros":
        assert dA.abs().max() == 0 and dB.abs().max() == 0


# (N, C, H, W, out, kh, kw, stride, padding, dilation, groups, r, kind, variant, block_o, block_i)
CONV = [
    (2, 5, 9, 7, 7, 3, 3, 2, 1, 2, 1, 1, ELEMENT, "random", 0, 0),          # stride 2, dilation 2, rank 1
    (2, 6, 5, 7, 9, 2, 3, (1, 2), (0, 1), 1, 3, 5, ELEMENT, "random", 0, 0),  # groups 3, kh≠kw
    (1, 4, 7, 5, 70, 3, 3, 1, 1, 1, 1, 16, ELEMENT, "random", 0, 0),         # out 70
    (2, 5, 9, 7, 7, 1, 1, 1, 0, 1, 1, 5, ELEMENT, "random", 0, 0),           # 1×1
    (2, 5, 9, 7, 7, 3, 3, 1, 1, 1, 1, 5, BLOCK, "random", 3, 5),
    (2, 6, 5, 7, 9, 2, 3, (1, 2), (0, 1), 1, 3, 16, BLOCK, "random", 2, 9),  # blocks straddle groups
    (2, 5, 9, 7, 7, 3, 3, 2, 1, 2, 1, 5, ROW, "random", 0, 0),
    (2, 6, 5, 7, 9, 2, 3, (1, 2), (0, 1), 1, 3, 1, NONE, None, 0, 0),
]


def _conv_id(c):
    return f"N{c[0]}-C{c[1]}-o{c[4]}-k{c[5]}x{c[6]}-g{c[10]}-r{c[11]}-{fmt.KIND_NAMES[c[12]]}"


@pytest.mark.parametrize("dts", ["fp32", "fp16", "bf16", "fp16-act-fp32-adapter"])
@pytest.mark.parametrize("case", CONV, ids=_conv_id)
def test_conv_paths(case, dts, path):
    run_conv(case, DTYPES[dts], seed=case[4] + case[11] + case[12])


# ------------------------------------------------------------------------------------- W_eff build
@pytest.mark.parametrize("dt", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", [ELEMENT, BLOCK], ids=lambda k: fmt.KIND_NAMES[k])
def test_weff_is_the_reference_merged_weight_rounded_once(kind, dt):
    """``build_weff`` = ``(W + s·M⊙(B·A))`` formed in fp32 and rounded once to the activation dtype (the
    reference's merged weight), up to one rounding step where the fp32 dot order differs."""
    g = torch.Generator().manual_seed(kind)
    out, cols, r, s = 150, 133, 5, 0.3
    W = (torch.randn(out, cols, generator=g) / cols ** 0.5).to(dt)
    A, B = torch.randn(r, cols, generator=g) / cols ** 0.5, torch.randn(out, r, generator=g)
    m, dense = make_mask(kind, out, cols, "random", 16, 24, g)
    got = TL.build_weff(W, A, B, m, kind, 16, 24, s, dt)
    want = (W.double() + s * (B.double() @ A.double()) * dense).to(dt)
    assert got.dtype == dt and got.shape == (out, cols)
    eps = torch.finfo(dt).eps
    torch.testing.assert_close(got, want, rtol=eps if dt != F32 else 1e-5, atol=1e-6)
    assert torch.equal(got[~dense], W[~dense])            # off entries are W exactly


def test_weff_past_int32_offsets_is_built_by_torch(monkeypatch):
    g = torch.Generator().manual_seed(3)
    W, A, B = torch.randn(20, 30, generator=g).half(), torch.randn(4, 30, generator=g), torch.randn(20, 4, generator=g)
    m, _ = make_mask(ELEMENT, 20, 30, "random", 0, 0, g)
    kernel = TL.build_weff(W, A, B, m, ELEMENT, 0, 0, 0.5, F16)
    monkeypatch.setattr(TL, "_WEFF_MAX", 600)
    torch_built = TL.build_weff(W, A, B, m, ELEMENT, 0, 0, 0.5, F16)
    assert torch_built.dtype == F16
    torch.testing.assert_close(torch_built, kernel, rtol=torch.finfo(F16).eps, atol=1e-6)


# ------------------------------------------------------------------------------- determinism, contract
@pytest.mark.parametrize("kind", [ELEMENT, BLOCK, ROW], ids=lambda k: fmt.KIND_NAMES[k])
@pytest.mark.parametrize("dt", [F32, BF16], ids=["fp32", "bf16"])
def test_composite_backward_is_bitwise_repeatable(kind, dt, monkeypatch):
    monkeypatch.setenv("SPARE_KERNELS_PATH", "composite")
    g = torch.Generator().manual_seed(5)
    N, out, cols, r = 40, 70, 133, 5
    x, W = torch.randn(N, cols, generator=g).to(dt), torch.randn(out, cols, generator=g).to(dt)
    A, B = torch.randn(r, cols, generator=g), torch.randn(out, r, generator=g)
    dy = torch.randn(N, out, generator=g).to(dt)
    m, _ = make_mask(kind, out, cols, "random", 16, 8, g)
    args = (dy, x, W, A, B, m, kind, 16, 8, 0.3, True, True, True)
    one, two = TL.masked_lora_linear_backward(*args), TL.masked_lora_linear_backward(*args)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    xc, Wc = torch.randn(2, 4, 7, 6, generator=g).to(dt), torch.randn(10, 4, 3, 3, generator=g).to(dt)
    Ac, Bc = torch.randn(r, 4, 3, 3, generator=g), torch.randn(10, r, generator=g)
    dyc = torch.randn(2, 10, 7, 6, generator=g).to(dt)
    mc, _ = make_mask(kind, 10, 36, "random", 4, 6, g)
    cargs = (dyc, xc, Wc, Ac, Bc, mc, kind, 4, 6, 0.3, 1, 1, 1, 1, True, True, True)
    one, two = TC.masked_lora_conv2d_backward(*cargs), TC.masked_lora_conv2d_backward(*cargs)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True)], ids=["dx", "dA", "dB", "dA+dB"])
@pytest.mark.parametrize("kind", [NONE, ELEMENT, BLOCK, ROW], ids=lambda k: fmt.KIND_NAMES[k])
def test_composite_backward_subsets(kind, need, monkeypatch):
    """Only the asked gradients (an empty tensor of the reference's dtype for the others); dA / dB in the
    adapters' dtype (fp32 here) under fp16 activations."""
    monkeypatch.setenv("SPARE_KERNELS_PATH", "composite")
    g = torch.Generator().manual_seed(kind)
    out, cols, r = 30, 40, 4
    x, W = torch.randn(6, cols, generator=g).half(), torch.randn(out, cols, generator=g).half()
    A, B = torch.randn(r, cols, generator=g), torch.randn(out, r, generator=g)
    dy = torch.randn(6, out, generator=g).half()
    m, _ = make_mask(kind, out, cols, "random", 8, 16, g)
    got = TL.masked_lora_linear_backward(dy, x, W, A, B, m, kind, 8, 16, 0.5, *need)
    ref = R.masked_lora_linear_backward(dy, x, W, A, B, m, kind, 8, 16, 0.5, *need)
    for wanted, o, r_, dt in zip(need, got, ref, (torch.float16, torch.float32, torch.float32)):
        if wanted:
            assert o.dtype == dt == r_.dtype and o.shape == r_.shape
            torch.testing.assert_close(o.float(), r_.float(), rtol=2e-2, atol=2e-2)
        else:
            assert o.numel() == 0 and o.dtype == r_.dtype


def test_conv_wgrad_reads_the_16bit_tensors(monkeypatch):
    """The composite conv's G is cuDNN-style 16-bit wgrad on the 16-bit x and dy (no fp32 copies)."""
    monkeypatch.setenv("SPARE_KERNELS_PATH", "composite")
    seen = []
    real = TC.conv2d_weight

    def spy(x, shape, dy, **kw):
        seen.append((x.dtype, dy.dtype))
        return real(x, shape, dy, **kw)

    monkeypatch.setattr(TC, "conv2d_weight", spy)
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(2, 4, 7, 6, generator=g).bfloat16(), torch.randn(10, 4, 3, 3, generator=g).bfloat16()
    A, B = torch.randn(3, 4, 3, 3, generator=g), torch.randn(10, 3, generator=g)
    dy = torch.randn(2, 10, 7, 6, generator=g).bfloat16()
    m, _ = make_mask(ELEMENT, 10, 36, "random", 0, 0, g)
    TC.masked_lora_conv2d_backward(dy, x, W, A, B, m, ELEMENT, 0, 0, 0.5, 1, 1, 1, 1, False, True, True)
    assert seen == [(BF16, BF16)]


# ------------------------------------------------------------------------------------- path choice
@pytest.mark.parametrize("choice", PATHS)
def test_launchers_ask_the_cost_model(choice, monkeypatch):
    """Every launcher asks ``costmodel.choose_path`` with the call's geometry and takes its answer."""
    calls, built = [], []
    monkeypatch.setattr(costmodel, "choose_path", lambda *a, **k: calls.append((a, k)) or choice)
    real = TL.build_weff
    for mod in (TL, TC):
        monkeypatch.setattr(mod, "build_weff", lambda *a, **k: built.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(6, 40, generator=g), torch.randn(30, 40, generator=g)
    A, B, dy = torch.randn(4, 40, generator=g), torch.randn(30, 4, generator=g), torch.randn(6, 30, generator=g)
    m, _ = make_mask(BLOCK, 30, 40, "random", 8, 16, g)
    TL.masked_lora_linear(x, W, None, A, B, m, BLOCK, 8, 16, 0.5)
    TL.masked_lora_linear_backward(dy, x, W, A, B, m, BLOCK, 8, 16, 0.5, True, True, True)
    density = m.float().mean().item()
    for a, k in calls:
        assert a == ("linear", BLOCK, 6, 30, 40, 4) and k["backend"] == "triton" and k["dtype"] == F32
        assert k["density"] == pytest.approx(density)
    assert len(calls) == 2 and len(built) == (2 if choice == "composite" else 0)
    calls.clear()
    xc, Wc = torch.randn(2, 4, 7, 6, generator=g), torch.randn(10, 2, 3, 3, generator=g)   # groups 2
    Ac, Bc = torch.randn(3, 2, 3, 3, generator=g), torch.randn(10, 3, generator=g)
    mc, _ = make_mask(ELEMENT, 10, 18, "random", 0, 0, g)
    y = TC.masked_lora_conv2d(xc, Wc, None, Ac, Bc, mc, ELEMENT, 0, 0, 0.5, 2, 1, 1, 2)
    TC.masked_lora_conv2d_backward(torch.randn(y.shape), xc, Wc, Ac, Bc, mc, ELEMENT, 0, 0, 0.5, 2, 1, 1, 2,
                                   True, True, True)
    # n = N·H'·W', cols = C/g·kh·kw
    assert [a for a, _ in calls] == [("conv2d", ELEMENT, 2 * 4 * 3, 10, 18, 3)] * 2


@pytest.mark.parametrize("kind", [ELEMENT, ROW], ids=lambda k: fmt.KIND_NAMES[k])
def test_composite_ignores_an_enclosing_autocast(kind, monkeypatch):
    """Under an autocast region the composite's torch GEMMs / convs keep the op's own precision (fp32 here),
    as the reference and the fused kernels do."""
    monkeypatch.setenv("SPARE_KERNELS_PATH", "composite")
    g = torch.Generator().manual_seed(4)
    x, W, A, B = (torch.randn(9, 40, generator=g), torch.randn(30, 40, generator=g), torch.randn(4, 40, generator=g),
                  torch.randn(30, 4, generator=g))
    dy = torch.randn(9, 30, generator=g)
    m, _ = make_mask(kind, 30, 40, "random", 0, 0, g)
    args = (m, kind, 0, 0, 0.5)
    plain = TL.masked_lora_linear(x, W, None, A, B, *args), TL.masked_lora_linear_backward(dy, x, W, A, B, *args,
                                                                                             True, True, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = TL.masked_lora_linear(x, W, None, A, B, *args), TL.masked_lora_linear_backward(dy, x, W, A, B, *args,
                                                                                                 True, True, True)
    assert torch.equal(plain[0], under[0]) and all(torch.equal(a, b) for a, b in zip(plain[1], under[1]))
    xc, Wc = torch.randn(2, 4, 7, 6, generator=g), torch.randn(10, 4, 3, 3, generator=g)
    Ac, Bc = torch.randn(3, 4, 3, 3, generator=g), torch.randn(10, 3, generator=g)
    mc, _ = make_mask(kind, 10, 36, "random", 0, 0, g)
    cargs = (mc, kind, 0, 0, 0.5, 1, 1, 1, 1)
    plain = TC.masked_lora_conv2d(xc, Wc, None, Ac, Bc, *cargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = TC.masked_lora_conv2d(xc, Wc, None, Ac, Bc, *cargs)
    assert under.dtype == torch.float32 and torch.equal(plain, under)


def test_cudnn_deterministic_scope_is_shared_by_overlapping_calls():
    """The composite conv wgrad's ``cudnn.deterministic`` scope: overlapping calls (one backward thread per
    device) all run with it on, and the last one out restores the user's setting."""
    import threading
    c = torch.backends.cudnn
    before = c.deterministic
    inside, go, done = [], threading.Event(), threading.Event()

    def other():
        with TC._cudnn_deterministic():
            go.set()
            done.wait(5)
            inside.append(c.deterministic)

    try:
        c.deterministic = False
        t = threading.Thread(target=other)
        t.start()
        go.wait(5)
        with TC._cudnn_deterministic():
            inside.append(c.deterministic)
        inside.append(c.deterministic)      # the other call is still inside: still on
        done.set()
        t.join(5)
        assert inside == [True, True, True] and c.deterministic is False
    finally:
        c.deterministic = before
