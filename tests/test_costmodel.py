"""The cost model (spare_kernels/costmodel.py): its pass counts against DESIGN §3's GEMM units, the
choices the registry takes from it, and the validation command's plumbing. Its accuracy on this CPU is
checked by ``python -m benchmarks.costmodel validate`` (a timing, never a unit test)."""
import math

import pytest
import torch

from benchmarks import costmodel as bench
from spare_kernels import costmodel as cm
from spare_kernels import maskfmt as fmt
from spare_kernels.backends import registry

# A device with no memory limit and no wave effects: only GEMM FLOPs count, so every scheme's time in
# units of one N·out·in GEMM is DESIGN §3's column "total".
FLOPS_ONLY = cm.Device("flops only", mma16=1e12, gemm32=1e12, vector=1e30, bandwidth=1e30, overhead=0.0)


@pytest.mark.parametrize("n,out,cols", [(4096, 320, 320), (1024, 640, 5120), (77, 768, 1280)])
def test_gemm_units_match_the_design_table(n, out, cols):
    unit = cm.gemm_time(n, out, cols, device=FLOPS_ONLY)

    def units(scheme, **kw):
        return cm.bound(scheme, n, out, cols, 4, device=FLOPS_ONLY, **kw) / unit

    assert units("floor") == pytest.approx(2.0)
    # + the rank-r products over the weight (B·A and its two gradients): r/n units each
    assert units("spare_ref") == pytest.approx(5.0 + 3 * 4 / n)
    assert units("merged") == pytest.approx(3.0 + 3 * 4 / n)
    assert units("ours_element", path="composite") == pytest.approx(3.0)
    # block masks: the composite computes all of G; the fused wgrad only the on tiles (DESIGN: 2 + d)
    assert units("ours_block", path="composite", block_density=0.1) == pytest.approx(3.0)
    assert units("ours_block", path="fused", block_density=0.1) == pytest.approx(2.1)
    eps = 4 / out + 4 / cols
    assert 2.0 < units("peft") <= 2.0 + 3 * eps + 1e-9
    assert 2.0 < units("ours_dense") <= 2.0 + 3 * eps + 1e-9


def test_bound_takes_the_faster_path_and_predict_adds_fixed_costs():
    for n in (64, 32768):
        best = cm.bound("ours_element", n, 1280, 1280, 4)
        both = [cm.bound("ours_element", n, 1280, 1280, 4, path=p) for p in cm.PATHS]
        assert best == min(both)
        assert cm.predict("ours_element", n, 1280, 1280, 4) > best
    # few tokens: rebuilding W_eff tiles in registers beats writing and re-reading W_eff
    assert cm.choose_path("linear", fmt.ELEMENT, 64, 1280, 1280, 4) == "fused"
    # many tokens: one W_eff build beats a rebuild in every token tile
    assert cm.choose_path("linear", fmt.ELEMENT, 32768, 320, 320, 4) == "composite"
    assert cm.choose_path("linear", fmt.ROW, 32768, 320, 320, 4) == "fused"        # factored either way


def test_the_path_can_be_forced_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setenv("SPARE_KERNELS_PATH", "fused")
    assert cm.choose_path("linear", fmt.ELEMENT, 32768, 320, 320, 4) == "fused"
    monkeypatch.setenv("SPARE_KERNELS_PATH", "fastest")
    with pytest.raises(ValueError, match="SPARE_KERNELS_PATH"):
        cm.choose_path("linear", fmt.ELEMENT, 32768, 320, 320, 4)


def test_the_element_bound_sits_where_the_design_says():
    """Large token counts: ≈ 1.5× the floor (3 GEMMs for 2); ≤ 0.6× SPARE's scheme (3 for 5, and that
    scheme's elementwise passes over activations on top)."""
    n, out, cols = 32768, 1280, 1280
    el = cm.bound("ours_element", n, out, cols, 4)
    assert 1.45 <= el / cm.bound("floor", n, out, cols, 4) <= 1.65
    assert 0.4 <= el / cm.bound("spare_ref", n, out, cols, 4) <= 0.62
    # block 0.1: G only on the on tiles, but x and dy are still read for it (memory): ≈ 1.2× the floor
    bl = cm.bound("ours_block", n, out, cols, 4)
    assert 1.1 <= bl / cm.bound("floor", n, out, cols, 4) <= 1.3
    assert bl == min(cm.bound("ours_block", n, out, cols, 4, path=p) for p in cm.PATHS)
    # few tokens: the per-block factored form (no G) is as cheap as LoRA
    few = [cm.bound("ours_block", 64, out, cols, 4, path=p) for p in ("factored", "composite")]
    assert few[0] < few[1]


def test_wave_quantisation_and_split_k():
    # 9 output tiles with a long K are split over K: not 9/132 of the machine
    g = cm.gemm_time(320, 320, 32768)
    assert g < 4 * (2 * 320 * 320 * 32768 / cm.H100.mma16)
    # bandwidth-bound pass
    p = cm.Pass("copy", 0.0, 3e9)
    assert cm.pass_time(p, cm.H100, overhead=False) == pytest.approx(1e-3)


