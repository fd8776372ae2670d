"""torch.compile(fullgraph=True) sees each op as one node: no graph breaks, same numbers."""
import torch

import spare_kernels as sk
from spare_kernels.masks import Mask


def test_compile_fullgraph_all_ops(backend):
    torch._dynamo.reset()
    W = torch.randn(21, 33)
    M = Mask.from_dense(torch.rand(21, 33) > 0.5)
    Wc = torch.randn(6, 4, 3, 3)

    def f(x, A, B, xc, Ac, Bc):
        y = sk.masked_lora_linear(x, W, None, A, B, M, 0.5) + sk.masked_lora_linear(x, W, None, A, B, None, 0.5)
        yc = sk.masked_lora_conv2d(xc, Wc, None, Ac, Bc, None, 1.0, 1, 1)
        s = sk.saliency_linear(x.detach(), y.detach(), "sample_abs")
        return y.sin().sum() + yc.square().sum() + s.sum()

    args = [torch.randn(2, 7, 33), torch.randn(4, 33), torch.randn(21, 4),
            torch.randn(2, 4, 8, 8), torch.randn(2, 4, 3, 3), torch.randn(6, 2, 1, 1)]
    eager = [a.clone().requires_grad_() for a in args]
    comp = [a.clone().requires_grad_() for a in args]
    le = f(*eager)
    le.backward()
    cf = torch.compile(f, fullgraph=True)   # raises on any graph break
    lc = cf(*comp)
    lc.backward()
    torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-3)
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_patched_module_under_autocast(backend):
    """A patched layer under autocast (cast as nn.Linear, op run with autocast off) compiles without
    a graph break and gives the eager numbers and the fp32 adapter gradients."""
    from torch import nn

    from spare_kernels.nn import MaskedLoRALinear
    torch._dynamo.reset()
    m = MaskedLoRALinear(nn.Linear(40, 24))
    m.add_adapter("default", 4, 1.0, init="random", mask=torch.rand(24, 40) > 0.5)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x)

    def g(x):   # autocast entered outside the compiled function, backward inside the region
        return m(x)

    cg = torch.compile(g, fullgraph=True)
    out = []
    for fn, outer in ((f, False), (torch.compile(f, fullgraph=True), False), (cg, True)):
        m.zero_grad(set_to_none=True)
        x = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=outer):
            y = fn(x)
            y.float().square().sum().backward()
        out.append((y, m.lora_A["default"].weight.grad, m.lora_B["default"].weight.grad))
    for o in out[1:]:
        assert o[0].dtype == torch.bfloat16 and o[1].dtype == torch.float32
        for a, b in zip(o, out[0]):
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
