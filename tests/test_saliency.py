"""Saliency statistics against explicit per-sample gradients from torch.func."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

import spare_kernels as sk


def per_sample_linear_grads(x, dy):
    """g_i = ∂/∂W Σ_t <dy_t, W x_t> per sample, through torch.func (independent of the ops)."""
    W = torch.zeros(dy.shape[-1], x.shape[-1], dtype=torch.float64)

    def loss(W, xi, dyi):
        return (F.linear(xi, W) * dyi).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(W, x.double(), dy.double())


def per_sample_conv_grads(x, dy, wshape, stride, padding, dilation, groups):
    W = torch.zeros(wshape, dtype=torch.float64)

    def loss(W, xi, dyi):
        return (F.conv2d(xi[None], W, None, stride, padding, dilation, groups) * dyi[None]).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(W, x.double(), dy.double())


def expected(g, stat):
    return {"grad_abs": g.sum(0).abs(), "signed": g.sum(0), "sample_abs": g.abs().sum(0),
            "sample_sq": (g ** 2).sum(0)}[stat]


@pytest.mark.parametrize("stat", sk.STATS)
@pytest.mark.parametrize("shape", [(5, 1, 33, 21), (4, 7, 65, 19), (3, 2, 3, 17, 9)], ids=str)
def test_saliency_linear(backend, stat, shape):
    *lead, inf, out = shape
    x = torch.randn(*lead, inf)
    dy = torch.randn(*lead, out)
    got = sk.saliency_linear(x, dy, stat)
    assert got.dtype == torch.float32 and got.shape == (out, inf)
    g = per_sample_linear_grads(x.reshape(lead[0], -1, inf), dy.reshape(lead[0], -1, out))
    torch.testing.assert_close(got.double(), expected(g, stat), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stat", sk.STATS)
@pytest.mark.parametrize("conv", [((3, 6, 9, 8), (4, 6, 3, 3), 1, 1, 1, 1), ((2, 6, 11, 9), (6, 2, 3, 3), 2, 1, 2, 3),
                                  ((4, 5, 6, 6), (7, 5, 1, 1), 1, 0, 1, 1)], ids=str)
def test_saliency_conv2d(backend, stat, conv):
    xs, ws, stride, padding, dilation, groups = conv
    x = torch.randn(xs)
    y = F.conv2d(x, torch.zeros(ws), None, stride, padding, dilation, groups)
    dy = torch.randn_like(y)
    got = sk.saliency_conv2d(x, dy, ws, stat, stride, padding, dilation, groups)
    assert got.dtype == torch.float32 and got.shape == ws
    g = per_sample_conv_grads(x, dy, ws, stride, padding, dilation, groups)
    torch.testing.assert_close(got.double(), expected(g, stat), rtol=1e-4, atol=1e-4)


def test_grad_abs_equals_param_grad_abs(backend):
    lin = torch.nn.Linear(24, 16)
    x = torch.randn(6, 5, 24)
    lin.weight.grad = None
    y = lin(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(sk.saliency_linear(x, dy, "grad_abs"), lin.weight.grad.abs(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stat", ["sample_abs", "sample_sq"])
def test_accumulates_into_out_and_bf16(backend, stat):
    x = torch.randn(4, 3, 40)
    dy = torch.randn(4, 3, 24)
    acc = sk.saliency_linear(x[:2], dy[:2], stat)
    sk.saliency_linear(x[2:], dy[2:], stat, out=acc)
    torch.testing.assert_close(acc, sk.saliency_linear(x, dy, stat), rtol=1e-5, atol=1e-5)
    lo = sk.saliency_linear(x.bfloat16(), dy.bfloat16(), stat)
    assert lo.dtype == torch.float32
    ref = sk.saliency_linear(x.bfloat16().float(), dy.bfloat16().float(), stat)
    torch.testing.assert_close(lo, ref, rtol=1e-3, atol=1e-3)


def test_sample_stats_differ_from_batch_stats(backend):
    # guards against a kernel that silently returns the batch statistic for the per-sample one
    x = torch.randn(4, 3, 10)
    dy = torch.randn(4, 3, 6)
    assert not torch.allclose(sk.saliency_linear(x, dy, "sample_abs"), sk.saliency_linear(x, dy, "grad_abs"))


# ------------------------------------------------------------------------------ on a GPU (pytest -m gpu)
# The GPU paths of the per-sample statistics for 16-bit inputs: the cuda backend's WMMA tile kernel (up to
# 768 tokens per sample; samples split over blocks when the weight has few tiles) and its ATen path (more
# tokens, grouped convs); the triton kernels with their sample split. Against the reference in fp64 of
# the same 16-bit values; two runs bit-identical.
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_backend_or_skip(b):
    from spare_kernels.backends import registry
    if b not in registry.runnable("cuda"):
        pytest.skip(f"backend {b} does not run on CUDA here")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("b", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("stat", ["sample_abs", "sample_sq"])
@pytest.mark.parametrize("S,T,inf,out", [(8, 77, 768, 320), (2, 64, 320, 130), (5, 33, 1000, 20), (3, 1100, 64, 48)],
                         ids=str)
def test_sample_stats_16bit_on_gpu(b, dtype, stat, S, T, inf, out):
    _gpu_backend_or_skip(b)
    g = torch.Generator(device="cuda").manual_seed(S * T)
    x = torch.randn(S, T, inf, device="cuda", generator=g).to(dtype)
    dy = torch.randn(S, T, out, device="cuda", generator=g).to(dtype)
    with sk.use_backend(b):
        got = sk.saliency_linear(x, dy, stat)
        again = sk.saliency_linear(x, dy, stat)
    assert torch.equal(got, again)
    want = expected(per_sample_linear_grads(x.cpu(), dy.cpu()), stat)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("b", ["cuda", "triton"])
@pytest.mark.parametrize("stat", ["sample_abs", "sample_sq"])
@pytest.mark.parametrize("conv", [((4, 64, 8, 8), (96, 64, 3, 3), 1, 1, 1, 1),
                                  ((3, 32, 9, 7), (40, 16, 3, 3), 2, 1, 1, 2)], ids=str)
def test_sample_stats_conv_bf16_on_gpu(b, stat, conv):
    _gpu_backend_or_skip(b)
    xs, ws, stride, padding, dilation, groups = conv
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(xs, device="cuda", generator=g).bfloat16()
    y = F.conv2d(x.float(), torch.zeros(ws, device="cuda"), None, stride, padding, dilation, groups)
    dy = torch.randn(y.shape, device="cuda", generator=g).bfloat16()
    with sk.use_backend(b):
        got = sk.saliency_conv2d(x, dy, ws, stat, stride, padding, dilation, groups)
        again = sk.saliency_conv2d(x, dy, ws, stat, stride, padding, dilation, groups)
    assert torch.equal(got, again)
    want = expected(per_sample_conv_grads(x.cpu(), dy.cpu(), ws, stride, padding, dilation, groups), stat)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
