"""The generic top-k engine on an accelerator without ``_C_cuda`` (spare_kernels/topk.py, the sync-free
branch of ``_histogram`` / ``_build``): no host sync inside the chunk loops, and the same masks as the
engine's CPU loops, bit for bit.

Without a GPU the sync-free branch runs on CPU tensors (``_SYNC_FREE_ON_CPU``); a "sync" is any call
that makes the host read a tensor's value: ``.item()``/``int()``/``bool()`` (``_local_scalar_dense``),
``nonzero``, boolean indexing, ``.cpu()``. Their count must not depend on the number of chunks."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from spare_kernels import topk as topk_mod
from spare_kernels.topk import topk_masks

GRANS = ("element", "block", "row", "module")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Small tensors (see conftest.one_thread)."""


class _Syncs(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "masked_select", "bincount"):
            self.n += 1
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self.n += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count(monkeypatch):
    """Counts syncs (above) and ``.cpu()`` calls (a no-op on CPU tensors, a device-to-host copy there)."""
    mode = _Syncs()
    real = torch.Tensor.cpu

    def cpu(self, *a, **k):
        mode.n += 1
        return real(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    with mode:
        yield mode
    monkeypatch.setattr(torch.Tensor, "cpu", real)


def _scores(kind, dtype, gen, g="element"):
    shapes = {"lin": (23, 37), "bias": (19,), "conv": (6, 5, 3, 3), "long": (2, 300), "empty": (0, 4)}
    out = {}
    for name, shape in shapes.items():
        if kind == "randn":
            t = torch.randn(shape, generator=gen)
        elif kind == "ties":
            t = torch.randint(0, 4, shape, generator=gen).float()
        else:
            inf = float("inf") if g == "element" else 3e4     # means of +inf and -inf would be NaN
            pool = torch.tensor([0.0, -0.0, inf, -inf, 1e-30, -1e-30, 3.0, -2.0])
            t = pool[torch.randint(0, len(pool), shape, generator=gen)]
        out[name] = t.to(dtype)
    return out


def _masks(scores, density, g, scope, free, monkeypatch, chunk=64):
    monkeypatch.setattr(topk_mod, "_SYNC_FREE_ON_CPU", free)
    monkeypatch.setattr(topk_mod, "_CHUNK", chunk)
    monkeypatch.setattr(topk_mod, "_NATIVE", False)   # these tests are about the generic engine's loops
    return topk_masks(scores, density, g, scope, block=(4, 8))


@pytest.mark.parametrize("g", GRANS)
@pytest.mark.parametrize("scope", ["global", "per_module"])
@pytest.mark.parametrize("kind", ["randn", "ties", "specials"])
def test_sync_free_masks_equal_the_loops(g, scope, kind, monkeypatch):
    """Many chunks (64 units), every dtype, densities with k = 0, 1, n - 1, n and heavy ties."""
    gen = torch.Generator().manual_seed(len(kind) + 10 * GRANS.index(g))
    for dtype in DTYPES:
        scores = _scores(kind, dtype, gen, g)
        for density in (1e-9, 0.003, 0.2, 0.5, 0.97, 1.0):
            want = _masks(scores, density, g, scope, False, monkeypatch)
            got = _masks(scores, density, g, scope, True, monkeypatch)
            assert list(got) == list(want)
            for n in want:
                assert got[n] == want[n], (n, dtype, density)


@pytest.mark.parametrize("g", ["element", "row"])
def test_uncached_units_and_long_rows(g, monkeypatch):
    """Unit scores recomputed in every pass (no cache) and rows longer than a chunk."""
    monkeypatch.setattr(topk_mod, "_CACHE_UNITS", 4)
    gen = torch.Generator().manual_seed(3)
    scores = {"a": torch.randint(0, 5, (7, 500), generator=gen).float(), "b": torch.randn(40, 30, generator=gen)}
    for density in (0.01, 0.5):
        want = _masks(scores, density, g, "global", False, monkeypatch, chunk=100)
        got = _masks(scores, density, g, "global", True, monkeypatch, chunk=100)
        assert all(got[n] == want[n] for n in want)


@pytest.mark.parametrize("g", GRANS)
@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_syncs_do_not_grow_with_chunks(g, scope, monkeypatch):
    """The sync-free branch reads the device a fixed number of times per pass: the same count with 2
    chunks as with ~100 (the loops' count grows with them, which shows the counter counts)."""
    gen = torch.Generator().manual_seed(5)
    scores = {"a": torch.randint(0, 50, (60, 40), generator=gen).float(), "b": torch.randn(30, 36, generator=gen)}
    counts = {}
    for free in (True, False):
        for chunk in (1 << 20, 32):
            with _count(monkeypatch) as c:
                _masks(scores, 0.3, g, scope, free, monkeypatch, chunk=chunk)
            counts[free, chunk] = c.n
    assert counts[True, 32] == counts[True, 1 << 20], counts
    # groups x passes (histograms, then the masks) x a few reads (the histogram, the NaN flags, the
    # count; the rest are host scalars of the host histogram): a small fixed number per pass
    groups, passes = (1 if scope == "global" else 2), (2 if g == "element" else 4) + 1
    assert counts[True, 32] <= groups * passes * 8, counts
    if g in ("element", "block"):
        assert counts[False, 32] > counts[False, 1 << 20], counts


def test_nan_named_as_before(monkeypatch):
    """The sync-free NaN check (one flag per tensor, read once) names the first tensor with a NaN."""
    for g in GRANS:
        scores = {"ok": torch.randn(8, 8), "bad": torch.randn(8, 8), "also": torch.full((4,), float("nan"))}
        scores["bad"][3, 3] = float("nan")
        for free in (False, True):
            with pytest.raises(ValueError, match=r"scores\['bad'\]: contains NaN scores"):
                _masks(scores, 0.5, g, "global", free, monkeypatch)
