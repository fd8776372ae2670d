"""Bad input: a ValueError/TypeError that names the argument and says expected vs got."""
import pytest
import torch

import spare_kernels as sk
from spare_kernels.masks import Mask


def lin(**over):
    a = dict(x=torch.randn(7, 33), weight=torch.randn(21, 33), bias=torch.randn(21), lora_A=torch.randn(4, 33),
             lora_B=torch.randn(21, 4), mask=None, scale=1.0)
    a.update(over)
    return sk.masked_lora_linear(**a)


def conv(**over):
    a = dict(x=torch.randn(2, 6, 8, 8), weight=torch.randn(8, 6, 3, 3), bias=None, lora_A=torch.randn(2, 6, 3, 3),
             lora_B=torch.randn(8, 2, 1, 1), mask=None, scale=1.0)
    a.update(over)
    return sk.masked_lora_conv2d(**a)


@pytest.mark.parametrize("over,exc,words", [
    (dict(x=torch.randn(7, 32)), ValueError, ["weight", "33", "32"]),
    (dict(x=torch.randint(0, 3, (7, 33))), TypeError, ["x", "floating", "int64"]),
    (dict(x=[1.0]), TypeError, ["x", "list"]),
    (dict(weight=torch.randn(21, 33, 1)), ValueError, ["weight", "2-D"]),
    (dict(weight=torch.randn(21, 33).double()), TypeError, ["weight", "float64"]),
    (dict(bias=torch.randn(20)), ValueError, ["bias", "(21)", "(20,)"]),
    (dict(lora_A=torch.randn(4, 32)), ValueError, ["lora_A", "33"]),
    (dict(lora_A=torch.randn(0, 33), lora_B=torch.randn(21, 0)), ValueError, ["lora_A", "rank"]),
    (dict(lora_B=torch.randn(21, 5)), ValueError, ["lora_B", "(21, 4)", "(21, 5)"]),
    (dict(lora_B=torch.randn(21, 4).double()), TypeError, ["lora_B", "float64"]),
    (dict(lora_A=torch.randn(4, 33, device="meta"), lora_B=torch.randn(21, 4, device="meta")), ValueError,
     ["lora_A", "device", "meta"]),
    (dict(mask=torch.ones(21, 32, dtype=torch.bool)), ValueError, ["mask", "(21, 33)", "(21, 32)"]),
    (dict(mask=torch.ones(21, 33)), TypeError, ["mask", "float32"]),
    (dict(mask=Mask.from_dense(torch.ones(20, 33, dtype=torch.bool))), ValueError, ["mask", "(21, 33)"]),
    (dict(mask="all"), TypeError, ["mask", "str"]),
    (dict(scale="2"), TypeError, ["scale", "str"]),
])
def test_linear_bad_input(over, exc, words):
    with pytest.raises(exc) as e:
        lin(**over)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("over,exc,words", [
    (dict(x=torch.randn(6, 8, 8)), ValueError, ["x", "4-D"]),
    (dict(weight=torch.randn(8, 5, 3, 3)), ValueError, ["weight", "C/groups"]),
    (dict(lora_A=torch.randn(2, 6, 1, 1)), ValueError, ["lora_A", "(2, 6, 1, 1)"]),
    (dict(lora_B=torch.randn(8, 3)), ValueError, ["lora_B", "r=2"]),
    (dict(groups=4), ValueError, ["weight", "groups=4"]),
    (dict(groups=0), ValueError, ["groups", "positive"]),
    (dict(stride=(1, 2, 3)), ValueError, ["stride", "pair"]),
    (dict(padding="same", stride=2), ValueError, ["padding", "stride 1"]),
    (dict(padding=-1), ValueError, ["padding"]),
    (dict(x=torch.randn(2, 6, 2, 2)), ValueError, ["x", "too small"]),
    (dict(mask=torch.ones(8, 6, 3, 1, dtype=torch.bool)), ValueError, ["mask", "(8, 6, 3, 3)"]),
])
def test_conv_bad_input(over, exc, words):
    with pytest.raises(exc) as e:
        conv(**over)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("call,exc,words", [
    (lambda: sk.saliency_linear(torch.randn(4, 8), torch.randn(4, 3), "abs"), ValueError, ["stat", "sample_abs", "'abs'"]),
    (lambda: sk.saliency_linear(torch.randn(8), torch.randn(3)), ValueError, ["x", "sample dim"]),
    (lambda: sk.saliency_linear(torch.randn(4, 8), torch.randn(5, 3)), ValueError, ["grad_out", "(4,)"]),
    (lambda: sk.saliency_linear(torch.randn(4, 8), torch.randn(4, 3).double()), TypeError, ["grad_out", "float64"]),
    (lambda: sk.saliency_linear(torch.randn(4, 8), torch.randn(4, 3), out=torch.zeros(3, 7)), ValueError,
     ["out", "(3, 8)"]),
    (lambda: sk.saliency_linear(torch.randn(4, 8), torch.randn(4, 3), out=torch.zeros(3, 8).double()), TypeError,
     ["out", "float32"]),
    (lambda: sk.saliency_conv2d(torch.randn(2, 4, 6, 6), torch.randn(2, 5, 4, 4), (5, 4, 3)), ValueError,
     ["weight_shape", "4 positive ints"]),
    (lambda: sk.saliency_conv2d(torch.randn(2, 4, 6, 6), torch.randn(2, 5, 5, 5), (5, 4, 3, 3)), ValueError,
     ["grad_out", "(2, 5, 4, 4)"]),
    (lambda: sk.saliency_conv2d(torch.randn(2, 4, 6, 6), torch.randn(2, 5, 4, 4), (5, 3, 3, 3)), ValueError,
     ["weight_shape", "C/groups"]),
    (lambda: sk.saliency_conv2d(torch.randn(2, 4, 6, 6), torch.randn(2, 5, 4, 4), (5, 4, 3, 3), "x"), ValueError,
     ["stat"]),
])
def test_saliency_bad_input(call, exc, words):
    with pytest.raises(exc) as e:
        call()
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_patched_module_bad_input_gets_the_op_errors(kind):
    """The modules skip the op's checks for inputs they can vouch for; any other input still gets the
    op's error naming the argument."""
    from spare_kernels.nn.lora import wrap
    base = torch.nn.Linear(6, 5) if kind == "linear" else torch.nn.Conv2d(6, 5, 3)
    m = wrap(base)
    m.add_adapter("a", 2, mask=torch.rand(base.weight.shape) < 0.5, init="random")
    good = torch.randn(3, 6) if kind == "linear" else torch.randn(2, 6, 5, 5)
    assert m(good).shape[1] == 5
    bad = [(good.double(), TypeError, ["weight", "expected dtype torch.float64"]),
           (torch.randn(3, 7) if kind == "linear" else torch.randn(2, 7, 5, 5), ValueError, ["weight"])]
    if kind == "conv":
        bad += [(torch.randn(2, 6, 2, 2), ValueError, ["x", "too small"]),
                (torch.randn(6, 5), ValueError, ["x", "3-D (unbatched) or 4-D"])]
    for x, exc, words in bad:
        with pytest.raises(exc) as e:
            m(x)
        for w in words:
            assert w in str(e.value), (w, str(e.value))


