"""Mask formats and the exact top-k selection (spare_kernels/masks.py, spare_kernels/topk.py)."""
import math

import pytest
import torch

import spare_kernels.masks as masks_mod
import spare_kernels.topk as topk_mod
from spare_kernels.masks import Mask, topk_masks
from spare_kernels.utils.memory import measure_peak

GRANS = ("element", "block", "row", "module")
SHAPES = [(7, 13), (5, 3, 3, 3), (33, 9), (1, 1), (9,), (40, 70)]


# ----------------------------------------------------------------------------------- helpers
def _uniform_pattern(shape, granularity, block, p=0.5):
    """A random dense bool pattern that is uniform over each unit of the granularity."""
    rows, cols = shape[0], math.prod(shape[1:])
    if granularity == "element":
        m = torch.rand(rows, cols) < p
    elif granularity == "row":
        m = (torch.rand(rows, 1) < p).expand(rows, cols)
    elif granularity == "module":
        m = torch.full((rows, cols), bool(torch.rand(()) < p))
    else:
        bo, bi = block
        tiles = torch.rand(-(-rows // bo), -(-cols // bi)) < p
        m = tiles.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:rows, :cols]
    return m.reshape(shape).contiguous()


def _unit_scores(t, granularity, block):
    """Brute-force float64 unit scores of one tensor, flat in row-major unit order."""
    rows, cols = t.shape[0], math.prod(t.shape[1:])
    m = t.double().reshape(rows, cols)
    if granularity == "element":
        return m.reshape(-1)
    if granularity == "row":
        return m.mean(1)
    if granularity == "module":
        return m.mean().reshape(1)
    bo, bi = block
    pr, pc = -(-rows // bo), -(-cols // bi)
    out = torch.empty(pr, pc, dtype=torch.float64)
    for p in range(pr):
        for q in range(pc):
            out[p, q] = m[p * bo:(p + 1) * bo, q * bi:(q + 1) * bi].mean()
    return out.reshape(-1)


def _unit_flat(mask):
    """Selected units of a mask, flat in row-major unit order."""
    if mask.granularity == "element":
        return mask.to_dense().reshape(-1)
    return mask.data.reshape(-1)


def _reference(scores, density, granularity="element", scope="global", block=(32, 32)):
    """torch.topk on the concatenation of the (brute-force) unit scores; ties: first in order."""
    groups = [list(scores)] if scope == "global" else [[n] for n in scores]
    ref = {}
    for names in groups:
        us = [_unit_scores(scores[n], granularity, block) for n in names]
        cat = torch.cat(us)
        k = round(density * cat.numel())
        sel = torch.zeros(cat.numel(), dtype=torch.bool)
        if k:
            # stable sort descending: equal scores keep their concatenation order -> documented rule
            order = torch.sort(cat, descending=True, stable=True).indices
            sel[order[:k]] = True
        off = 0
        for n, u in zip(names, us):
            ref[n] = sel[off:off + u.numel()]
            off += u.numel()
    return ref


def _check_against_reference(scores, density, granularity="element", scope="global", block=(32, 32)):
    got = topk_masks(scores, density, granularity=granularity, scope=scope, block=block)
    ref = _reference(scores, density, granularity, scope, block)
    assert list(got) == list(scores)
    for n in scores:
        assert got[n].granularity == granularity
        assert got[n].shape == scores[n].shape
        assert torch.equal(_unit_flat(got[n]), ref[n]), (n, granularity, scope, density)
    return got


@pytest.fixture
def small_chunks(monkeypatch):
    """Force many chunks (and the uncached unit path) on small tensors."""
    monkeypatch.setattr(topk_mod, "_CHUNK", 64)
    monkeypatch.setattr(topk_mod, "_CACHE_UNITS", 0)


# ----------------------------------------------------------------------------------- Mask
@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("block", [(4, 8), (3, 5), (32, 32)], ids=str)
def test_from_dense_round_trip(granularity, shape, block):
    dense = _uniform_pattern(shape, granularity, block)
    m = Mask.from_dense(dense, granularity, block=block)
    assert m.granularity == granularity and m.shape == torch.Size(shape)
    assert torch.equal(m.to_dense(), dense)
    assert m.count == int(dense.sum())
    assert m.numel == dense.numel()
    assert m.density == pytest.approx(int(dense.sum()) / dense.numel(), abs=0)
    assert Mask.from_dense(dense.to(torch.uint8), granularity, block=block) == m
    assert m.to("cpu") == m


@pytest.mark.parametrize("shape", [(7, 13), (5, 3, 3, 3), (3, 8), (2, 17), (9,)], ids=str)
def test_element_bit_packing_layout(shape):
    rows, cols = shape[0], math.prod(shape[1:])
    dense = torch.rand(shape) < 0.5
    m = Mask.from_dense(dense)
    assert m.data.dtype == torch.uint8 and tuple(m.data.shape) == (rows, -(-cols // 8))
    assert m.nbytes == rows * -(-cols // 8)
    flat = dense.reshape(rows, cols)
    for o in range(rows):
        for j in range(cols):  # bit b (LSB first) of byte j//8 is entry (o, j)
            assert bool((int(m.data[o, j // 8]) >> (j % 8)) & 1) == bool(flat[o, j])
        for j in range(cols, -(-cols // 8) * 8):  # padding bits are zero
            assert (int(m.data[o, j // 8]) >> (j % 8)) & 1 == 0


def test_count_and_density_partial_edge_blocks():
    # 10x10 with 4x4 tiles: tile sizes are 16,16,8 / 16,16,8 / 8,8,4
    tiles = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    m = Mask("block", (10, 10), tiles, block=(4, 4))
    assert m.count == 16 + 8 + 8 + 4
    assert m.density == (16 + 8 + 8 + 4) / 100
    assert int(m.to_dense().sum()) == m.count
    assert m.nbytes == 9
    r = Mask("row", (6, 2, 3), torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool))
    assert r.count == 3 * 6 and r.density == 0.5
    assert Mask("module", (5, 7), torch.tensor(True)).count == 35
    assert Mask("module", (5, 7), torch.tensor(False)).density == 0.0


def test_element_count_exact_large():
    dense = torch.rand(1000, 1003) < 0.37
    m = Mask.from_dense(dense)
    assert m.count == int(dense.sum())
    all_on = Mask.from_dense(torch.ones(3, 13, dtype=torch.bool))
    assert all_on.count == 39 and all_on.density == 1.0


def test_empty_shapes():
    for g in GRANS:
        for shape in [(4, 0, 3), (0, 5)]:
            m = Mask.from_dense(torch.zeros(shape, dtype=torch.bool), g, block=(2, 2))
            assert m.count == 0 and m.density == 0.0
            assert m.to_dense().shape == torch.Size(shape)


def test_from_dense_errors():
    d = torch.zeros(8, 8, dtype=torch.bool)
    d[0, 0] = True
    with pytest.raises(ValueError, match="row 0 mixes"):
        Mask.from_dense(d, "row")
    with pytest.raises(ValueError, match="module mask"):
        Mask.from_dense(d, "module")
    with pytest.raises(ValueError, match=r"tile \(0, 0\) of block=\(4, 4\)"):
        Mask.from_dense(d, "block", block=(4, 4))
    d[0, :] = True  # a full row is not a full 4x4 tile
    Mask.from_dense(d, "row")
    with pytest.raises(ValueError, match="tile"):
        Mask.from_dense(d, "block", block=(4, 4))
    with pytest.raises(TypeError, match="dtype"):
        Mask.from_dense(torch.zeros(3, 3), "element")
    with pytest.raises(TypeError, match="bool or uint8 tensor, got list"):
        Mask.from_dense([[True]], "element")
    with pytest.raises(ValueError, match="granularity"):
        Mask.from_dense(d, "tile")
    with pytest.raises(ValueError, match="block"):
        Mask.from_dense(d, "block", block=(0, 4))
    with pytest.raises(ValueError, match="data: expected torch.uint8 of shape"):
        Mask("element", (3, 9), torch.zeros(3, 1, dtype=torch.uint8))
    with pytest.raises(TypeError, match="data: expected a torch.Tensor"):
        Mask("row", (3, 9), [True, False, True])


def test_wire_module_off_and_on():
    on = Mask("module", (4, 6), torch.tensor(True))
    data, kind, _, _ = on.wire()
    assert data is None and kind == masks_mod.fmt.NONE
    off = Mask("module", (4, 6), torch.tensor(False))
    data, kind, _, _ = off.wire()
    assert kind == masks_mod.fmt.ROW and not bool(data.any())


def test_module_wire_reads_no_tensor():
    """A module mask's on/off is a host bool set with its data: wire() and count read no tensor value
    (on a GPU each read would wait for the stream on every forward); replacing the data updates it,
    and a pickled mask keeps it."""
    import io
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero", "item"):
                Reads.n += 1
            return func(*args, **(kwargs or {}))

    masks = [Mask("module", (4, 6), torch.tensor(True)),
             Mask.from_dense(torch.zeros(4, 6, dtype=torch.bool), "module"),
             topk_masks({"a": torch.randn(3, 3), "b": torch.randn(5)}, 0.5, "module")["b"],
             Mask._trusted("module", torch.Size((4, 6)), torch.tensor(True))]
    with Reads():
        wires = [m.wire() for _ in range(3) for m in masks]
        counts = [m.count for m in masks]
    assert Reads.n == 0
    assert [w[1] for w in wires[:4]] == [masks_mod.fmt.NONE, masks_mod.fmt.ROW, masks[2].wire()[1], masks_mod.fmt.NONE]
    assert counts == [24, 0, int(masks[2].data) * 5, 24]
    m = masks[0]
    m.data = torch.tensor(False)
    assert m.wire()[1] == masks_mod.fmt.ROW and m.count == 0 and not m.to_dense().any()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back == m and back.wire()[1] == masks_mod.fmt.ROW and back.count == 0


# ----------------------------------------------------------------------------------- topk_masks
def _distinct_scores(specs, dtype=torch.float32):
    """Score tensors whose values are all distinct (a random permutation of distinct values)."""
    n = sum(math.prod(s) for s in specs)
    vals = (torch.randperm(n).to(torch.float64) - n / 3) / 7  # distinct, mixed signs
    out, off = {}, 0
    for i, s in enumerate(specs):
        out[f"m{i}"] = vals[off:off + math.prod(s)].reshape(s).to(dtype)
        off += math.prod(s)
    return out


SPECS = [(40, 70), (5, 3, 3, 3), (33,), (17, 9), (64, 24)]


@pytest.mark.parametrize("scope", ["global", "per_module"])
@pytest.mark.parametrize("density", [1e-4, 0.003, 0.05, 0.25, 0.5, 0.77, 0.999, 1.0])
def test_element_matches_topk_distinct(scope, density):
    scores = _distinct_scores(SPECS)
    got = _check_against_reference(scores, density, scope=scope)
    if scope == "global":
        cat = torch.cat([s.reshape(-1) for s in scores.values()])
        k = round(density * cat.numel())
        assert sum(m.count for m in got.values()) == k
        if k:  # the selected set is exactly torch.topk's
            idx = torch.topk(cat, k).indices
            ref = torch.zeros(cat.numel(), dtype=torch.bool)
            ref[idx] = True
            assert torch.equal(torch.cat([m.to_dense().reshape(-1) for m in got.values()]), ref)
    else:
        for n, s in scores.items():
            assert got[n].count == round(density * s.numel())


@pytest.mark.parametrize("granularity", ["block", "row", "module"])
@pytest.mark.parametrize("scope", ["global", "per_module"])
@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.9, 1.0])
def test_units_match_bruteforce(granularity, scope, density):
    scores = {f"m{i}": torch.randn(s) for i, s in enumerate([(40, 70), (5, 3, 3, 3), (33,), (17, 9),
                                                             (64, 24), (3, 5)])}
    got = _check_against_reference(scores, density, granularity, scope, block=(8, 16))
    if scope == "global":
        n_units = sum(_unit_scores(s, granularity, (8, 16)).numel() for s in scores.values())
        assert sum(int(_unit_flat(m).sum()) for m in got.values()) == round(density * n_units)


@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_chunked_paths_match(small_chunks, granularity, scope):
    # chunk=64 entries: multi-row chunks, byte-aligned pieces of rows longer than a chunk,
    # tile-row bands and tile groups, uncached unit scores recomputed in every pass
    scores = {"a": torch.randn(9, 150), "b": torch.randn(20, 3, 3, 3), "c": torch.randn(7),
              "d": torch.randn(3, 7, 11)}
    for density in (0.05, 0.3, 0.5, 1.0):
        _check_against_reference(scores, density, granularity, scope, block=(2, 40))
        _check_against_reference(scores, density, granularity, scope, block=(3, 4))


@pytest.mark.parametrize("granularity", GRANS)
def test_ties_integer_scores(granularity):
    # heavy ties: integer-valued scores in {-2..2}
    scores = {f"m{i}": torch.randint(-2, 3, s).float() for i, s in enumerate([(30, 20), (4, 3, 3, 3),
                                                                             (50,), (16, 16)])}
    for scope in ("global", "per_module"):
        for density in (0.01, 0.1, 1 / 3, 0.5, 0.9):
            _check_against_reference(scores, density, granularity, scope, block=(4, 4))


def test_ties_all_equal_first_in_order():
    scores = {"a": torch.full((10, 10), 3.0), "b": torch.full((5, 4), 3.0), "c": torch.full((7,), 3.0)}
    got = topk_masks(scores, 0.9)
    k = round(0.9 * 127)  # 114: all of a, the first 14 of b, none of c
    assert sum(m.count for m in got.values()) == k
    # the documented rule: dict order, then row-major
    assert bool(got["a"].to_dense().all())
    assert int(got["b"].to_dense().sum()) == k - 100
    assert got["b"].to_dense().reshape(-1)[:k - 100].all() and not got["b"].to_dense().reshape(-1)[k - 100:].any()
    assert not got["c"].to_dense().any()
    # ties at the threshold only: the strictly larger ones always win
    s2 = {"a": torch.zeros(4, 4), "b": torch.zeros(4, 4)}
    s2["b"][3, 3] = 1.0
    got = topk_masks(s2, 3 / 32)
    assert got["b"].to_dense()[3, 3] and got["b"].count == 1
    assert got["a"].to_dense().reshape(-1)[:2].all() and got["a"].count == 2


def test_signed_zero_and_infinities_tie_rules():
    scores = {"a": torch.tensor([0.0, -0.0, -0.0, 0.0, -1.0, float("inf"), -float("inf"), 1e-45, -1e-45])}
    got = topk_masks(scores, 4 / 9)["a"].to_dense().tolist()
    # inf, 1e-45, then the first two zeros (+0.0 and -0.0 compare equal, so they tie)
    assert got == [True, True, False, False, False, True, False, True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_among_tiny_negatives_next_to_zeros(dtype):
    # the threshold's top-digit bin holds the negatives closest to zero (keys up to -1): the
    # zeros right above it (both signs) must not leak into that bin's exact pass
    tiny = torch.finfo(dtype).smallest_normal * 2.0 ** -20  # subnormal
    neg = -tiny * torch.randperm(50, dtype=dtype).add_(1)
    zeros = torch.tensor([0.0, -0.0, 0.0, -0.0], dtype=dtype)
    scores = {"z": zeros, "n": neg, "p": torch.rand(6, dtype=dtype) + 1}
    for density in (12 / 60, 25 / 60, 0.5, 59 / 60):
        _check_against_reference(scores, density)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    scores = _distinct_scores([(30, 40), (8, 3, 3, 3)], dtype=torch.float64)
    if dtype != torch.float64:
        scores = {n: torch.randn(s.shape).to(dtype) for n, s in scores.items()}
    for density in (0.01, 0.3, 0.7):
        _check_against_reference(scores, density)


def test_float64_exact_below_float32_resolution():
    # distinct float64 values that all round to the same float32: ranked exactly anyway
    base = torch.full((1000,), 1.0, dtype=torch.float64)
    vals = base + torch.randperm(1000).double() * 1e-12
    assert torch.unique(vals.float()).numel() < 5
    got = topk_masks({"a": vals, "b": torch.zeros(3, dtype=torch.float32)}, 100 / 1003)
    assert torch.equal(got["a"].to_dense(), vals >= torch.topk(vals, 100).values[-1])
    assert got["a"].count == 100 and got["b"].count == 0


def test_mixed_dtypes_global():
    scores = {"a": torch.randn(20, 30, dtype=torch.float16), "b": torch.randn(10, 10),
              "c": torch.randn(7, 5, dtype=torch.float64), "d": torch.randn(9, 9, dtype=torch.bfloat16)}
    for density in (0.02, 0.4, 0.95):
        _check_against_reference(scores, density)


def test_negative_scores_and_exact_counts_many_densities():
    scores = {"a": -torch.rand(37, 41) - 1.0, "b": -torch.rand(3, 3, 3, 5) * 5, "c": -torch.rand(11)}
    n = sum(s.numel() for s in scores.values())
    for density in [1 / n, 0.5 / n, 1.5 / n, 2.5 / n, 1e-3, 0.0123, 0.1, 1 / 3, 0.5, 0.6789, 0.99,
                    1 - 1 / n, 1.0]:
        got = _check_against_reference(scores, density)
        assert sum(m.count for m in got.values()) == round(density * n)


def test_empty_and_single_tensors():
    scores = {"e": torch.randn(0, 4), "a": torch.randn(6, 5), "z": torch.randn(3, 0, 2)}
    for g in GRANS:
        got = topk_masks(scores, 0.5, granularity=g, block=(2, 2))
        assert got["e"].count == 0 and got["z"].count == 0
        assert got["e"].shape == (0, 4) and got["z"].shape == (3, 0, 2)
    got = topk_masks({"e": torch.randn(0, 4)}, 1.0)
    assert got["e"].count == 0


def test_module_granularity_selects_by_mean():
    scores = {"lo": torch.full((4, 4), 0.1), "hi": torch.full((2, 3), 5.0), "mid": torch.tensor([1.0, 2.0])}
    got = topk_masks(scores, 2 / 3, granularity="module")
    assert [bool(got[n].data) for n in scores] == [False, True, True]
    assert got["hi"].count == 6 and got["hi"].granularity == "module"


def test_edge_tile_scored_by_mean_of_actual_entries():
    # 3x3 with 2x2 tiles: the corner tile (2,2) has one entry; its mean is that entry (not /4)
    s = torch.zeros(3, 3)
    s[2, 2] = 1.0
    s[0:2, 0:2] = 0.3  # a full tile with mean 0.3 < 1.0
    got = topk_masks({"w": s}, 1 / 4, granularity="block", block=(2, 2))["w"]
    assert got.data.tolist() == [[False, False], [False, True]]
    assert got.count == 1


def test_masks_on_score_device_and_grad_scores():
    s = torch.randn(5, 5, requires_grad=True)
    got = topk_masks({"w": s}, 0.2)
    assert got["w"].device == s.device and got["w"].count == 5


def test_nan_raises_naming_tensor():
    for g in GRANS:
        s = {"ok": torch.randn(4, 4), "bad.weight": torch.randn(4, 4)}
        s["bad.weight"][1, 2] = float("nan")
        with pytest.raises(ValueError, match=r"scores\['bad.weight'\]: contains NaN"):
            topk_masks(s, 0.5, granularity=g, block=(2, 2))
    # NaN bit patterns right next to +-inf's keys, and float64 / float16 NaN
    near = torch.tensor([0x7F800001, -0x007FFFFF, 0x7FFFFFFF, -1], dtype=torch.int32).view(torch.float32)
    for i in range(4):
        for other in (1.0, float("inf"), -float("inf")):
            with pytest.raises(ValueError, match="NaN"):
                topk_masks({"x": torch.cat([torch.tensor([other]), near[i:i + 1]])}, 0.5)
    for dt in (torch.float64, torch.float16):
        with pytest.raises(ValueError, match="NaN"):
            topk_masks({"x": torch.tensor([1.0, float("nan")], dtype=dt)}, 0.5)
    # inf is fine, and -inf + inf in one block gives a NaN mean: reported as such
    assert topk_masks({"x": torch.tensor([float("inf"), -float("inf"), 0.0])}, 1 / 3)["x"].count == 1
    with pytest.raises(ValueError, match="block mean is NaN"):
        topk_masks({"x": torch.tensor([[float("inf"), -float("inf")]])}, 1.0, granularity="block")


def test_bad_inputs():
    ok = {"w": torch.randn(4, 4)}
    with pytest.raises(TypeError, match="scores: expected a non-empty dict"):
        topk_masks([torch.randn(3)], 0.5)
    with pytest.raises(ValueError, match="scores: .*got an empty dict"):
        topk_masks({}, 0.5)
    with pytest.raises(TypeError, match="scores: expected str keys, got int"):
        topk_masks({3: torch.randn(3)}, 0.5)
    with pytest.raises(TypeError, match=r"scores\['w'\]: expected a floating-point tensor, got list"):
        topk_masks({"w": [1.0, 2.0]}, 0.5)
    with pytest.raises(TypeError, match=r"scores\['w'\]: expected a floating-point dtype, got torch.int64"):
        topk_masks({"w": torch.arange(4)}, 0.5)
    with pytest.raises(TypeError, match=r"scores\['w'\]: .*torch.bool"):
        topk_masks({"w": torch.ones(4, dtype=torch.bool)}, 0.5)
    with pytest.raises(ValueError, match=r"scores\['w'\]: expected a tensor with at least one dim"):
        topk_masks({"w": torch.tensor(1.0)}, 0.5)
    for bad in (1.5, 0, 0.0, -0.1, float("nan"), float("inf"), True, "0.5", None, torch.tensor(0.5)):
        with pytest.raises(ValueError, match=r"density: expected a number in \(0, 1\], got"):
            topk_masks(ok, bad)
    with pytest.raises(ValueError, match=r"density: expected a number in \(0, 1\], got 1.5"):
        topk_masks(ok, 1.5)
    with pytest.raises(ValueError, match=r"granularity: expected one of \('element', 'block', 'row', 'module'\), got 'tile'"):
        topk_masks(ok, 0.5, granularity="tile")
    with pytest.raises(ValueError, match=r"scope: expected one of \('global', 'per_module'\), got 'local'"):
        topk_masks(ok, 0.5, scope="local")
    for bad in ((0, 4), (4,), (4, 4, 4), "32x32", (4.0, 4), (True, 4), None, (-1, 2)):
        with pytest.raises(ValueError, match="block: expected a pair of positive ints"):
            topk_masks(ok, 0.5, granularity="block", block=bad)


def test_numpy_and_int_density_accepted():
    np = pytest.importorskip("numpy")
    s = {"w": torch.randn(10, 10)}
    assert topk_masks(s, np.float64(0.25))["w"].count == 25
    assert topk_masks(s, 1)["w"].count == 100


def test_peak_memory_bounded_by_largest_tensor():
    # 20 tensors of 4M fp32 (16 MB each, 320 MB in all): the selection never concatenates them
    scores = {f"w{i}": torch.randn(2000, 2000) for i in range(20)}
    largest = max(s.numel() * s.element_size() for s in scores.values())
    total = sum(s.numel() * s.element_size() for s in scores.values())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every allocation on the profiled thread; also fast on a busy machine
    try:
        runs = {g: measure_peak(topk_masks, scores, 0.1, granularity=g) for g in ("element", "block")}
    finally:
        torch.set_num_threads(threads)
    for g, (got, peak) in runs.items():
        out = sum(m.nbytes for m in got.values())
        assert peak >= out  # the figure sees at least the result
        assert peak <= largest, (g, peak, largest)
        assert peak < total / 20
        assert peak - out <= 12 * topk_mod._CHUNK  # temporaries: a few chunk-sized buffers
    assert sum(m.count for m in got.values()) > 0
