import os

import pytest
import torch

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".cache", "inductor"))

from spare_kernels.backends import registry  # noqa: E402


def available_backends(device="cpu"):
    """Backends that really run the ops on ``device`` here (the reference always)."""
    out = []
    for b in registry.BACKENDS:
        if all(registry._serves(op, b, device) for op in registry.OPS):
            out.append(b)
    return out


@pytest.fixture(params=available_backends(), ids=lambda b: f"backend={b}")
def backend(request):
    """Runs a test once per backend available on CPU, forcing it."""
    with registry.use_backend(request.param):
        yield request.param


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
