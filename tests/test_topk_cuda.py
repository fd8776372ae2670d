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
            for compact in (None, False):
                rec = _Recorder(hops)
                _assert_same(_device_topk(scores, density, scope, rec, cfg, compact, window=False), want)
                # every key ties: all scores are candidates (> 1/8 of the bytes), so the candidate
                # array is off unless forced; pass 1 is topk_compact either way
                assert rec.calls["topk_compact"] == 1 and rec.calls["topk_equal_counts"] == 1
                assert rec.calls["topk_histogram"] == 3 and "topk_cand_histogram" not in rec.calls
            rec = _Recorder(hops)
            _assert_same(_device_topk(scores, density, scope, rec, cfg, True, window=False), want)
            assert rec.calls["topk_histogram"] == 1 and rec.calls["topk_cand_histogram"] == 2
            if scope == "global":    # the window path: one pass, all keys candidates, the cut found there
                rec = _Recorder(hops)
                _assert_same(_device_topk(scores, density, scope, rec, cfg), want)
                assert rec.calls["topk_window"] == 1 and rec.calls["topk_equal_counts"] == 1
                assert _full_passes(rec) == 0 and rec.calls["topk_cand_histogram"] == 4


def _passes(rec):
    return sum(rec.calls.get(op, 0) for op in ("topk_histogram", "topk_compact", "topk_cand_histogram"))


def _full_passes(rec):
    """Radix passes over every score (the window path has none)."""
    return sum(rec.calls.get(op, 0) for op in ("topk_histogram", "topk_compact"))


def test_passes_and_launches(hops):
    """One launch per pass over all tensors: pass 0 histogram, pass 1 compact, passes 2-3 over the
    candidates; k = 0 and k = n stop after the NaN pass; distinct scores usually finish before the
    fourth pass; no equal-count launch without a cut."""
    scores = {f"w{i}": torch.randn(17, 9) for i in range(12)}
    for density in (1e-6, 1.0):
        rec = _Recorder(hops)
        _device_topk(scores, density, "global", rec)
        assert rec.calls == {"topk_config": 1, "topk_histogram": 1, "topk_pack": 1}
    early = 0
    for density in (0.05, 0.2, 0.5, 0.9):
        rec = _Recorder(hops)
        got = _device_topk(scores, density, "global", rec, None, True, window=False)
        _assert_same(got, topk_masks(scores, density))
        assert rec.calls.get("topk_equal_counts", 0) == 0
        assert rec.calls["topk_histogram"] == 1 and rec.calls["topk_compact"] == 1
        early += _passes(rec) < 4
    assert early


# ----------------------------------------------------------------------------------- compaction
def _ukeys(x):
    """The kernels' unsigned keys of a float tensor (through the generic engine's _Keys)."""
    return _Keys(torch.float32).keys(x.float().reshape(-1)).to(torch.int64) + (1 << 31)


