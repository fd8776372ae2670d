"""The native CPU top-k engine (csrc/cpu/topk.cpp) against the generic engine, bit for bit (issue 29).

Every case runs under each engine configuration: defaults; no candidate array (every level a pass over
the scores, and the tie count a pass of its own); an 11-bit top digit; both."""
import json

import pytest
import torch

from spare_kernels import topk as T
from spare_kernels.topk import topk_masks

pytestmark = pytest.mark.skipif(T._native_ops({"x": torch.empty(1)}) is None,
                                reason="spare_kernels._C without topk_select")

CONFIGS = {"default": {}, "no_candidates": dict(_NATIVE_CAND_BYTES=0), "digit11": dict(_NATIVE_WIDE_GROUPS=0),
           "digit11_no_candidates": dict(_NATIVE_CAND_BYTES=0, _NATIVE_WIDE_GROUPS=0)}


@pytest.fixture(params=list(CONFIGS))
def config(request, monkeypatch):
    for k, v in CONFIGS[request.param].items():
        monkeypatch.setattr(T, k, v)
    return request.param


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def generic(scores, density, **kw):
    old, T._NATIVE = T._NATIVE, False
    try:
        return topk_masks(scores, density, **kw)
    finally:
        T._NATIVE = old


def native(scores, density, **kw):
    calls = []
    lib = T._native_ops(scores)
    real = lib.topk_select

    class Spy:
        def topk_select(self, *a):
            calls.append(a)
            return real(*a)
    orig = T._native_ops
    T._native_ops = lambda s: Spy()
    try:
        out = topk_masks(scores, density, **kw)
    finally:
        T._native_ops = orig
    assert calls, "the native engine did not run"
    return out


def check(scores, density, **kw):
    a, b = native(scores, density, **kw), generic(scores, density, **kw)
    assert list(a) == list(b)
    for name in a:
        ma, mb = a[name], b[name]
        assert (ma.granularity, ma.shape, ma.block) == (mb.granularity, mb.shape, mb.block), name
        assert ma.data.dtype == mb.data.dtype and torch.equal(ma.data, mb.data), name
    return a


def ties(shapes, levels=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randint(0, levels, s, generator=g).to(dtype) for i, s in enumerate(shapes)}


def rand(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(s, generator=g).to(dtype) for i, s in enumerate(shapes)}


ODD = [(7,), (3, 5, 3, 3), (13, 11), (0, 5), (5, 0), (4, 0, 3), (40, 17), (1,)]


@pytest.mark.parametrize("scope", ["global", "per_module"])
@pytest.mark.parametrize("density", [1e-3, 0.3, 0.5, 1.0])
def test_ties_within_and_across_tensors(config, threads, scope, density):
    check(ties(ODD + [(300, 700)], levels=3), density, scope=scope)      # 210 K entries: parallel passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_dtypes_random_scores(config, dtype, scope):
    for d in (1e-4, 0.1, 0.5):
        check(rand(ODD + [(257, 129)], dtype=dtype), d, scope=scope)


def test_mixed_dtypes(config):
    s = rand([(30, 20), (17,), (8, 3, 3, 3)])
    s["t0"], s["t1"] = s["t0"].half(), s["t1"].bfloat16()
    check(s, 0.37)
    s["t3"] = torch.randn(64, 9, dtype=torch.float64)            # one fp64 tensor: 64-bit keys for all
    s["t0"][0, :5] = 0.25                                        # exact ties across dtypes
    s["t3"][1, :5] = 0.25
    for d in (0.2, 0.5):
        check(s, d)
        check(s, d, scope="per_module")


def test_signed_zeros_tie_and_infinities(config):
    z = torch.zeros(9, 16)
    z.view(-1)[::3] = -0.0
    s = {"a": z, "b": -z.clone(), "c": torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1.0, float("inf")])}
    for d in (0.1, 0.5, 0.99, 1.0):
        out = check(s, d)
    assert int(out["c"].data.sum()) > 0
    x = {"x": torch.tensor([-float("inf")] * 5 + [float("inf")] * 5 + [3.0] * 6)}
    for d in (0.25, 0.5, 0.75):
        check(x, d)
        check({k: v.double() for k, v in x.items()}, d)


def test_k_zero_and_k_all(config):
    s = rand([(10, 10), (3,)])
    out = check(s, 1e-9)
    assert all(int(m.data.sum()) == 0 for m in out.values())
    out = check(s, 1.0)
    assert out["t0"].data.shape == (10, 2) and int(out["t0"].data[0, 1]) == 0x03   # padding bits stay 0


@pytest.mark.parametrize("granularity", ["block", "row", "module"])
@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_unit_granularities(config, granularity, scope):
    s = ties([(70, 45), (33,), (6, 4, 3, 3), (0, 8), (9, 0), (128, 64)], levels=2)
    for d in (0.01, 0.3, 0.5, 1.0):
        check(s, d, granularity=granularity, scope=scope, block=(8, 16))
    check(rand([(70, 45), (6, 4, 3, 3), (128, 64)]), 0.4, granularity=granularity, scope=scope, block=(3, 5))


def test_nan_names_the_first_tensor_with_one(config):
    s = rand([(20, 20), (30,), (4, 4)])
    s["t1"][7] = float("nan")
    for d in (1e-9, 0.5, 1.0):            # refused even where k = 0 or k = n
        with pytest.raises(ValueError, match=r"^scores\['t1'\]: contains NaN scores$"):
            native(s, d)
        with pytest.raises(ValueError, match=r"^scores\['t1'\]: contains NaN scores$"):
            native(s, d, scope="per_module")
    s["t2"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"scores\['t1'\]"):
        native(s, 0.3)
    s = rand([(64, 64), (8, 8)])
    s["t1"][0, 0] = float("nan")        # a block mean is NaN in a later tensor
    with pytest.raises(ValueError, match=r"^scores\['t1'\]: contains NaN scores \(a block mean is NaN\)$"):
        native(s, 0.3, granularity="block", block=(4, 4))
    s = {"a": torch.tensor([[float("inf"), -float("inf")]]), "b": torch.ones(3, 2)}   # inf - inf: a NaN mean
    with pytest.raises(ValueError, match=r"^scores\['a'\]: contains NaN scores \(a row mean is NaN\)$"):
        native(s, 0.5, granularity="row")


def test_fallbacks_keep_the_generic_engine(monkeypatch):
    calls = []
    monkeypatch.setattr(T, "_native_element", lambda *a: calls.append(a))
    s = {"a": torch.randn(10, 12).t(), "b": torch.randn(5)}      # non-contiguous: the generic engine
    out = topk_masks(s, 0.3)
    assert not calls and sum(int(m.to_dense().sum()) for m in out.values()) == round(0.3 * 125)
    monkeypatch.setattr(T, "_NATIVE_UNITS", 3)                   # more units than the bound: generic too
    monkeypatch.setattr(T, "_native_units", lambda *a: calls.append(a))
    topk_masks(s, 0.3, granularity="row")
    assert not calls


def test_large_tensor_with_candidates_and_ties(config, threads):
    g = torch.Generator().manual_seed(1)
    s = {"a": torch.rand(1 << 17, generator=g), "b": (torch.rand(300, 333, generator=g) * 64).round() / 64}
    for d in (0.001, 0.5):
        check(s, d)


def test_benchmark_quick_smoke(tmp_path):
    from benchmarks import topk as bench
    out = tmp_path / "topk.json"
    bench.main(["--quick", "--densities", "0.1", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["quiet_s"]["native"] > 0 and row["peak_extra_bytes"]["native"] > 0
