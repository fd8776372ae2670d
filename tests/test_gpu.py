"""On a GPU (``pytest -m gpu``; skipped without CUDA): every backend the registry runs on CUDA against
the reference, through the public API, ``patch_unet``, ``SaliencyCollector`` and ``torch.compile``."""
import pytest
import torch

import spare_kernels as sk
from spare_kernels import selfcheck
from spare_kernels.backends import registry

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA_BACKENDS = registry.runnable("cuda") if torch.cuda.is_available() else []
GRID = list(selfcheck.grid(quick=False))


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("name, kind, case", GRID, ids=[g[0] for g in GRID])
def test_selfcheck_grid(backend, name, kind, case):
    res = (selfcheck.check_layer(case, backend, torch.device("cuda")) if kind == "layer"
           else selfcheck.check_saliency(case, backend, torch.device("cuda")))
    for what, err, bnd in res:
        assert err <= bnd, f"{backend} {name} {what}: err {err:.3e} > bound {bnd:.3e}"


def test_a_gpu_backend_is_the_default_on_cuda():
    for op in registry.OPS:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            assert registry.backend_for(op, "cuda", dt) != "reference", (op, dt)


def test_runs_on_the_current_stream_and_device():
    x, W, A, B = (torch.randn(s, device="cuda") for s in ((64, 96), (80, 96), (4, 96), (80, 4)))
    m = sk.Mask.from_dense(torch.rand(80, 96, device="cuda") > 0.5)
    want = sk.masked_lora_linear(x, W, None, A, B, m, 0.5)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = sk.masked_lora_linear(x, W, None, A, B, m, 0.5)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(got, want)


def test_patch_unet_and_collector_on_cuda_match_the_reference():
    pytest.importorskip("diffusers")
    from unets import run, tiny_inputs, tiny_unet

    def go(backend):
        with sk.use_backend(backend):
            unet = tiny_unet().cuda()
            inputs = tuple(t.cuda() for t in tiny_inputs())
            with sk.SaliencyCollector(unet, stat="sample_abs") as col:
                run(unet, inputs).pow(2).mean().backward()
            masks = sk.topk_masks(col.scores(), 0.5)
            torch.manual_seed(0)
            sk.patch_unet(unet, masks=masks, target_modules="all", init="random")
            y = run(unet, inputs)
            y.pow(2).mean().backward()
            grads = [p.grad for n, p in unet.named_parameters() if p.requires_grad]
            return col.scores(), y.detach(), grads

    s_ref, y_ref, g_ref = go("reference")
    s, y, g = go(None)
    for k in s_ref:
        torch.testing.assert_close(s[k], s_ref[k], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-4)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4)


def test_compile_fullgraph_on_cuda():
    x, W, A, B = (torch.randn(s, device="cuda") for s in ((32, 64), (48, 64), (4, 64), (48, 4)))
    m = sk.Mask.from_dense(torch.rand(48, 64, device="cuda") > 0.5)
    A.requires_grad_()

    def f(x, A):
        return sk.masked_lora_linear(x, W, None, A, B, m, 0.5).square().sum()

    eager = f(x, A)
    eager.backward()
    ga = A.grad.clone()
    A.grad = None
    compiled = torch.compile(f, fullgraph=True)(x, A)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(A.grad, ga)


def test_the_cuda_extension_is_built_and_serves_cuda():
    """The GPU check builds spare_kernels._C_cuda against the torch it finds: a failed build must show."""
    import os
    if os.environ.get("SPARE_KERNELS_BUILD_CUDA", "1") == "0":
        pytest.skip("SPARE_KERNELS_BUILD_CUDA=0")
    info = registry.backend_info()
    assert "cuda" in CUDA_BACKENDS, info["unavailable"].get("cuda")


@pytest.mark.parametrize("backend", [b for b in CUDA_BACKENDS if b != "reference"])
def test_weight_sized_temporaries_are_chunked_exactly(backend):
    """Weights above the cuda backend's scratch bound (2^24 entries) take its chunked paths (G by rows,
    saliency by rows and samples): same results as the reference."""
    out, cols, r, n = 4099, 4103, 3, 40
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, cols, device="cuda", generator=g)
    W = torch.randn(out, cols, device="cuda", generator=g) / cols ** 0.5
    A = torch.randn(r, cols, device="cuda", generator=g).requires_grad_()
    B = torch.randn(out, r, device="cuda", generator=g).requires_grad_()
    m = sk.Mask.from_dense(torch.rand(out, cols, device="cuda", generator=g) > 0.5)

    def run(b):
        with sk.use_backend(b):
            y = sk.masked_lora_linear(x, W, None, A, B, m, 0.5)
            y.square().mean().backward()
            grads = (A.grad.clone(), B.grad.clone())
            A.grad = B.grad = None
            xs, dys = x.view(4, 10, cols), torch.randn(4, 10, out, device="cuda", generator=g)
            sal = {s: sk.saliency_linear(xs, dys, s) for s in ("grad_abs", "sample_abs")}
        return y.detach(), grads, sal

    g.manual_seed(1)
    y, (dA, dB), sal = run(backend)
    g.manual_seed(1)
    y0, (dA0, dB0), sal0 = run("reference")
    torch.testing.assert_close(y, y0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dA, dA0, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(dB, dB0, rtol=1e-3, atol=1e-6)
    for s in sal:
        torch.testing.assert_close(sal[s], sal0[s], rtol=1e-3, atol=1e-4)
