"""Double backward is exact on every backend (issue 15): a create_graph backward through a backend whose
kernels are not differentiable runs the reference's formulas, which autograd records; the reference's
own backward is built from differentiable ops. Gradient penalties on the input and on the adapter's own
gradients, for linear and conv, every mask kind, the eager Function, the C++ twin (frozen weight), the
custom op (what torch.compile records) and the nn modules."""
import pytest
import torch
import torch.nn.functional as F

import spare_kernels as sk
from spare_kernels.masks import topk_masks

KINDS = ["none", "element", "block", "row"]


def _case(layer, kind, g):
    if layer == "linear":
        x, W, A, B = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((6, 24), (20, 24), (3, 24), (20, 3)))
    else:
        x, W, A, B = (torch.randn(s, generator=g, dtype=torch.float64)
                      for s in ((2, 4, 7, 7), (6, 4, 3, 3), (3, 4, 3, 3), (6, 3, 1, 1)))
    mask = None if kind == "none" else topk_masks({"w": torch.rand(W.shape, generator=g)}, 0.5, kind, block=(4, 8))["w"]
    return x, W, A, B, mask


def _ours(layer, x, W, A, B, mask, s=0.7):
    if layer == "linear":
        return sk.masked_lora_linear(x, W, None, A, B, mask, s)
    return sk.masked_lora_conv2d(x, W, None, A, B, mask, s, padding=1, stride=(2, 1))


def _truth(layer, x, W, A, B, mask, s=0.7):
    """Plain torch on the dense effective weight: autograd differentiates it any number of times."""
    d = (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).view(W.shape) * s
    if mask is not None:
        d = d * mask.to_dense().to(d.dtype)
    if layer == "linear":
        return F.linear(x, W + d)
    return F.conv2d(x, W + d, None, (2, 1), 1)


def _loss(y):
    return (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).pow(2).sum()


def _penalties(f, x, A, B):
    """Two penalties: ‖∂L/∂x‖² and ‖∂L/∂A‖²; their gradients with respect to x, A and B."""
    out = []
    for wrt in ("x", "A"):
        xs, As, Bs = (t.detach().clone().requires_grad_() for t in (x, A, B))
        loss = _loss(f(xs, As, Bs))
        g, = torch.autograd.grad(loss, xs if wrt == "x" else As, create_graph=True)
        g.pow(2).sum().backward()
        out.append([t.grad for t in (xs, As, Bs)])
    return out


def _close(got, want, what):
    for a, b, n in zip(got, want, ("x", "A", "B")):
        assert a is not None and b is not None, f"{what}: d/d{n} missing"
        err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert err < 2e-5, f"{what}: d/d{n} off by {err:.2e}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_gradient_penalties_are_exact(backend_device, layer, kind):
    """fp32 activations (the native kernels' dtype on CPU), compared with the plain-torch truth in fp64."""
    _, dev = backend_device
    g = torch.Generator().manual_seed(1)
    x, W, A, B, mask = _case(layer, kind, g)
    x, W, A, B = (t.float().to(dev) for t in (x, W, A, B))
    mask = None if mask is None else mask.to(dev)
    want = _penalties(lambda xx, AA, BB: _truth(layer, xx.double(), W.double(), AA.double(), BB.double(), mask), x, A, B)
    got = _penalties(lambda xx, AA, BB: _ours(layer, xx, W, AA, BB, mask), x, A, B)   # frozen W: C++ twin on cpu
    for w, gt, what in zip(want, got, ("penalty on dL/dx", "penalty on dL/dA")):
        _close(gt, w, f"{layer}/{kind} {what}")
    # A weight that requires grad takes the Python autograd.Function.
    Wg = W.clone().requires_grad_()
    got = _penalties(lambda xx, AA, BB: _ours(layer, xx, Wg, AA, BB, mask), x, A, B)
    for w, gt, what in zip(want, got, ("penalty on dL/dx", "penalty on dL/dA")):
        _close(gt, w, f"{layer}/{kind} {what} (Function path)")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_custom_op_double_backward_is_exact(backend, layer, kind):
    """The custom ops (what torch.compile records) have an opaque backward op: a create_graph backward
    through them runs the reference formulas."""
    g = torch.Generator().manual_seed(2)
    x, W, A, B, mask = _case(layer, kind, g)
    x, W, A, B = (t.float() for t in (x, W, A, B))
    wire = (None, 0, 0, 0) if mask is None else mask.wire()
    ops = torch.ops.spare_kernels

    def ours(xx, AA, BB):
        if layer == "linear":
            return ops.masked_lora_linear(xx, W, None, AA, BB, *wire, 0.7)
        return ops.masked_lora_conv2d(xx, W, None, AA, BB.reshape(6, 3), *wire, 0.7, [2, 1], [1, 1], [1, 1], 1)

    want = _penalties(lambda xx, AA, BB: _truth(layer, xx.double(), W.double(), AA.double(), BB.double(), mask), x, A, B)
    for w, gt, what in zip(want, _penalties(ours, x, A, B), ("penalty on dL/dx", "penalty on dL/dA")):
        _close(gt, w, f"{layer}/{kind} {what} (custom op)")


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_nn_modules_double_backward(backend, layer):
    g = torch.Generator().manual_seed(3)
    x, W, A, B, mask = _case(layer, "element", g)
    x = x.float()
    if layer == "linear":
        base = torch.nn.Linear(24, 20, bias=False)
    else:
        base = torch.nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1, bias=False)
    with torch.no_grad():
        base.weight.copy_(W)
    m = sk.nn.MaskedLoRALinear(base) if layer == "linear" else sk.nn.MaskedLoRAConv2d(base)
    m.add_adapter("a", 3, 0.7, mask=mask, lora_A=A.float().clone(), lora_B=B.float().clone())
    xs = x.clone().requires_grad_()
    gx, = torch.autograd.grad(_loss(m(xs)), xs, create_graph=True)
    gx.pow(2).sum().backward()
    want = _penalties(lambda xx, AA, BB: _truth(layer, xx.double(), W, AA.double(), BB.double(), mask),
                      x, A.float(), B.float())[0]
    _close([xs.grad, m.lora_A["a"].weight.grad, m.lora_B["a"].weight.grad], want, f"{layer} module")
