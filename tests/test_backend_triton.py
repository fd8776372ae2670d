"""The Triton backend (spare_kernels/backends/triton) against the reference oracle, on the CPU through
Triton's interpreter, plus one ahead-of-time compile for sm_80 / sm_90.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` when there is no GPU, before any Triton kernel module
is imported (``@triton.jit`` picks interpreted or compiled at decoration time); without the interpreter
(a GPU machine, or ``TRITON_INTERPRET=0``) these tests skip. Every output and gradient is bounded flash-attention style
(``conftest.tol_check``): its error against the reference run in float64 is at most 4x the error of the
straightforward formula run in the test's own dtype, plus a floor of 8 eps of the dtype. bf16 runs through
the kernels' interpreter emulation (``utils.bf16_emulated``: bf16 tiles carried as fp32 after rounding,
since numpy holds bf16 as raw uint16), against the same bf16-scaled bound.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from conftest import tol_check  # noqa: E402
from spare_kernels import maskfmt as fmt  # noqa: E402
from spare_kernels.backends import reference as R  # noqa: E402
from spare_kernels.backends.triton import linear as TL  # noqa: E402
from spare_kernels.backends.triton import saliency as TS  # noqa: E402
from spare_kernels.backends.triton import utils as TU  # noqa: E402

if not TU.INTERPRET:
    pytest.skip("Triton's interpreter is off (a GPU machine, or TRITON_INTERPRET=0): these tests run the "
                "kernels through it", allow_module_level=True)

NONE, ELEMENT, BLOCK, ROW = fmt.NONE, fmt.ELEMENT, fmt.BLOCK, fmt.ROW
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (activation dtype, adapter dtype)
DTYPES = {"fp32": (F32, F32), "fp16": (F16, F16), "fp16-act-fp32-adapter": (F16, F32), "bf16": (BF16, BF16)}


def make_mask(kind, out, cols, variant, bo, bi, gen):
    """Wire mask data and its dense bool form (None for NONE)."""
    if kind == NONE:
        return None, None
    if kind == ELEMENT:
        dense = {"random": lambda: torch.rand(out, cols, generator=gen) < 0.5,
                 "ones": lambda: torch.ones(out, cols, dtype=torch.bool),
                 "zeros": lambda: torch.zeros(out, cols, dtype=torch.bool)}[variant]()
        return fmt.pack_bits(dense), dense
    shape = (-(-out // bo), -(-cols // bi)) if kind == BLOCK else (out,)
    data = {"random": lambda: torch.rand(shape, generator=gen) < 0.4,
            "ones": lambda: torch.ones(shape, dtype=torch.bool),
            "zeros": lambda: torch.zeros(shape, dtype=torch.bool)}[variant]()
    return data, fmt.expand(data, kind, bo, bi, out, cols)


def straightforward(x, W, b, A, B, dense, s, dy):
    """The dense formula in the activation dtype throughout: the low-precision yardstick of tol_check."""
    dt = x.dtype
    m = torch.ones(W.shape, dtype=dt) if dense is None else dense.to(dt)
    w_eff = W + (s * (B.to(dt) @ A.to(dt))) * m
    y = x @ w_eff.t() + (0 if b is None else b)
    gm = (dy.t() @ x) * m
    return y, (dy @ w_eff, (s * (B.to(dt).t() @ gm)).to(A.dtype), (s * (gm @ A.to(dt).t())).to(B.dtype))


def _d(t):
    return None if t is None else (t.double() if t.is_floating_point() else t)


def run_linear(N, out, cols, r, kind, variant, bo, bi, dts, seed, bias=True, s=0.7):
    dt, adt = dts
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, cols, generator=g).to(dt)
    W = (torch.randn(out, cols, generator=g) / max(cols, 1) ** 0.5).to(dt)
    b = torch.randn(out, generator=g).to(dt) if bias else None
    A = (torch.randn(r, cols, generator=g) / max(cols, 1) ** 0.5).to(adt)
    B = torch.randn(out, r, generator=g).to(adt)
    dy = torch.randn(N, out, generator=g).to(dt)
    m, dense = make_mask(kind, out, cols, variant, bo, bi, g)
    args = (m, kind, bo, bi, s)
    y = TL.masked_lora_linear(x, W, b, A, B, *args)
    grads = TL.masked_lora_linear_backward(dy, x, W, A, B, *args, True, True, True)
    y64 = R.masked_lora_linear(_d(x), _d(W), _d(b), _d(A), _d(B), *args)
    g64 = R.masked_lora_linear_backward(_d(dy), _d(x), _d(W), _d(A), _d(B), *args, True, True, True)
    y_lp, g_lp = straightforward(x, W, b, A, B, dense, s, dy)
    ref_dtypes = (dt, adt, adt)
    assert y.dtype == dt and y.shape == (N, out)
    tol_check(y, y64, y_lp, what="y")
    for name, o, h, lp, rdt in zip(("dx", "dA", "dB"), grads, g64, g_lp, ref_dtypes):
        assert o.dtype == rdt and o.shape == h.shape, f"{name}: {o.dtype} {tuple(o.shape)}"
        tol_check(o, h, lp, what=name)
    return grads


# ------------------------------------------------------------------------------------------ linear
LIN_CASES = [
    # (N, out, in, r, kind, variant, block_o, block_i)
    (7, 321, 333, 3, ELEMENT, "random", 0, 0),
    (7, 321, 333, 1, ELEMENT, "random", 0, 0),
    (5, 70, 45, 64, ELEMENT, "random", 0, 0),     # rank 64: four rank chunks, the chunk loop
    (7, 64, 48, 32, ELEMENT, "random", 0, 0),     # rank 32: two unrolled chunks
    (7, 100, 90, 16, ELEMENT, "random", 0, 0),
    (7, 321, 333, 3, ELEMENT, "ones", 0, 0),      # all on = plain LoRA
    (7, 321, 333, 3, ELEMENT, "zeros", 0, 0),     # all off = W alone, zero dA / dB
    (7, 321, 333, 4, BLOCK, "random", 16, 24),    # blocks smaller than / misaligned with every tile
    (7, 300, 260, 4, BLOCK, "random", 128, 128),  # blocks = the tiles (forward, dx, dA/dB): exact skipping
    (7, 300, 260, 16, BLOCK, "random", 32, 64),   # dA/dB tiles 32 inside 32×64 blocks
    (7, 321, 333, 4, BLOCK, "zeros", 16, 24),     # no tile launched for dA/dB
    (7, 321, 333, 4, BLOCK, "ones", 16, 24),
    (7, 321, 333, 4, ROW, "random", 0, 0),
    (7, 321, 333, 4, ROW, "zeros", 0, 0),
    (7, 321, 333, 4, NONE, None, 0, 0),
    (5, 40, 33, 64, NONE, None, 0, 0),
    (3, 40, 33, 64, ROW, "random", 0, 0),
    (3, 40, 33, 64, BLOCK, "random", 8, 8),
    # one token, tiny input widths
    (1, 17, 1, 1, ELEMENT, "random", 0, 0),
    (1, 17, 9, 3, ELEMENT, "random", 0, 0),
    (1, 5, 17, 3, BLOCK, "random", 2, 5),
    (1, 9, 8, 2, ROW, "random", 0, 0),
    (1, 9, 16, 2, NONE, None, 0, 0),
]


def _case_id(c):
    return f"N{c[0]}-o{c[1]}-i{c[2]}-r{c[3]}-{fmt.KIND_NAMES[c[4]]}-{c[5]}" + (f"-b{c[6]}x{c[7]}" if c[4] == BLOCK else "")


# A subset for the mixed dtypes (fp32 adapters under fp16 activations, bf16): every kind, ranks 3 and 64,
# blocks aligned and not, one token.
MIXED_CASES = [LIN_CASES[i] for i in (0, 2, 7, 8, 12, 14, 19)]


@pytest.mark.parametrize("dts", ["fp32", "fp16"])
@pytest.mark.parametrize("case", LIN_CASES, ids=_case_id)
def test_linear(case, dts):
    N, out, cols, r, kind, variant, bo, bi = case
    dA, dB = run_linear(N, out, cols, r, kind, variant, bo, bi, DTYPES[dts], seed=N * 1000 + out + kind)[1:]
    if variant == "zeros":
        assert dA.abs().max() == 0 and dB.abs().max() == 0


@pytest.mark.parametrize("case", MIXED_CASES, ids=_case_id)
def test_linear_fp32_adapters_fp16_activations(case):
    N, out, cols, r, kind, variant, bo, bi = case
    run_linear(N, out, cols, r, kind, variant, bo, bi, DTYPES["fp16-act-fp32-adapter"], seed=N * 1000 + out + kind)


@pytest.mark.parametrize("case", MIXED_CASES, ids=_case_id)
def test_linear_bf16(case):
    N, out, cols, r, kind, variant, bo, bi = case
    run_linear(N, out, cols, r, kind, variant, bo, bi, DTYPES["bf16"], seed=N + out + kind)


def test_linear_no_bias():
    run_linear(5, 70, 45, 4, ELEMENT, "random", 0, 0, DTYPES["fp32"], seed=3, bias=False)
    run_linear(5, 70, 45, 4, NONE, None, 0, 0, DTYPES["fp16"], seed=3, bias=False)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True)], ids=["dx", "dA", "dB", "dA+dB"])
@pytest.mark.parametrize("kind", [NONE, ELEMENT, BLOCK, ROW], ids=lambda k: fmt.KIND_NAMES[k])
def test_linear_backward_subsets(kind, need):
    g = torch.Generator().manual_seed(kind)
    out, cols, r = 30, 40, 4
    x, W = torch.randn(6, cols, generator=g), torch.randn(out, cols, generator=g)
    A, B, dy = torch.randn(r, cols, generator=g), torch.randn(out, r, generator=g), torch.randn(6, out, generator=g)
    m, _ = make_mask(kind, out, cols, "random", 8, 16, g)
    got = TL.masked_lora_linear_backward(dy, x, W, A, B, m, kind, 8, 16, 0.5, *need)
    ref = R.masked_lora_linear_backward(dy, x, W, A, B, m, kind, 8, 16, 0.5, *need)
    for wanted, o, r_ in zip(need, got, ref):
        if wanted:
            torch.testing.assert_close(o, r_, rtol=1e-4, atol=1e-5)
        else:
            assert o.numel() == 0 and o.dtype == r_.dtype


@pytest.mark.parametrize("kind", [ELEMENT, BLOCK], ids=lambda k: fmt.KIND_NAMES[k])
def test_wgrad_token_splits_deterministic(kind, monkeypatch):
    """dA/dB with the tokens split over programs (what a GPU with idle SMs gets) equal the unsplit ones
    up to fp32 rounding, and repeated calls are bitwise equal (fixed-order reduction, no atomics)."""
    g = torch.Generator().manual_seed(7)
    N, out, cols, r = 100, 70, 45, 5
    x, W = torch.randn(N, cols, generator=g), torch.randn(out, cols, generator=g)
    A, B, dy = torch.randn(r, cols, generator=g), torch.randn(out, r, generator=g), torch.randn(N, out, generator=g)
    m, _ = make_mask(kind, out, cols, "random", 16, 8, g)
    args = (dy, x, W, A, B, m, kind, 16, 8, 0.3, False, True, True)
    one = TL.masked_lora_linear_backward(*args)
    monkeypatch.setattr(TL, "_token_split", lambda N, n_listed, t: 3)   # rounded to BT: 64 + 36 tokens
    split = TL.masked_lora_linear_backward(*args)
    again = TL.masked_lora_linear_backward(*args)
    ref = R.masked_lora_linear_backward(*args)
    for a, b_, c, r_ in zip(one[1:], split[1:], again[1:], ref[1:]):
        torch.testing.assert_close(b_, r_, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
        assert torch.equal(b_, c)


def test_block_plan_follows_in_place_mask_edits():
    """The cached tile list of a block mask is keyed on the tensor and its version: turning blocks on in
    place must launch their tiles."""
    g = torch.Generator().manual_seed(1)
    N, out, cols, r = 6, 64, 64, 4
    x, W = torch.randn(N, cols, generator=g), torch.randn(out, cols, generator=g)
    A, B, dy = torch.randn(r, cols, generator=g), torch.randn(out, r, generator=g), torch.randn(N, out, generator=g)
    m = torch.zeros(4, 4, dtype=torch.bool)
    m[0, 0] = True
    for _ in range(2):
        got = TL.masked_lora_linear_backward(dy, x, W, A, B, m, BLOCK, 16, 16, 1.0, False, True, True)
        ref = R.masked_lora_linear_backward(dy, x, W, A, B, m, BLOCK, 16, 16, 1.0, False, True, True)
        for o, r_ in zip(got[1:], ref[1:]):
            torch.testing.assert_close(o, r_, rtol=1e-5, atol=1e-5)
        m[2:, 1:] = True   # in place: bumps the version counter


def test_fallbacks_keep_the_contract():
    """fp64 (gradcheck), ranks above MAX_RANK and empty inputs go to the reference."""
    g = torch.Generator().manual_seed(2)
    x, W = torch.randn(3, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, generator=g, dtype=torch.float64)
    A, B = torch.randn(2, 10, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    assert torch.equal(TL.masked_lora_linear(x, W, None, A, B, None, NONE, 0, 0, 1.0),
                       R.masked_lora_linear(x, W, None, A, B, None, NONE, 0, 0, 1.0))
    r = TU.MAX_RANK + 1
    x, W = torch.randn(2, 8, generator=g), torch.randn(5, 8, generator=g)
    A, B = torch.randn(r, 8, generator=g), torch.randn(5, r, generator=g)
    torch.testing.assert_close(TL.masked_lora_linear(x, W, None, A, B, None, NONE, 0, 0, 1.0),
                               R.masked_lora_linear(x, W, None, A, B, None, NONE, 0, 0, 1.0))
    e = torch.zeros(0, 8)
    assert TL.masked_lora_linear(e, W, None, A, B, None, NONE, 0, 0, 1.0).shape == (0, 5)


# ---------------------------------------------------------------------------------------- saliency
def straightforward_saliency(acc, x, dy, stat):
    """Per-sample gradients in the input dtype, summed in it: the low-precision yardstick."""
    g = torch.einsum("sto,sti->soi", dy, x)
    if stat == "grad_abs":
        inc = g.sum(0).abs()
    elif stat == "signed":
        inc = g.sum(0)
    elif stat == "sample_abs":
        inc = g.abs().sum(0)
    else:
        inc = (g * g).sum(0)
    return acc.to(x.dtype) + inc


@pytest.mark.parametrize("dt", [F32, F16, BF16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(3, 1, 333, 321), (2, 7, 45, 70), (4, 5, 9, 3), (3, 40, 20, 17)],
                         ids=lambda s: "S{}-T{}-i{}-o{}".format(*s))
@pytest.mark.parametrize("stat", TS.STATS)
def test_saliency_linear(stat, shape, dt):
    S, T, i, o = shape
    g = torch.Generator().manual_seed(S * T + i)
    x, dy = torch.randn(S, T, i, generator=g).to(dt), torch.randn(S, T, o, generator=g).to(dt)
    a0 = torch.randn(o, i, generator=g)
    ours = a0.clone()
    TS.saliency_linear(ours, x, dy, stat)
    ref64 = a0.double()
    R.saliency_linear(ref64, x.double(), dy.double(), stat)
    tol_check(ours, ref64, straightforward_saliency(a0, x, dy, stat), what=stat)
    assert ours.dtype == torch.float32


def test_saliency_noncontiguous_acc_and_errors():
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(2, 3, 12, generator=g), torch.randn(2, 3, 10, generator=g)
    base = torch.randn(12, 10, generator=g)
    ours, ref = base.clone().t(), base.clone().t()    # (10, 12) views, not contiguous
    TS.saliency_linear(ours, x, dy, "sample_sq")
    R.saliency_linear(ref, x, dy, "sample_sq")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="stat"):
        TS.saliency_linear(ours, x, dy, "nope")


# ------------------------------------------------------------------------------------------- AOT
def test_aot_one_specialisation_both_archs(tmp_path):
    """One small specialisation through the AOT path (no GPU: triton.compile for sm_80 and sm_90, then
    ptxas -v): registers > 0, no spills. The full AOT is a separate CI step."""
    from spare_kernels.backends.triton import aot
    try:
        aot.find_ptxas()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "spare_kernels.backends.triton.aot", "--arch", "80", "90", "--jobs", "2",
           "--only", "_fwd_masked_kernel", "fp16 ieee r4 element fused BM64-BN64", "--json", str(out)]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert sorted(r["arch"] for r in rows) == [80, 90]
    for r in rows:
        assert r["error"] is None and r["regs"] > 0 and r["spills"] == 0 and r["smem"] > 0, r
