"""The GPU top-k (csrc/cuda/topk.cu, spare_kernels/topk.py:_device_topk) against the generic engine.

Without a GPU: the kernels' bodies (csrc/cuda/topk_kernels.h) run on the host through
``torch.ops.spare_harness`` (tests/harness.py), driven by the very driver that runs them on CUDA
(``_device_topk`` takes the op namespace), over small grids; masks must equal the generic engine's bit
for bit. With a GPU (``-m gpu``): ``topk_masks`` on CUDA tensors against the same engine on the CPU."""
import math

import pytest
import torch

from spare_kernels import topk as topk_mod
from spare_kernels.masks import Mask
from spare_kernels.topk import _Keys, _device_topk, topk_masks

# (threads, histogram chunk bytes): the harness default (32, 16), a block smaller than a scan
# segment, blocks of several scan segments with a ragged last one, and the CUDA build's own.
CONFIGS = [None, (8, 4), (40, 100), (256, 2048)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = {"lin.weight": (7, 13), "bias": (9,), "conv.weight": (5, 3, 3, 3), "wide": (3, 70), "empty": (0, 4),
          "narrow": (40, 1)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny tensors (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def hops():
    from harness import harness
    return harness()


class _Recorder:
    """An op namespace that forwards to another and counts the calls per op."""

    def __init__(self, ops):
        self.ops, self.calls = ops, {}

    def __getattr__(self, name):
        f = getattr(self.ops, name)

        def call(*a):
            self.calls[name] = self.calls.get(name, 0) + 1
            return f(*a)
        return call


def _scores(kind, dtype, gen):
    out = {}
    for name, shape in SHAPES.items():
        n = math.prod(shape)
        if kind == "randn":
            t = torch.randn(n, generator=gen)
        elif kind == "ties":        # integers 0..3: every threshold is a heavy tie
            t = torch.randint(0, 4, (n,), generator=gen).float()
        elif kind == "specials":    # ±0.0, ±inf, tiny and huge values of both signs, many repeats
            pool = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-30, -1e-30, 3.0, -3.0, 65504.0, -2.0])
            t = pool[torch.randint(0, len(pool), (n,), generator=gen)]
        else:                       # negative only
            t = -torch.rand(n, generator=gen) - 0.5
        out[name] = t.to(dtype).reshape(shape)
    return out


def _densities(scores, scope):
    """Densities giving k = 0, 1, n-1 and n (per group), and a few in between."""
    n = sum(t.numel() for t in scores.values()) if scope == "global" else 9
    return [0.4 / n, 1.0 / n, (n - 1) / n, 1.0, 0.03, 0.37, 0.5]


def _assert_same(got, want):
    assert list(got) == list(want)
    for name in want:
        g, w = got[name], want[name]
        assert isinstance(g, Mask) and g.granularity == "element" and g.shape == w.shape, name
        assert g.data.dtype == torch.uint8 and g.data.shape == w.data.shape, name
        assert torch.equal(g.data.cpu(), w.data.cpu()), name


# ----------------------------------------------------------------------------------- keys
def test_keys_match_the_generic_engine(hops):
    """The kernels' unsigned key of every fp16 and bf16 value and of float32 edge cases is
    _Keys(torch.float32)'s signed key + 2^31 (NaN: -1), -0.0 included."""
    k32 = _Keys(torch.float32)
    u16 = torch.arange(1 << 16, dtype=torch.int64)
    f32_edges = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, -1.17549435e-38, 1.0, -1.0,
                              3.4028235e38, -3.4028235e38, float("inf"), -float("inf")], dtype=torch.float32)
    f32 = torch.cat([f32_edges, torch.randn(4096) * 1e3, torch.randn(4096) * 1e-40])
    cases = [
        (u16.to(torch.int16).view(torch.float16), u16, 1),
        (u16.to(torch.int16).view(torch.bfloat16), u16, 2),
        (f32, f32.view(torch.int32).to(torch.int64) & 0xFFFFFFFF, 0),
    ]
    for vals, bits, code in cases:
        got = hops.topk_keys(bits, code)
        f = vals.float()
        nan = torch.isnan(f)
        want = k32.keys(torch.where(nan, 0.0, f)).to(torch.int64) + (1 << 31)
        want[nan] = -1
        assert torch.equal(got, want), code