def test_patched_conv_follows_its_base_geometry():
    """The conv module caches its stride/padding/dilation; changing the base conv's refreshes it."""
    from spare_kernels.nn.lora import wrap
    m = wrap(torch.nn.Conv2d(3, 4, 3, padding=1))
    m.add_adapter("a", 2, mask=torch.rand(4, 3, 3, 3) < 0.5, init="random")
    x = torch.randn(1, 3, 8, 8)
    assert m(x).shape == (1, 4, 8, 8)
    m.base_layer.padding, m.base_layer.stride = (0, 0), (2, 2)
    with torch.no_grad():
        want = torch.nn.functional.conv2d(x, m.base_layer.weight + m.delta_weight("a"), m.bias, stride=2)
        torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize("rank", [0, -2, 2.0, True, "4"])
def test_add_adapter_refuses_a_bad_rank(rank):
    from spare_kernels.nn.lora import wrap
    m = wrap(torch.nn.Linear(6, 5))
    with pytest.raises(ValueError, match="rank: expected a positive int") as e:
        m.add_adapter("a", rank)
    assert repr(rank) in str(e.value)
    assert not m.lora_A and not m.active_adapters                      # nothing added


@pytest.mark.parametrize("scale,exc", [(float("nan"), ValueError), (float("inf"), ValueError),
                                       (-float("inf"), ValueError), ("2", TypeError), (None, TypeError),
                                       (True, TypeError)])
def test_scales_must_be_finite_reals(scale, exc):
    from spare_kernels.nn.lora import wrap
    m = wrap(torch.nn.Linear(6, 5))
    with pytest.raises(exc, match="scale: expected a"):
        m.add_adapter("a", 2, scale)
    assert not m.lora_A
    m.add_adapter("a", 2, 0.5)
    assert m.scaling["a"] == 0.5 and m.lora_alpha["a"] == 1.0 and m.r["a"] == 2
    holder = torch.nn.Sequential(m)
    with pytest.raises(exc, match="set_adapter_scale: scale: expected a"):
        sk.set_adapter_scale(holder, "a", scale)
    assert m.scaling["a"] == 0.5


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 0, -1.0])
def test_patch_unet_refuses_a_non_finite_alpha(alpha):
    net = torch.nn.Sequential(torch.nn.Linear(6, 5))
    with pytest.raises(ValueError, match="alpha: expected a positive finite number"):
        sk.patch_unet(net, alpha=alpha, target_modules="all")
    assert isinstance(net[0], torch.nn.Linear) and net[0].weight.requires_grad   # nothing changed


@pytest.mark.parametrize("stacked", [False, True])
def test_patched_conv_takes_unbatched_input(stacked):
    """``(C, H, W)`` works as in nn.Conv2d: same values and gradients as the base conv with the delta."""
    from spare_kernels.nn.lora import wrap
    m = wrap(torch.nn.Conv2d(3, 4, 3, padding=1))
    m.add_adapter("a", 2, 0.7, mask=torch.rand(4, 3, 3, 3) < 0.5, init="random")
    if stacked:
        m.add_adapter("b", 3, 1.3, init="random")
    x = torch.randn(3, 6, 5, requires_grad=True)
    y = m(x)
    assert y.shape == (4, 6, 5)
    g = torch.randn_like(y)
    params = [x] + [f.weight for f in [*m.lora_A.values(), *m.lora_B.values()]]
    got = torch.autograd.grad(y, params, g)
    w = m.base_layer.weight + sum(m.delta_weight(n) for n in m.lora_A)
    want_y = torch.nn.functional.conv2d(x, w, m.bias, padding=1)
    want = torch.autograd.grad(want_y, params, g)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"x: expected a 3-D \(unbatched\) or 4-D tensor"):
        m(torch.randn(6, 5))