def test_the_registry_asks_the_model_where_no_table_lists_the_shape(monkeypatch):
    calls = []

    def spy(op, kind, n, out, cols, rank, candidates, **kw):
        calls.append((op, kind, n, out, cols, rank, tuple(candidates)))
        return candidates[-1]

    monkeypatch.setattr(cm, "choose_backend", spy)
    fake = {}
    for b in ("cuda", "triton"):
        fake[b] = registry.Entry("masked_lora_linear", b, lambda *a: b, ("cuda",))
    saved = dict(registry._IMPLS)
    registry._load_all()
    try:
        with registry._LOCK:
            for b, e in fake.items():
                registry._IMPLS[("masked_lora_linear", b)] = e
            registry._CHOICE.clear()
        key = registry.shape_key(fmt.BLOCK, 320, 320, 4, 4096)
        e = registry.lookup("masked_lora_linear", "cuda", torch.bfloat16, torch.float32, key)
        assert e is fake["triton"]
        assert calls == [("masked_lora_linear", fmt.BLOCK, 4096, 320, 320, 4, ("cuda", "triton"))]
        # a measured table still wins
        registry.set_gpu_table({"masked_lora_linear": {key: "cuda"}})
        assert registry.lookup("masked_lora_linear", "cuda", torch.bfloat16, torch.float32, key) is fake["cuda"]
    finally:
        with registry._LOCK:
            registry._IMPLS.clear()
            registry._IMPLS.update(saved)
        registry.set_gpu_table(None)


def test_choose_backend_prefers_priority_on_ties_and_the_faster_otherwise():
    # element masks: both backends run the composite: a tie keeps the priority order
    assert cm.choose_backend("masked_lora_linear", fmt.ELEMENT, 32768, 320, 320, 4, ["cuda", "triton"]) == "cuda"
    # few tokens: triton's fused tiles beat the composite
    assert cm.choose_backend("masked_lora_linear", fmt.ELEMENT, 64, 1280, 1280, 4, ["cuda", "triton"]) == "triton"
    assert cm.choose_backend("masked_lora_linear", fmt.ROW, 64, 1280, 1280, 4, ["cuda", "triton"]) == "cuda"


def test_the_table_and_its_markdown():
    doc = bench.table("h100", latent=64)
    shapes = {r["shape"] for r in doc["rows"]}
    assert {"4096:320:320", "77:768:320", "64:1280:1280"} <= shapes
    for r in doc["rows"]:
        assert all(v > 0 and math.isfinite(v) for v in r["bound_us"].values())
        assert r["path"] in cm.PATHS
    md = bench.table_markdown(doc)
    assert md.count("\n| ") == len(doc["rows"]) + 2 and "Predicted, not measured" in md


def test_validate_plumbing_on_a_tiny_shape(capsys):
    doc = bench.validate([bench.parse_shape("8:32:48")], reps=1, quiet=True)
    (row,) = doc["rows"]
    assert set(row["schemes"]) == set(bench.VALIDATE)
    for v in row["schemes"].values():
        assert v["predicted_ms"] > 0 and v["measured_ms"] > 0
        assert v["ratio"] == pytest.approx(v["predicted_ms"] / v["measured_ms"])
    assert isinstance(doc["outside"], list)


def test_bad_arguments_are_named():
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="TOKENS:IN:OUT"):
        bench.parse_shape("8:32")
    with pytest.raises(argparse.ArgumentTypeError, match="TOKENS:IN:OUT"):
        bench.parse_shape("0:32:32")
    with pytest.raises(ValueError, match="scheme"):
        cm.linear_passes("lora", 8, 8, 8, 4)
    with pytest.raises(SystemExit):
        bench.main(["validate", "--reps", "0"])


def test_saliency_and_topk_passes():
    # fused sample_abs: one weight-gradient GEMM's FLOPs, no per-sample gradient traffic
    T, out, cols = 77, 320, 768
    gemm = cm.gemm_time(out, cols, 8 * T, fp32_out=True)
    fused = cm.passes_time(cm.saliency_passes("sample_abs", 8, T, out, cols))
    scratch = cm.passes_time(cm.saliency_passes("sample_abs", 8, T, out, cols, fused=False))
    assert fused <= 1.5 * gemm < scratch
    assert sum(p.flops for p in cm.saliency_passes("sample_sq", 8, T, out, cols)) == 2.0 * out * cols * 8 * T
    with pytest.raises(ValueError, match="stat"):
        cm.saliency_passes("mean", 8, T, out, cols)
    # top-k: compacting after the first histogram removes three of four full re-reads
    n = 860_000_000
    assert cm.passes_time(cm.topk_passes(n, 686)) < 0.5 * cm.passes_time(cm.topk_passes(n, 686, compacted=False))