# ----------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("scope", ["global", "per_module"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["randn", "ties", "specials", "negative"])
def test_masks_equal_the_generic_engine(hops, scope, dtype, kind):
    seed = 100 * ["global", "per_module"].index(scope) + 10 * DTYPES.index(dtype) + len(kind)
    gen = torch.Generator().manual_seed(seed)
    scores = _scores(kind, dtype, gen)
    for density in _densities(scores, scope):
        want = topk_masks(scores, density, scope=scope)       # CPU tensors: the generic engine
        for cfg in CONFIGS:
            _assert_same(_device_topk(scores, density, scope, hops, cfg), want)


@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_ties_cut_inside_a_tensor_many_chunks(hops, scope):
    """All-equal scores: the tie cut lands inside one tensor (global) or inside every tensor
    (per_module: several tensors cut, their tie counts side by side in one scanned array)."""
    scores = {"a": torch.zeros(6, 50), "b": torch.zeros(33, 17), "c": torch.zeros(4, 3, 3, 3)}
    for density in (0.1, 0.41, 0.5, 0.93):
        want = topk_masks(scores, density, scope=scope)
        for cfg in CONFIGS:
            rec = _Recorder(hops)
            _assert_same(_device_topk(scores, density, scope, rec, cfg), want)
            assert rec.calls["topk_histogram"] == 4 and rec.calls["topk_equal_counts"] == 1


def test_passes_and_launches(hops):
    """One histogram launch per pass over all tensors; k = 0 and k = n stop after the NaN pass;
    distinct scores usually finish before the fourth pass; no equal-count launch without a cut."""
    scores = {f"w{i}": torch.randn(17, 9) for i in range(12)}
    for density, passes in ((1e-6, 1), (1.0, 1)):
        rec = _Recorder(hops)
        _device_topk(scores, density, "global", rec)
        assert rec.calls == {"topk_config": 1, "topk_histogram": passes, "topk_pack": 1}
    early = 0
    for density in (0.05, 0.2, 0.5, 0.9):
        rec = _Recorder(hops)
        _assert_same(_device_topk(scores, density, "global", rec), topk_masks(scores, density))
        assert rec.calls.get("topk_equal_counts", 0) == 0
        early += rec.calls["topk_histogram"] < 4
    assert early


def test_big_rows_and_one_long_row(hops):
    """Rows longer than a chunk (a chunk ends inside a row) and a single long row."""
    gen = torch.Generator().manual_seed(3)
    scores = {"long": torch.randint(0, 50, (1, 3001), generator=gen).half(),
              "tall": torch.randint(0, 50, (300, 3), generator=gen).float()}
    for scope in ("global", "per_module"):
        for density in (0.01, 0.33, 0.8):
            want = topk_masks(scores, density, scope=scope)
            for cfg in ((32, 16), (64, 256)):
                _assert_same(_device_topk(scores, density, scope, hops, cfg), want)


def test_mixed_dtypes_in_one_group(hops):
    gen = torch.Generator().manual_seed(5)
    base = torch.randint(-8, 8, (30, 11), generator=gen).float() / 4      # exact in every dtype
    scores = {"f32": base.clone(), "f16": base.half(), "bf16": base.bfloat16(), "neg": -base.half()}
    for scope in ("global", "per_module"):
        for density in (0.2, 0.5, 0.75):
            _assert_same(_device_topk(scores, density, scope, hops), topk_masks(scores, density, scope=scope))


@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_nan_raises_naming_the_first_tensor(hops, scope):
    for dtype in DTYPES:
        scores = {"ok": torch.randn(4, 5).to(dtype), "bad.weight": torch.randn(6, 7).to(dtype),
                  "also_bad": torch.full((3,), float("nan")).to(dtype)}
        scores["bad.weight"][2, 3] = float("nan")
        for density in (1e-6, 0.5, 1.0):           # also when k = 0 or k = n, as the generic engine
            with pytest.raises(ValueError, match=r"scores\['bad.weight'\]: contains NaN scores"):
                topk_masks(scores, density, scope=scope)
            with pytest.raises(ValueError, match=r"scores\['bad.weight'\]: contains NaN scores"):
                _device_topk(scores, density, scope, hops)
    # NaN bit patterns next to ±inf's keys
    for bits in (0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF):
        x = torch.tensor([1.0, 2.0], dtype=torch.float32)
        x.view(torch.int32)[1] = torch.tensor(bits, dtype=torch.int64).to(torch.int32)
        with pytest.raises(ValueError, match="NaN"):
            _device_topk({"x": x}, 0.5, scope, hops)


