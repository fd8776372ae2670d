import importlib.util
import os

import pytest
import torch

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))
# Without a GPU the triton backend runs through Triton's interpreter, so it joins the `backend` and
# `backend_device` fixtures (forced on CPU tensors) like every other backend. It must be set before
# spare_kernels loads its backends; TRITON_INTERPRET=0 in the environment opts out.
if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from spare_kernels.backends import registry  # noqa: E402


def available_backends(device="cpu"):
    """Backends that really run every op on ``device`` here (the reference always)."""
    return registry.runnable(device)


def backend_pairs():
    """Every (backend, device) pair the registry runs here: CPU, and CUDA where torch sees a GPU."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(b, d) for d in devices for b in available_backends(d)]


def _param(value, backend, device):
    # The Triton kernels on CPU tensors run through Triton's interpreter: the whole shared suite again,
    # minutes of CI. Their own suites (test_backend_triton*.py, test_triton_api.py) stay in `make test`;
    # this re-run is marked `interp` (make test-interp).
    marks = [pytest.mark.interp] if backend == "triton" and device == "cpu" else []
    return pytest.param(value, marks=marks)


@pytest.fixture(params=[_param(b, b, "cpu") for b in available_backends()], ids=lambda b: f"backend={b}")
def backend(request):
    """Runs a test once per backend available on CPU, forcing it."""
    with registry.use_backend(request.param):
        yield request.param


@pytest.fixture(params=[_param(p, *p) for p in backend_pairs()], ids=lambda p: f"{p[0]}@{p[1]}")
def backend_device(request):
    """Runs a test once per (backend, device) pair the registry runs here, forcing the backend;
    yields ``(backend, torch.device)``."""
    b, d = request.param
    with registry.use_backend(b):
        yield b, torch.device(d)


def override_entry(monkeypatch, op, backend, **changes):
    """For one test: ``backend``'s registry entry of ``op`` with ``changes`` (``dataclasses.replace``);
    the registry and its choice cache are restored after."""
    import dataclasses
    e = registry.entries()[(op, backend)]
    monkeypatch.setattr(registry, "_IMPLS", dict(registry._IMPLS))
    monkeypatch.setattr(registry, "_CHOICE", {})
    registry._IMPLS[(op, backend)] = new = dataclasses.replace(e, **changes)
    return new


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add OpenMP hand-offs (on a loaded 2-core machine they made
    such files ~10x slower). For a module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tol_check(got, ref64, lowp, *, factor=4.0, floor=None, what=""):
    """flash-attention style bound: the op's error against the fp64 truth is at most ``factor`` times
    the error of the straightforward PyTorch formula run in the same low precision (``lowp``), plus a
    floor scaled to the dtype and to the magnitude of the values."""
    eps = torch.finfo(lowp.dtype).eps
    got = got.double()
    ref64 = ref64.double()
    base_err = (lowp.double() - ref64).abs().max().item()
    if floor is None:
        floor = 8 * eps * max(ref64.abs().max().item(), 1.0)
    err = (got - ref64).abs().max().item()
    assert err <= factor * base_err + floor, f"{what}: err {err:.3e} > {factor} x {base_err:.3e} + {floor:.3e}"
