"""The Triton saliency kernels split over samples (spare_kernels/backends/triton/saliency.py: grid = tiles ×
sample groups, partials reduced in group order), on the CPU through Triton's interpreter, against the
reference in float64 (``conftest.tol_check``): linear and conv, fp32 / fp16 / bf16, every statistic, odd
shapes, forced and automatic group counts, determinism. The compiled kernels: tests/test_triton_aot.py
(``aot_specs``); not yet run on a GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

pytest.importorskip("triton")

from conftest import tol_check  # noqa: E402
from spare_kernels.backends import reference as R  # noqa: E402
from spare_kernels.backends.triton import saliency as TS  # noqa: E402
from spare_kernels.backends.triton import utils as TU  # noqa: E402

if not TU.INTERPRET:
    pytest.skip("Triton's interpreter is off: these tests run the kernels through it", allow_module_level=True)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTS = [F32, F16, BF16]
DT_IDS = ["fp32", "fp16", "bf16"]


def yardstick_linear(acc, x, dy, stat):
    """Per-sample gradients in the input dtype: the low-precision yardstick of tol_check."""
    g = torch.einsum("sto,sti->soi", dy, x)
    inc = {"grad_abs": lambda: g.sum(0).abs(), "signed": lambda: g.sum(0), "sample_abs": lambda: g.abs().sum(0),
           "sample_sq": lambda: (g * g).sum(0)}[stat]()
    return acc.to(x.dtype) + inc


@pytest.mark.parametrize("dt", DTS, ids=DT_IDS)
@pytest.mark.parametrize("shape", [(5, 3, 45, 70), (4, 1, 20, 17), (7, 19, 9, 33)],
                         ids=lambda s: "S{}-T{}-i{}-o{}".format(*s))
@pytest.mark.parametrize("stat", TS.STATS)
@pytest.mark.parametrize("groups", [None, 3], ids=["auto", "g3"])
def test_linear_split(stat, shape, dt, groups):
    S, T, i, o = shape
    g = torch.Generator().manual_seed(S * T + i)
    x, dy = torch.randn(S, T, i, generator=g).to(dt), torch.randn(S, T, o, generator=g).to(dt)
    a0 = torch.randn(o, i, generator=g)
    ours = a0.clone()
    TS.saliency_linear(ours, x, dy, stat, groups=groups)
    ref64 = a0.double()
    R.saliency_linear(ref64, x.double(), dy.double(), stat)
    tol_check(ours, ref64, yardstick_linear(a0, x, dy, stat), what=stat)


SAL_CONV = [
    # (S, C, H, W, out, kh, kw, stride, padding, dilation, groups)
    (3, 5, 6, 5, 7, 3, 3, 1, 1, 1, 1),
    (4, 6, 7, 5, 4, 3, 2, (2, 1), (1, 0), (1, 2), 2),
]


@pytest.mark.parametrize("dt", DTS, ids=DT_IDS)
@pytest.mark.parametrize("shape", SAL_CONV, ids=lambda s: "S{}-C{}-{}x{}-o{}-k{}x{}-g{}".format(*s[:7], s[10]))
@pytest.mark.parametrize("stat", TS.STATS)
@pytest.mark.parametrize("sample_groups", [None, 2], ids=["auto", "g2"])
def test_conv_split(stat, shape, dt, sample_groups):
    S, C, H, W_, out, kh, kw, stride, padding, dilation, groups = shape
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    g = torch.Generator().manual_seed(S * C + H)
    x = torch.randn(S, C, H, W_, generator=g).to(dt)
    a0 = torch.randn(out, C // groups, kh, kw, generator=g)
    oh, ow = F.conv2d(x[:1].float(), a0, **conv).shape[2:]
    dy = torch.randn(S, out, oh, ow, generator=g).to(dt)
    ours = a0.clone()
    TS.saliency_conv2d(ours, x, dy, stat, stride, padding, dilation, groups, sample_groups=sample_groups)
    ref64 = a0.double()
    R.saliency_conv2d(ref64, x.double(), dy.double(), stat, stride, padding, dilation, groups)
    gs = torch.stack([conv2d_weight(x[i:i + 1], a0.shape, dy[i:i + 1], **conv) for i in range(S)])
    inc = {"grad_abs": lambda: gs.sum(0).abs(), "signed": lambda: gs.sum(0), "sample_abs": lambda: gs.abs().sum(0),
           "sample_sq": lambda: (gs * gs).sum(0)}[stat]()
    tol_check(ours, ref64, a0.to(dt) + inc, what=stat)


@pytest.mark.parametrize("stat", ["sample_abs", "sample_sq"])
def test_split_deterministic_and_equal_to_one_group(stat):
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(6, 5, 21, generator=g).half(), torch.randn(6, 5, 13, generator=g).half()
    runs = []
    for _ in range(2):
        acc = torch.zeros(13, 21)
        TS.saliency_linear(acc, x, dy, stat, groups=4)
        runs.append(acc)
    assert torch.equal(runs[0], runs[1])                 # bit-identical: fixed reduction order
    one = torch.zeros(13, 21)
    TS.saliency_linear(one, x, dy, stat, groups=1)
    torch.testing.assert_close(runs[0], one, rtol=1e-5, atol=1e-5)   # only the summation order differs


def test_group_rule(monkeypatch):
    x = torch.zeros(1)
    # the interpreter's "GPU" has one SM: 2 programs; a one-tile weight splits into 2 groups
    assert TS._groups(5, 20, 30, x) == (3, 2)
    monkeypatch.setattr(TU, "sm_count", lambda t: 132)     # an H100
    assert TS._groups(8, 320, 320, x) == (1, 8)            # 25 tiles: one sample per group
    assert TS._groups(2, 320, 768, x) == (1, 2)            # cross-attention K/V: never more groups than samples
    assert TS._groups(8, 1280, 11520, x) == (8, 1)         # 3600 tiles fill the GPU: no partials
    assert TS._groups(8, 640, 640, x) == (3, 3)            # 100 tiles: cdiv(264, 100) = 3 groups of 3, 3, 2
    monkeypatch.setattr(TS, "MAX_PARTIAL", 2 * 320 * 320)
    assert TS._groups(8, 320, 320, x) == (4, 2)            # partials capped at two weights
    for S in range(1, 10):
        spg, G = TS._groups(S, 64, 64, x)
        assert (G - 1) * spg < S <= G * spg                # no empty group