@pytest.mark.parametrize("cfg", [(32, 16), (8, 4), (256, 2048)])
def test_compact_writes_exactly_the_keys_of_the_bin(hops, cfg):
    """topk_compact over several tensors: per tensor, the level-1 histogram of the keys whose top
    digit is the tensor's prefix, and exactly those keys (as a multiset) in the tensor's segment of
    cand, the cursor at the segment's size; a tensor with prefix -1 is skipped. The stage is flushed
    many times (the first tensor: every key shares one top digit)."""
    threads, hchunk = cfg
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randint(0, 3, (70, 33), generator=gen).float() / 4 + 1, torch.randn(5, 3, 3, 3, generator=gen).half(),
          torch.zeros(0, 5), (torch.randn(301, generator=gen) * 4).bfloat16(), torch.ones(9, 4)]
    n = len(xs)
    keys = [_ukeys(x) for x in xs]
    prefix = torch.tensor([int(torch.mode(k >> 24).values) if k.numel() else 0 for k in keys])
    prefix[4] = -1
    rows = [x.shape[0] for x in xs]
    cols = [x[0].numel() if x.shape[0] else 5 for x in xs]
    rb = [(c + 7) // 8 for c in cols]
    nbytes = [r * b for r, b in zip(rows, rb)]
    hb = [-(-b // hchunk) for b in nbytes]
    desc = torch.tensor([[x.data_ptr(), nb, c, b, topk_mod._DEVICE_DTYPES[x.dtype], sum(hb[:i]), 0, 0, 0]
                         for i, (x, nb, c, b) in enumerate(zip(xs, nbytes, cols, rb))])
    want = [k[(k >> 24) == p] if p >= 0 else k[:0] for k, p in zip(keys, prefix.tolist())]
    cnt = torch.tensor([w.numel() for w in want])
    cb = -(-cnt // (8 * hchunk))
    ctab = torch.stack([cnt.cumsum(0) - cnt, cnt, cb.cumsum(0) - cb], 1)
    hist = torch.zeros(n, 257, dtype=torch.int64)
    cursor = torch.zeros(n, dtype=torch.int64)
    cand = torch.full((int(cnt.sum()),), -1, dtype=torch.int32)
    hops.topk_compact(desc, prefix, hist, ctab, cursor, cand, threads, hchunk, sum(hb))
    assert torch.equal(cursor, cnt) and cnt[0] == 70 * 33          # > kStage: several flushes a block
    for i, w in enumerate(want):
        seg = cand[int(ctab[i, 0]):int(ctab[i, 0] + cnt[i])].to(torch.int64) & 0xFFFFFFFF
        assert torch.equal(seg.sort().values, w.sort().values), i
        assert torch.equal(hist[i, :256], torch.bincount((w >> 16) & 0xFF, minlength=256)), i
        assert hist[i, 256] == 0
    # passes 2 and 3 over the candidates: the histograms of the next digits of the matching keys
    for level in (2, 3):
        pre = torch.tensor([int(torch.mode(w >> (32 - 8 * level)).values) if w.numel() else -1 for w in want])
        h = torch.zeros(n, 257, dtype=torch.int64)
        hops.topk_cand_histogram(ctab, pre, h, cand, level, threads, 8 * hchunk, int(cb.sum()))
        for i, w in enumerate(want):
            m = w[(w >> (32 - 8 * level)) == pre[i]] if pre[i] >= 0 else w[:0]
            assert torch.equal(h[i, :256], torch.bincount((m >> (24 - 8 * level)) & 0xFF, minlength=256)), (level, i)
    # levels 0 and 1 over candidates (the window path's selection): every key at level 0
    for level in (0, 1):
        pre = torch.tensor([int(torch.mode(w >> 24).values) if w.numel() and level else 0 for w in want])
        h = torch.zeros(n, 257, dtype=torch.int64)
        hops.topk_cand_histogram(ctab, pre, h, cand, level, threads, 8 * hchunk, int(cb.sum()))
        for i, w in enumerate(want):
            m = w[(w >> 24) == pre[i]] if level else w
            assert torch.equal(h[i, :256], torch.bincount((m >> (24 - 8 * level)) & 0xFF, minlength=256)), (level, i)
    # count only (no candidate array): the same histogram, no keys written
    h2, cur2 = torch.zeros_like(hist), torch.zeros_like(cursor)
    hops.topk_compact(desc, prefix, h2, ctab, cur2, torch.empty(0, dtype=torch.int32), threads, hchunk, sum(hb))
    assert torch.equal(h2, hist) and not cur2.any()


@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_compaction_on_and_off_give_the_same_masks(hops, scope):
    """Forced on, forced off and the default rule: bit for bit the generic engine's masks, with ties
    (integer scores) and without; with compaction, passes 2 and 3 read only the candidates."""
    gen = torch.Generator().manual_seed(21)
    for kind in ("randn", "ties", "specials"):
        scores = _scores(kind, torch.float32, gen)
        big = torch.randn(64, 40, generator=gen)
        scores["big"] = (big * 3).round() if kind == "ties" else big
        for density in _densities(scores, scope):
            want = topk_masks(scores, density, scope=scope)
            for compact in (None, True, False):
                for cfg in ((8, 4), (32, 16)):
                    rec = _Recorder(hops)
                    _assert_same(_device_topk(scores, density, scope, rec, cfg, compact, window=False), want)
                    if compact is False:
                        assert "topk_cand_histogram" not in rec.calls
                    elif compact is True:
                        assert rec.calls.get("topk_histogram", 0) <= 1


def test_candidate_rule_follows_the_bytes(hops, monkeypatch):
    """By default the candidate array is written only when it takes at most 1/8 of the scores' bytes:
    continuous scores (a few % per top-digit bin at these sizes) get it, all-equal scores do not."""
    sizes = []
    real = hops.topk_compact

    class Ops(_Recorder):
        def __getattr__(self, name):
            if name == "topk_compact":
                return lambda *a: (sizes.append(a[5].numel()), real(*a))[1]
            return super().__getattr__(name)
    gen = torch.Generator().manual_seed(2)
    spread = {"w": torch.exp(torch.randn(200, 64, generator=gen) * 8)}   # 2^±~16: keys over many bins
    _assert_same(_device_topk(spread, 0.01, "global", Ops(hops), window=False), topk_masks(spread, 0.01))
    flat = {"w": torch.ones(200, 64)}
    _assert_same(_device_topk(flat, 0.01, "global", Ops(hops), window=False), topk_masks(flat, 0.01))
    assert 0 < sizes[0] * 4 <= spread["w"].numel() * 4 // 8 and sizes[1] == 0


# ----------------------------------------------------------------------------------- flat output
def test_masks_are_views_of_one_flat_buffer(hops):
    """Every mask's data is a view into ONE uint8 buffer: dict order, each start 16-byte aligned,
    no overlap, the buffer's size the padded sum."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(3, 5), (0, 7), (17,), (2, 3, 3, 3), (1, 1), (9, 130), (4, 0)]
    scores = {f"t{i}": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    got = _device_topk(scores, 0.3, "global", hops)
    _assert_same(got, topk_masks(scores, 0.3))
    base = got["t0"].data.untyped_storage().data_ptr()
    end = 0
    for name in scores:
        d = got[name].data
        assert d.untyped_storage().data_ptr() == base and d.is_contiguous()
        off = d.storage_offset()
        assert off % 16 == 0 and off >= end
        end = off + d.numel()
    assert got["t0"].data.untyped_storage().nbytes() == -(-end // 16) * 16


def test_many_tensors_of_odd_sizes(hops):
    """60 tensors of odd shapes (empty ones, single entries, long rows, every dtype) in one launch per
    pass: both scopes, densities from k = 1 to k = n - 1, compaction forced on and off."""
    gen = torch.Generator().manual_seed(9)
    scores = {}
    for i in range(60):
        r = int(torch.randint(0, 12, (1,), generator=gen))
        c = int(torch.randint(1, 40, (1,), generator=gen)) if i % 7 else 0
        shape = (r, c) if i % 3 else (r, 1, c)
        t = torch.randint(-20, 20, shape, generator=gen).float() / 4 if i % 2 else torch.randn(shape, generator=gen)
        scores[f"m{i}"] = t.to(DTYPES[i % 3])
    total = sum(t.numel() for t in scores.values())
    for scope in ("global", "per_module"):
        for density in (1 / total, 0.013, 0.25, 0.5, (total - 1) / total):
            want = topk_masks(scores, density, scope=scope)
            for compact, window in ((True, False), (False, False), (None, None)):
                _assert_same(_device_topk(scores, density, scope, hops, (8, 4), compact, window), want)


def test_only_empty_tensors(hops):
    scores = {"a": torch.zeros(0, 3), "b": torch.zeros(4, 0), "c": torch.zeros(0)}
    for scope in ("global", "per_module"):
        for density in (0.5, 1.0):
            got = _device_topk(scores, density, scope, hops)
            _assert_same(got, topk_masks(scores, density, scope=scope))


def test_deterministic(hops):
    """Two runs give the same bytes (the candidates' order inside a segment is free; counts are not)."""
    gen = torch.Generator().manual_seed(12)
    scores = {"a": torch.randint(0, 9, (40, 30), generator=gen).half(), "b": torch.randn(333, generator=gen)}
    for scope in ("global", "per_module"):
        for window in (None, False):
            a = _device_topk(scores, 0.37, scope, hops, (8, 4), True, window)
            b = _device_topk(scores, 0.37, scope, hops, (8, 4), True, window)
            _assert_same(a, b)


def test_schemas_declare_what_the_ops_write(hops):
    """opcheck's schema test: an op that writes an argument not declared (a!) fails it (topk_pack's
    output buffer included)."""
    x = torch.randint(0, 3, (6, 10), generator=torch.Generator().manual_seed(0)).float()   # ties: every op runs
    scores = {"x": x}
    rec_args = {}

    class Ops(_Recorder):
        def __getattr__(self, name):
            f = super().__getattr__(name)
            return lambda *a: (rec_args.setdefault(name, a), f(*a))[1]
    _device_topk(scores, 0.5, "global", Ops(hops), (8, 4), True, window=False)
    _device_topk(scores, 0.5, "global", Ops(hops), (8, 4))
    assert {"topk_histogram", "topk_compact", "topk_cand_histogram", "topk_equal_counts", "topk_pack",
            "topk_sample", "topk_window"} <= set(rec_args)
    for name, args in rec_args.items():
        if name == "topk_config":
            continue
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        if name != "topk_config":
            desc_like = args[0].clone()
            if name != "topk_cand_histogram":
                desc_like[:, 0] = x.data_ptr()      # the clone of desc points at the live scores
            args = (desc_like,) + args[1:]
        torch.library.opcheck(getattr(torch.ops.spare_harness, name).default, args, test_utils=("test_schema",))


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


# ----------------------------------------------------------------------------------- window
def test_sample_reads_one_key_per_stratum(hops):
    """topk_sample: sample i is an entry of stratum [i*N/m, (i+1)*N/m) of the concatenated entries
    (empty tensors included), as a signed-order key; m = N reads every entry once."""
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(3, 5, generator=gen), torch.zeros(0, 4), torch.randn(7, generator=gen).half(),
          torch.randn(2, 2, 3, generator=gen).bfloat16()]
    numel = [x.numel() for x in xs]
    e0 = [sum(numel[:i]) for i in range(len(xs))]
    desc = torch.zeros(len(xs), topk_mod._DESC_COLS, dtype=torch.int64)
    for i, x in enumerate(xs):
        desc[i, 0], desc[i, 4], desc[i, 8] = x.data_ptr(), topk_mod._DEVICE_DTYPES[x.dtype], e0[i]
    keys = torch.cat([_ukeys(x) for x in xs]) - (1 << 31)       # signed-order
    total = keys.numel()
    out = torch.empty(total, dtype=torch.int32)
    hops.topk_sample(desc, out, total, 8)
    assert torch.equal(out.to(torch.int64), keys)
    out = torch.empty(5, dtype=torch.int32)
    hops.topk_sample(desc, out, total, 32)
    for i in range(5):
        lo, hi = i * total // 5, (i + 1) * total // 5
        assert int(out[i]) in keys[lo:hi].tolist()


def test_window_pass_counts_and_candidates(hops):
    """topk_window: per tensor the keys above hi and the NaNs; the keys in [lo, hi] (unsigned) with
    their tensor (as a multiset), the cursor counting past the capacity."""
    gen = torch.Generator().manual_seed(10)
    xs = [torch.randn(40, 9, generator=gen), torch.randint(-3, 4, (300,), generator=gen).half(),
          torch.zeros(0, 3), torch.randn(5, 5, generator=gen).bfloat16()]
    xs[0][3, 4] = float("nan")
    n = len(xs)
    keys = [_ukeys(torch.where(torch.isnan(x.float()), 0.0, x.float())) for x in xs]
    lo, hi = int(_ukeys(torch.tensor([-0.5]))[0]), int(_ukeys(torch.tensor([0.75]))[0])
    win = torch.tensor([lo - (1 << 31), hi - (1 << 31)], dtype=torch.int32)
    for threads, hchunk in ((8, 4), (32, 16), (256, 2048)):
        scores = {f"t{i}": x for i, x in enumerate(xs)}
        desc_rows = []
        hb0 = 0
        for x in xs:
            rows, cols = x.shape[0], (x[0].numel() if x.shape[0] else 3)
            rb = (cols + 7) // 8
            desc_rows.append([x.data_ptr(), rows * rb, cols, rb, topk_mod._DEVICE_DTYPES[x.dtype], hb0, 0, 0, 0])
            hb0 += -(-rows * rb // hchunk)
        desc = torch.tensor(desc_rows)
        nan = torch.tensor([int(torch.isnan(x.float()).sum()) for x in xs])
        want = [k[(k >= lo) & (k <= hi) & ~torch.isnan(x.float().reshape(-1))] for k, x in zip(keys, xs)]
        above = torch.tensor([int(((k > hi) & ~torch.isnan(x.float().reshape(-1))).sum()) for k, x in zip(keys, xs)])
        c = sum(w.numel() for w in want)
        for cap in (c, c - 5):
            counts, cursor = torch.zeros(n, 2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
            cand, cand_t = torch.zeros(cap, dtype=torch.int32), torch.zeros(cap, dtype=torch.int32)
            hops.topk_window(desc, win, counts, cursor, cand, cand_t, threads, hchunk, hb0)
            assert torch.equal(counts[:, 0], above) and torch.equal(counts[:, 1], nan)
            assert int(cursor[0]) == c
            if cap == c:
                got = cand.to(torch.int64) & 0xFFFFFFFF
                for i, w in enumerate(want):
                    assert torch.equal(got[cand_t == i].sort().values, w.sort().values), i
        del scores


def test_window_misses_fall_back_exactly(hops, monkeypatch):
    """A window that misses the k-th key (a 4-key sample, no margin) or overflows its capacity (heavy
    ties) falls back to the radix passes: same masks; a hit needs no histogram pass."""
    gen = torch.Generator().manual_seed(13)
    scores = {"a": torch.randn(50, 20, generator=gen), "b": torch.randint(0, 3, (400,), generator=gen).float(),
              "c": torch.randn(3, 3, 3, 3, generator=gen).half()}
    outcomes = set()
    for sample, sigmas, pad in ((1 << 20, 6, 2), (4, 0, 0), (16, 0, 0)):
        monkeypatch.setattr(topk_mod, "_SAMPLE", sample)
        monkeypatch.setattr(topk_mod, "_WINDOW_SIGMAS", sigmas)
        monkeypatch.setattr(topk_mod, "_WINDOW_PAD", pad)
        for density in (0.001, 0.05, 0.3, 0.77, 0.999):
            rec = _Recorder(hops)
            _assert_same(_device_topk(scores, density, "global", rec, (32, 16)), topk_masks(scores, density))
            assert rec.calls["topk_window"] == 1
            outcomes.add(_full_passes(rec) > 0)
    assert outcomes == {True, False}
    monkeypatch.setattr(topk_mod, "_WINDOW_SLACK", 0.0)     # capacity 1024: the 1500 tied zeros overflow it
    ties = {"z": torch.zeros(30, 50), "y": torch.ones(17)}
    rec = _Recorder(hops)
    _assert_same(_device_topk(ties, 0.5, "global", rec), topk_masks(ties, 0.5))
    assert rec.calls["topk_window"] == 1 and _full_passes(rec) > 0


def test_window_nan_raises_naming_the_first_tensor(hops):
    scores = {"ok": torch.randn(4, 5), "bad": torch.randn(6, 7), "worse": torch.full((3,), float("nan"))}
    scores["bad"][1, 1] = float("nan")
    rec = _Recorder(hops)
    with pytest.raises(ValueError, match=r"scores\['bad'\]: contains NaN scores"):
        _device_topk(scores, 0.5, "global", rec)
    assert rec.calls["topk_window"] == 1 and "topk_histogram" not in rec.calls


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
                want = topk_masks(scores, density, scope=scope)
                _assert_same(got, want)
                for compact, window in ((True, False), (False, False)):   # the radix path, both ways
                    _assert_same(real(cuda_scores, density, scope, _cuda_topk_ops(), None, compact, window), want)
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