def test_topk_masks_dispatches_element_masks_to_the_device_engine(hops, monkeypatch):
    """topk_masks hands element masks to _device_topk when _device_ops accepts the scores (forced
    here for CPU tensors, through the harness), validating its arguments first; other granularities
    never go there."""
    calls = []

    def fake_ops(scores):
        calls.append(list(scores))
        return hops
    monkeypatch.setattr(topk_mod, "_device_ops", fake_ops)
    scores = {"a": torch.randint(0, 3, (8, 9)).float(), "b": torch.randn(12).half()}
    got = topk_masks(scores, 0.5)
    assert calls == [["a", "b"]]
    monkeypatch.undo()
    _assert_same(got, topk_masks(scores, 0.5))
    monkeypatch.setattr(topk_mod, "_device_ops", fake_ops)
    with pytest.raises(ValueError, match="density"):
        topk_masks(scores, 0.0)
    topk_masks(scores, 0.5, granularity="row")
    assert len(calls) == 1


def test_device_engine_declines_what_it_does_not_take():
    """CPU tensors, float64, non-contiguous tensors and mixed devices keep the generic engine."""
    assert topk_mod._device_ops({"a": torch.randn(3, 3)}) is None
    assert not topk_mod._device_ok(torch.randn(3, 3, dtype=torch.float64))
    assert not topk_mod._device_ok(torch.randn(4, 6).t())
    assert topk_mod._device_ok(torch.randn(4, 6).bfloat16())
    meta = torch.empty(1 << 20, 1 << 15, device="meta")       # 2^32 mask bytes: beyond the 32-bit offsets
    assert not topk_mod._device_ok(meta)


# ----------------------------------------------------------------------------------- GPU
def _cuda_topk_ops():
    if not torch.cuda.is_available():
        return None
    from spare_kernels.backends import cuda
    lib = cuda.library()
    return lib if lib is not None and hasattr(lib, "topk_pack") else None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_cuda_equals_the_cpu_engine(scope, monkeypatch):
    if _cuda_topk_ops() is None:
        pytest.skip("spare_kernels._C_cuda without the topk_* ops")
    used = []
    real = topk_mod._device_topk
    monkeypatch.setattr(topk_mod, "_device_topk", lambda *a, **k: used.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(11)
    for dtype in DTYPES:
        for kind in ("randn", "ties", "specials", "negative"):
            scores = _scores(kind, dtype, gen)
            scores["big"] = torch.randint(0, 1000, (1280, 1283), generator=gen).to(dtype)  # many blocks
            cuda_scores = {k: v.cuda() for k, v in scores.items()}
            for density in _densities(scores, scope):
                got = topk_masks(cuda_scores, density, scope=scope)
                assert all(m.device.type == "cuda" for m in got.values())
                _assert_same(got, topk_masks(scores, density, scope=scope))
    assert used
    bad = {"a": torch.randn(5, 5, device="cuda"), "b": torch.randn(7, device="cuda")}
    bad["b"][3] = float("nan")
    with pytest.raises(ValueError, match=r"scores\['b'\]: contains NaN scores"):
        topk_masks(bad, 0.5, scope=scope)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_on_the_current_stream():
    if _cuda_topk_ops() is None:
        pytest.skip("spare_kernels._C_cuda without the topk_* ops")
    scores = {f"w{i}": torch.randn(320, 640, device="cuda") for i in range(8)}
    want = topk_masks({k: v.cpu() for k, v in scores.items()}, 0.1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = topk_masks(scores, 0.1)
    torch.cuda.current_stream().wait_stream(s)
    _assert_same(got, want)
